"""OpenAI's ``POST /v1/images/edits`` on the wire: a multipart form, as OpenAI's SDKs send it.

The image (``image``, or ``image[]`` as the SDKs name a list) and the optional ``mask`` are files;
the other fields are form values, which arrive as text: ``form_fields`` gives each its JSON type
before the same checks as ``/v1/images/generations`` (schemas/openai.py) run. The mask is OpenAI's:
a PNG whose transparent pixels are the ones to repaint. Imports nothing outside ``schemas/``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from pydantic import Field

from schemas import fields
from schemas.fields import contract_error
from schemas.openai import ImageGenerationRequest

IMAGE_FIELDS = ("image", "image[]")
MASK_FIELD = "mask"
# Form values that are text as sent; every other value is read as JSON (numbers, true/false).
_TEXT = frozenset(
    {
        "prompt", "negative_prompt", "model", "size", "response_format", "quality", "style", "moderation",
        "background", "output_format", "user", "scheduler", "input_fidelity", "safety_identifier",
    }
)  # fmt: skip
# The SDKs flatten an object into bracketed names: extra_body={"adapters": {"x": 1}} is adapters[x].
_NESTED = re.compile(r"([a-z_]{1,32})\[([^\[\]]{1,64})\]")
MAX_FORM_FIELDS = 64


class ImageEditRequest(ImageGenerationRequest):
    """The form of ``POST /v1/images/edits``, without its files."""

    strength: fields.Strength | None = Field(
        default=None,
        description="The share of the steps run (1: repaint from noise). Default: 1 with a mask, else 0.8.",
    )
    input_fidelity: str | None = Field(
        default=None, max_length=16, description="Accepted (low, high); no effect: strength decides."
    )
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="Accepted; no effect: PNG is lossless."
    )
    safety_identifier: fields.Text | None = Field(
        default=None, description="Accepted; ignored, never logged."
    )


def form_fields(values: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The form's text values as the JSON body they stand for: numbers and booleans read as JSON,
    bracketed names (``adapters[NAME]``) as an object, a repeated name refused."""
    document: dict[str, Any] = {}
    for count, (name, text) in enumerate(values, start=1):
        if count > MAX_FORM_FIELDS:
            raise contract_error(f"the form has more than {MAX_FORM_FIELDS} fields")
        nested = _NESTED.fullmatch(name)
        value = text if name in _TEXT else _json_or_text(text)
        if nested is not None:
            group = document.setdefault(nested.group(1), {})
            if not isinstance(group, dict) or nested.group(2) in group:
                raise contract_error(f"{nested.group(1)} is given twice in the form; send each field once")
            group[nested.group(2)] = value
            continue
        if name in document:
            raise contract_error(f"{_shown(name)} is given twice in the form; send each field once")
        document[name] = value
    return document


def _json_or_text(text: str) -> Any:
    """``"2"`` -> 2, ``"true"`` -> True, ``"0.5"`` -> 0.5; anything else stays text (its field's type
    then says what is wrong with it)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if isinstance(value, int | float | bool) or value is None else text


def _shown(name: str) -> str:
    return name if len(name) <= 64 and name.replace("_", "").isalnum() else "a field"
