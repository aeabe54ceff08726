"""The one definition of each request field: its type, bounds, default and text rules.

Every way in takes its fields from here: /score (schemas/score.py), OpenAI's Images API
(schemas/openai.py), AUTOMATIC1111's and Hugging Face's routes (schemas/a1111.py,
schemas/huggingface.py) and batch jobs' parameters (service/batch/params.py). Static bounds live in
the types, so the OpenAPI schema shows them; the limits an operator sets (``ScoreLimits``) arrive as
the validation context, so the same types serve any configuration. The engine checks only what the
model knows (sizes it can draw, schedulers and adapters it has: model/engine.py).

The rules' messages are what is wrong with the field ("is longer than 300 characters"): the place
pydantic reports goes in front of them (``describe_problem``). No message repeats the input.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    Strict,
    StringConstraints,
    ValidationInfo,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

# Seeds must fit torch.Generator.manual_seed. The engine's bound is model.types.MAX_SEED; this
# package imports nothing from the project, so it states the number again for the wire
# (tests/test_layout.py keeps the two equal).
MAX_SEED = 2**63 - 1
# Image sizes: the one place for every path's limits, and why they differ.
# - The engine takes any multiple of 8 from 8 up (the VAE downsamples by 8); memory is the limit.
# - Online keeps 128..1024: one request shares the device with everyone else's, and a 4096x4096
#   image would hold the whole batch (and its memory) for minutes.
# - Batch jobs own their device, so they may ask for up to 4096 (about 16x the pixels of 1024).
SIZE_MULTIPLE = 8
MIN_SIZE, MAX_SIZE = 128, 1024
BATCH_MIN_SIZE, BATCH_MAX_SIZE = SIZE_MULTIPLE, 4096
MAX_STEPS = 150
DEFAULT_STEPS = 50  # diffusers' default; never above the server's own max_steps (ScoreLimits)
DEFAULT_GUIDANCE, MAX_GUIDANCE = 7.5, 30
MAX_IMAGES_PER_PROMPT = 4
MAX_NAME_CHARS = 64  # a scheduler's or sampler's name
# A model's name as a request gives it (a library entry, an alias, an A1111 title "name [hash]"):
# service/settings.py bounds SD_MODEL's the same.
MAX_MODEL_NAME_CHARS = 200
# LoRA adapters per image (model.types states the same bounds for the engine; a test keeps them equal).
MAX_ADAPTERS = 4
MAX_ADAPTER_SCALE = 2.0
# Images in (image to image, inpainting): a field holds the image file's base64 (line breaks and a
# data: prefix allowed) or a URL; service/images_in decodes and checks it. 28 M characters is the
# base64 of a 20 MiB file, the largest any route takes (SD_MAX_BODY_BYTES bounds the body first).
MAX_IMAGE_CHARS = 28_000_000
# diffusers' defaults: image to image keeps a fifth of the schedule (0.8), inpainting runs it whole.
DEFAULT_IMAGE_STRENGTH, DEFAULT_INPAINT_STRENGTH = 0.8, 1.0
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RULE = "rule"  # the error type of the rules below: their messages follow the field's place


@dataclass(frozen=True)
class ScoreLimits:
    """Operator limits, passed as ``context={"limits": ScoreLimits(...)}`` when validating."""

    max_prompts: int = 16
    max_prompt_chars: int = 2000
    max_steps: int = MAX_STEPS

    @property
    def default_steps(self) -> int:
        """The steps of a request that names none: every default lies inside its limit."""
        return min(DEFAULT_STEPS, self.max_steps)


def limits_of(info: ValidationInfo) -> ScoreLimits:
    """The operator's limits of this validation; the defaults when none were given."""
    limits = (info.context or {}).get("limits")
    return limits if isinstance(limits, ScoreLimits) else ScoreLimits()


def rule_error(message: str) -> PydanticCustomError:
    """A broken rule of one field; ``message`` says what is wrong with it ("is longer than ...")."""
    return PydanticCustomError(RULE, message)


def contract_error(message: str) -> PydanticCustomError:
    """A broken rule told in a sentence of its own ("give at most 4 adapters")."""
    return PydanticCustomError("contract", message)


def is_text(text: str) -> bool:
    """Whether ``text`` is valid Unicode. JSON can carry lone UTF-16 surrogates ("\\ud800"), and
    files read with ``surrogateescape`` turn bytes that are not UTF-8 into them; neither UTF-8 nor
    any tokenizer takes them. The project's one such check: every path in asks it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def seeds_fit(seed: int, images: int) -> bool:
    """Whether the seeds of ``images`` images numbered from ``seed`` (seed, seed + 1, ...: every
    route's rule) all fit the generator. Seeds the server draws are far below the bound."""
    return seed + images - 1 <= MAX_SEED


def valid_text(value: str) -> str:
    if not is_text(value):
        raise rule_error("is not valid Unicode text (it holds a lone surrogate); send UTF-8 text")
    return value


def printable_name(value: str) -> str:
    """A name without control characters (nor lone surrogates): what a model's name may hold."""
    valid_text(value)
    if not value.isprintable():
        raise rule_error("holds a control character; send the name as GET /v1/models lists it")
    return value


def _within_prompt_limit(value: str, info: ValidationInfo) -> str:
    max_chars = limits_of(info).max_prompt_chars
    if len(value) > max_chars:
        raise rule_error(f"is longer than {max_chars} characters")
    return valid_text(value)


def _within_step_limit(value: int, info: ValidationInfo) -> int:
    max_steps = limits_of(info).max_steps
    if value > max_steps:
        raise rule_error(f"may be at most {max_steps} on this server")
    return value


def check_adapters(value: dict[str, float] | None) -> dict[str, float] | None:
    """Names of the served kind and finite scales in range; whether a name serves is the engine's
    to say (422 naming the adapters GET /info lists)."""
    if value is None:
        return None
    if len(value) > MAX_ADAPTERS:
        raise contract_error(f"give at most {MAX_ADAPTERS} adapters")
    for name, scale in value.items():
        if not ADAPTER_NAME.fullmatch(name):
            raise contract_error(
                "adapter names are 1-64 letters, digits, '.', '_' or '-' (GET /info lists them)"
            )
        if not math.isfinite(scale) or abs(scale) > MAX_ADAPTER_SCALE:
            raise contract_error(
                f"each adapter's scale must be a finite number from {-MAX_ADAPTER_SCALE} "
                f"to {MAX_ADAPTER_SCALE}"
            )
    return value


# The fields. Strict: nothing is coerced ("50" is not 50, true is not 1).
Text = Annotated[str, Strict(), AfterValidator(valid_text)]
Name = Annotated[str, Strict(), StringConstraints(max_length=MAX_NAME_CHARS), AfterValidator(valid_text)]
# The model a request names (None or "": the default one); which names serve is the library's to say
# (404 model_not_found naming the models: service/runtime/library.py).
ModelName = Annotated[
    str, Strict(), StringConstraints(max_length=MAX_MODEL_NAME_CHARS), AfterValidator(printable_name)
]
Prompt = Annotated[str, Strict(), AfterValidator(_within_prompt_limit)]  # SD_MAX_PROMPT_CHARS, valid text
Steps = Annotated[int, Strict(), Field(ge=1, le=MAX_STEPS), AfterValidator(_within_step_limit)]
Guidance = Annotated[float, Strict(), Field(ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)]
Side = Annotated[int, Strict(), Field(ge=MIN_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE)]
BatchSide = Annotated[int, Strict(), Field(ge=BATCH_MIN_SIZE, le=BATCH_MAX_SIZE, multiple_of=SIZE_MULTIPLE)]
Seed = Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)]
ImageCount = Annotated[int, Strict(), Field(ge=1, le=MAX_IMAGES_PER_PROMPT)]
Scale = Annotated[float, Strict()]
ImageIn = Annotated[str, Strict(), StringConstraints(max_length=MAX_IMAGE_CHARS)]
# The share of the schedule an image in runs (1: all of it, from pure noise where a mask repaints).
Strength = Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)]
Adapters = Annotated[Annotated[dict[str, Scale], Strict()] | None, AfterValidator(check_adapters)]


class StepsWithinLimit(BaseModel):
    """A body whose steps, when it names none, are the server's default (``ScoreLimits.default_steps``:
    never above its SD_MAX_STEPS)."""

    steps_field: ClassVar[str] = "num_inference_steps"

    @model_validator(mode="after")
    def _default_steps_within_limit(self, info: ValidationInfo) -> Any:
        if self.steps_field not in self.model_fields_set or getattr(self, self.steps_field) is None:
            setattr(self, self.steps_field, limits_of(info).default_steps)
        return self


_SAFE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def describe_location(location: tuple[int | str, ...]) -> str:
    """``("input_data", "data", 3)`` -> ``input_data.data[3]``; odd key names are not repeated."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _SAFE_NAME.fullmatch(part) else "<key>"
            text += f".{name}" if text else name
    return text or "body"


def describe_problem(detail: ErrorDetails) -> str:
    """One problem of a validation error as 'where: what' ('where is ...' for the rules above)."""
    where = describe_location(detail["loc"])
    return f"{where} {detail['msg']}" if detail["type"] == RULE else f"{where}: {detail['msg']}"
