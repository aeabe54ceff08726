"""The form of OpenAI's ``POST /v1/images/edits``, read as its SDKs send it: multipart, the image as
``image`` (or ``image[]``), the optional mask as ``mask``, every other field a text value
(schemas/openai_edits.py gives each its type). The files are kept as sent; decoding them is the
items' work, in a worker thread (service/runtime/items.py)."""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticCustomError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from schemas.fields import ScoreLimits
from schemas.openai_edits import IMAGE_FIELDS, MASK_FIELD, MAX_FORM_FIELDS, ImageEditRequest, form_fields
from service.runtime.protocols import FieldError
from service.runtime.scoring import validate_document
from service.web.errors import UnsupportedMediaTypeError

MULTIPART = "multipart/form-data"
MAX_FILES = 4  # an image, a mask, and room for a client that repeats one (refused by name below)
MAX_TEXT_BYTES = 64 * 1024  # a form value: a prompt is at most SD_MAX_PROMPT_CHARS anyway

# What /docs shows for the body: the form's fields and its two files.
EDIT_FORM: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP."},
                        "mask": {
                            "type": "string",
                            "format": "binary",
                            "description": "A PNG of the image's size: transparent pixels are repainted.",
                        },
                        "prompt": {"type": "string"},
                        "n": {"type": "integer", "minimum": 1, "maximum": 4},
                        "size": {"type": "string", "example": "512x512"},
                        "response_format": {"type": "string", "enum": ["b64_json", "url"]},
                        "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                        "stream": {"type": "boolean"},
                    },
                }
            }
        },
    }
}


async def read_edit_form(
    request: Request, limits: ScoreLimits
) -> tuple[ImageEditRequest, bytes, bytes | None]:
    """The checked form, the image's bytes and the mask's (None without one)."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != MULTIPART:
        raise UnsupportedMediaTypeError(
            f"this route takes a {MULTIPART} form (the image and mask as files), as OpenAI's SDKs send it"
        )
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_TEXT_BYTES)
    try:
        texts = [(name, value) for name, value in form.multi_items() if isinstance(value, str)]
        files = [(name, value) for name, value in form.multi_items() if isinstance(value, UploadFile)]
        images = [upload for name, upload in files if name in IMAGE_FIELDS]
        masks = [upload for name, upload in files if name == MASK_FIELD]
        if len(files) != len(images) + len(masks):
            raise FieldError(
                "the form's files must be image (or image[]) and mask; send no other file", param=None
            )
        if len(images) != 1:
            raise FieldError(
                f"image: send one image file (the form has {len(images)}); this server edits one image "
                "per request",
                param="image",
            )
        if len(masks) > 1:
            raise FieldError("mask: send at most one mask file", param="mask")
        if any(name in IMAGE_FIELDS or name == MASK_FIELD for name, _ in texts):
            raise FieldError(
                "image and mask must be files (multipart file parts), not text fields", param="image"
            )
        try:
            document = form_fields(texts)
        except PydanticCustomError as error:
            raise FieldError(error.message(), param=None) from None
        parsed = validate_document(document, ImageEditRequest, limits)
        image = await images[0].read()
        mask = await masks[0].read() if masks else None
    finally:
        await form.close()
    return parsed, image, mask
