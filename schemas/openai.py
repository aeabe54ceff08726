"""OpenAI's Images API on the wire: ``POST /v1/images/generations``, ``GET /v1/models`` and the error body.

Only the parts a text-to-image server can honour are accepted; anything else is refused by name, as on
``/score``. OpenAI's own options that make no difference here (``quality``, ``style``, ``moderation``,
and the values of ``background`` and ``output_format`` that are what this server gives anyway) are
accepted, so that clients that always send them work unchanged; the values it cannot give are
refused with why. The Stable Diffusion parameters OpenAI has no name for (steps, guidance, seed, negative
prompt, scheduler) are extensions that SDKs send through ``extra_body``. Their types are the field
definitions every route shares (schemas/fields.py), so /score and /v1 take the same values; operator
limits arrive as the same validation context (``ScoreLimits``).

This module imports nothing outside ``schemas/``. Error messages never repeat what the client sent.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from schemas import fields
from schemas.fields import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE, contract_error

B64_JSON = "b64_json"
URL = "url"
AUTO_SIZE = "auto"
# OpenAI's options (dall-e-2/3's and gpt-image-1's) and the values accepted: none changes the image
# (the steps set the quality, the server's safety checker moderates, PNG is what comes back).
OPENAI_OPTIONS: dict[str, tuple[str, ...]] = {
    "quality": ("auto", "standard", "hd", "low", "medium", "high"),
    "style": ("vivid", "natural"),
    "moderation": ("auto", "low"),
    "background": ("auto", "opaque"),
    "output_format": ("png",),
}
_WHY_NOT = {
    "background": "Stable Diffusion draws opaque images",
    "output_format": "images come back as PNG, lossless; convert them on your side",
}
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
SIZE_RULE = (  # after the field's name
    f'must be "WIDTHxHEIGHT" with each side a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to '
    f'{MAX_SIZE} (for example "512x512"), or "auto" for the model\'s native size'
)

SAMPLE_IMAGES_REQUEST: dict[str, Any] = {
    "prompt": "a photograph of an astronaut riding a horse",
    "n": 2,
    "size": "512x512",
    "response_format": B64_JSON,
    "seed": 42,
    "num_inference_steps": 30,
}


def _option(description: str) -> Any:
    """An optional short string option of OpenAI's (its values are checked by a validator)."""
    return Field(default=None, max_length=16, description=description)


class ImageGenerationRequest(fields.StepsWithinLimit):
    """The body of ``POST /v1/images/generations``."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [SAMPLE_IMAGES_REQUEST]}
    )

    prompt: fields.Prompt = Field(description="What to draw.")
    n: fields.ImageCount = Field(default=1, description="Images to generate.")
    size: str | None = Field(
        default=None,
        max_length=16,
        description=f'"WIDTHxHEIGHT", each side a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}; '
        'default (or "auto"): the model\'s native size.',
    )
    response_format: str | None = Field(
        default=None,
        max_length=16,
        description='"b64_json": inline; "url": a link to the image on this server, valid for '
        "SD_IMAGE_LINK_TTL_S (OpenAI: 60 minutes); left out: both, for clients that read either.",
    )
    model: fields.ModelName | None = Field(
        default=None,
        description="An id GET /v1/models lists: a model (default: the default one), or a LoRA adapter.",
    )
    user: fields.Text | None = Field(
        default=None, description="Accepted for compatibility; ignored and never logged."
    )
    # OpenAI's options of its own models: accepted where this server gives what they ask anyway.
    quality: str | None = _option("Accepted (auto, standard, hd, low, medium, high); no effect: steps do.")
    style: str | None = _option("Accepted (vivid, natural); no effect.")
    moderation: str | None = _option("Accepted (auto, low); no effect: the server's safety checker decides.")
    background: str | None = _option('"auto" or "opaque": Stable Diffusion draws no transparency.')
    output_format: str | None = _option('Only "png" (the default).')
    # Streaming: Server-Sent Events, with up to partial_images previews of each image before it is done.
    stream: bool = Field(
        default=False, description="true: answer Server-Sent Events as OpenAI's SDKs read them."
    )
    partial_images: int | None = Field(
        default=None, ge=0, le=3, description="With stream: previews of each image before it is done (0-3)."
    )
    # Extensions (extra_body in the SDKs): the same fields, bounds and defaults as /score's parameters.
    negative_prompt: fields.Prompt | None = Field(default=None, description="What to draw away from.")
    seed: fields.Seed | None = Field(
        default=None, description="The k-th image gets seed + k. Default: random."
    )
    num_inference_steps: fields.Steps = Field(
        default=fields.DEFAULT_STEPS,
        description=f"Denoising steps. Default: {fields.DEFAULT_STEPS}, or the server's max.",
    )
    guidance_scale: fields.Guidance = Field(
        default=fields.DEFAULT_GUIDANCE, description="Classifier-free guidance."
    )
    scheduler: fields.Name | None = Field(default=None, description="One of GET /info's schedulers.")
    adapters: fields.Adapters = Field(
        default=None, description='LoRA adapters, as /score\'s {"NAME": scale}.'
    )

    @field_validator("seed")
    @classmethod
    def _seeds_fit(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not fields.seeds_fit(value, info.data.get("n", 1)):
            raise contract_error(f"seed + n - 1 must be at most {fields.MAX_SEED}; send a smaller seed")
        return value

    @field_validator("size")
    @classmethod
    def _size_in_bounds(cls, value: str | None) -> str | None:
        if value is None or value == AUTO_SIZE:
            return value
        match = _SIZE.fullmatch(value)
        if match is None or not all(_is_side(side) for side in match.groups()):
            raise contract_error(SIZE_RULE)
        return value

    @field_validator(*OPENAI_OPTIONS)
    @classmethod
    def _one_of_openais(cls, value: str | None, info: ValidationInfo) -> str | None:
        name = str(info.field_name)
        if value is None or value in OPENAI_OPTIONS[name]:
            return value
        why = f" ({_WHY_NOT[name]})" if name in _WHY_NOT else ""
        raise contract_error(f"must be one of: {', '.join(OPENAI_OPTIONS[name])}{why}")

    @field_validator("response_format")
    @classmethod
    def _b64_or_url(cls, value: str | None) -> str | None:
        if value is not None and value not in (B64_JSON, URL):
            raise contract_error('must be "b64_json" or "url"')
        return value

    @property
    def inline(self) -> bool:
        """Whether the answer carries the images' base64 (b64_json, or no format named)."""
        return self.response_format != URL

    @property
    def linked(self) -> bool:
        """Whether the answer carries links (url, or no format named: OpenAI's default for
        dall-e-2 and dall-e-3 is url, and clients built for them read data[0].url)."""
        return self.response_format != B64_JSON

    @property
    def width(self) -> int | None:
        """The requested width; None for the model's native size."""
        return self._side(0)

    @property
    def height(self) -> int | None:
        """The requested height; None for the model's native size."""
        return self._side(1)

    def _side(self, index: int) -> int | None:
        match = _SIZE.fullmatch(self.size or "")
        return int(match.group(index + 1)) if match else None


_SIDE = TypeAdapter(fields.Side)


def _is_side(text: str) -> bool:
    """Whether a side of ``size`` is one the ``width`` and ``height`` of the other routes take."""
    try:
        _SIDE.validate_python(int(text))
    except ValidationError:
        return False
    return True


class ImageData(BaseModel):
    """One generated image. ``seed`` and ``nsfw_content_detected`` are this server's extensions."""

    b64_json: str | None = Field(
        default=None, description="Base64 PNG (standard alphabet, padded, no data: prefix); null with url."
    )
    url: str | None = Field(
        default=None,
        description="A link to the PNG on this server, until SD_IMAGE_LINK_TTL_S; null with b64_json.",
    )
    revised_prompt: None = Field(default=None, description="Always null: the prompt is used as given.")
    seed: int = Field(description="Send it back (with n 1) to get the same image.")
    nsfw_content_detected: bool | None = Field(
        description="true: flagged by the safety checker and blacked out; null: the model has no checker."
    )


class ImagesResponse(BaseModel):
    """The answer of ``POST /v1/images/generations``."""

    created: int = Field(description="Unix time, seconds.")
    data: list[ImageData]


class OpenAIModel(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str = Field(description="The served model; send it as model, or leave model out.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the server started, seconds.")
    owned_by: str


class OpenAIModelList(BaseModel):
    """The answer of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIError(BaseModel):
    message: str = Field(description="What was wrong and what to do.")
    type: str = Field(
        description="invalid_request_error, authentication_error, rate_limit_error or server_error."
    )
    param: str | None = Field(description="The request field at fault, when there is one.")
    code: str = Field(description="snake_case, stable; the same codes as /score's errors.")


class OpenAIErrorResponse(BaseModel):
    """The body of every non-2xx answer on /v1/*."""

    error: OpenAIError
