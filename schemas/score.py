"""The online scoring contract: Azure ML's model-catalog ``input_data`` request and its image list reply.

Static bounds (steps 1-150, sizes 128-1024...) live in the field definitions, so the OpenAPI schema
shows them. Limits an operator sets (rows per request, prompt length, a lower step cap) arrive as the
validation context (see ``ScoreLimits``), so the same model serves any configuration.

Error messages never repeat what the client sent: they name the place and the rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Seeds must fit torch.Generator.manual_seed. The engine's bound is model.types.MAX_SEED; this
# package imports nothing from the project, so it states the number again for the wire schema
# (tests/engine/test_rules.py keeps the two equal).
MAX_SEED = 2**63 - 1
PROMPT_COLUMN = "prompt"
NEGATIVE_PROMPT_COLUMN = "negative_prompt"
SEED_COLUMN = "seed"
COLUMNS = (PROMPT_COLUMN, NEGATIVE_PROMPT_COLUMN, SEED_COLUMN)
# Image sizes: the one place for every path's limits, and why they differ.
# - The engine takes any multiple of 8 from 8 up (the VAE downsamples by 8); memory is the limit.
# - Online (/score) keeps 128..1024: one request shares the device with everyone else's, and a
#   4096x4096 image would hold the whole batch (and its memory) for minutes.
# - Batch jobs own their device, so they may ask for up to 4096 (about 16x the pixels of 1024).
SIZE_MULTIPLE = 8
MIN_SIZE, MAX_SIZE = 128, 1024
BATCH_MIN_SIZE, BATCH_MAX_SIZE = SIZE_MULTIPLE, 4096
MAX_STEPS = 150
DEFAULT_STEPS = 50  # diffusers' default; never above the server's own max_steps (ScoreLimits)
MAX_IMAGES_PER_PROMPT = 4
# LoRA adapters per image (model.types states the same bounds for the engine; a test keeps them equal).
MAX_ADAPTERS = 4
MAX_ADAPTER_SCALE = 2.0
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

SAMPLE_REQUEST: dict[str, Any] = {
    "input_data": {
        "columns": ["prompt"],
        "data": ["a photograph of an astronaut riding a horse", "lion holding hunted deer in grass fields"],
        "index": [0, 1],
        "parameters": {"num_inference_steps": 50, "guidance_scale": 7.5},
    }
}
# An 8x8 black PNG: real responses carry full-size images.
_SAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAADElEQVR4AWNgGB4AAADIAAG/w8pxAAAAAElFTkSuQmCC"
SAMPLE_RESPONSE: list[dict[str, Any]] = [
    {"prompt": prompt, "generated_image": _SAMPLE_PNG, "nsfw_content_detected": False, "seed": seed}
    for seed, prompt in enumerate(SAMPLE_REQUEST["input_data"]["data"], start=1234)
]


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


@dataclass(frozen=True)
class PromptRow:
    """One row of ``data`` after normalising its three accepted shapes."""

    prompt: str
    negative_prompt: str | None
    seed: int | None


def _contract_error(message: str) -> PydanticCustomError:
    return PydanticCustomError("contract", message)


def check_text(text: str, where: str) -> str:
    """``text`` when it is valid Unicode; JSON can carry lone UTF-16 surrogates ("\\ud800"), which
    no tokenizer (nor UTF-8) can take, so they are refused here rather than fail in the engine."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _contract_error(
            f"{where} is not valid Unicode text (it holds a lone surrogate); send UTF-8 text"
        ) from None
    return text


def check_adapters(value: dict[str, float] | None) -> dict[str, float] | None:
    """Names of the served kind and finite scales in range; whether a name serves is the engine's
    to say (422 naming the adapters GET /info lists)."""
    if value is None:
        return None
    if len(value) > MAX_ADAPTERS:
        raise _contract_error(f"give at most {MAX_ADAPTERS} adapters")
    for name, scale in value.items():
        if not ADAPTER_NAME.fullmatch(name):
            raise _contract_error(
                "adapter names are 1-64 letters, digits, '.', '_' or '-' (GET /info lists them)"
            )
        if not math.isfinite(scale) or abs(scale) > MAX_ADAPTER_SCALE:
            raise _contract_error(
                f"each adapter's scale must be a finite number from {-MAX_ADAPTER_SCALE} "
                f"to {MAX_ADAPTER_SCALE}"
            )
    return value


Adapters = Annotated[dict[str, float] | None, AfterValidator(check_adapters)]


def _limits(info: ValidationInfo) -> ScoreLimits:
    context = info.context or {}
    limits = context.get("limits")
    return limits if isinstance(limits, ScoreLimits) else ScoreLimits()


def prompt_within_limit(value: str, info: ValidationInfo) -> str:
    """A prompt field of any route's body: within the operator's length, valid Unicode."""
    max_chars = _limits(info).max_prompt_chars
    if len(value) > max_chars:
        raise _contract_error(f"is longer than {max_chars} characters")
    return check_text(value, str(info.field_name))


def steps_within_limit(value: int, info: ValidationInfo) -> int:
    """A steps field of any route's body: within the operator's maximum."""
    max_steps = _limits(info).max_steps
    if value > max_steps:
        raise _contract_error(f"may be at most {max_steps} on this server")
    return value


class ScoreParameters(BaseModel):
    """Generation parameters shared by every row of the request. All optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    num_inference_steps: int = Field(
        default=DEFAULT_STEPS,
        ge=1,
        le=MAX_STEPS,
        description=f"Denoising steps. Default: {DEFAULT_STEPS}, or the server's maximum when lower.",
    )
    guidance_scale: float = Field(
        default=7.5,
        ge=0,
        le=30,
        allow_inf_nan=False,
        description="Classifier-free guidance; 1 or less turns it off.",
    )
    negative_prompt: str | None = Field(
        default=None, description="Negative prompt for rows without their own."
    )
    height: int | None = Field(
        default=None,
        ge=MIN_SIZE,
        le=MAX_SIZE,
        multiple_of=SIZE_MULTIPLE,
        description="Default: the model's native.",
    )
    width: int | None = Field(
        default=None,
        ge=MIN_SIZE,
        le=MAX_SIZE,
        multiple_of=SIZE_MULTIPLE,
        description="Default: the model's native.",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="The n-th image of the response gets seed + n. Default: random.",
    )
    num_images_per_prompt: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_PROMPT)
    scheduler: str | None = Field(default=None, max_length=64, description="One of GET /info's schedulers.")
    adapters: Adapters = Field(
        default=None,
        description=f'LoRA adapters and their scales, {{"NAME": scale}}: at most {MAX_ADAPTERS}, names from '
        f"GET /info, scales from {-MAX_ADAPTER_SCALE} to {MAX_ADAPTER_SCALE} (1: as trained).",
    )

    @field_validator("num_inference_steps")
    @classmethod
    def _within_operator_steps(cls, value: int, info: ValidationInfo) -> int:
        max_steps = _limits(info).max_steps
        if value > max_steps:
            raise _contract_error(f"num_inference_steps may be at most {max_steps} on this server")
        return value

    @field_validator("negative_prompt", "scheduler")
    @classmethod
    def _valid_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else check_text(value, f"parameters.{info.field_name}")

    @model_validator(mode="after")
    def _defaults_within_limits(self, info: ValidationInfo) -> ScoreParameters:
        if "num_inference_steps" not in self.model_fields_set:
            self.num_inference_steps = _limits(info).default_steps
        return self


class InputData(BaseModel):
    """A pandas-style table: ``columns`` names the fields of each row of ``data``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    columns: list[str] = Field(
        min_length=1, description='Must contain "prompt"; may add "negative_prompt", "seed".'
    )
    data: list[Any] = Field(
        min_length=1, description="Strings (one column), lists in column order, or objects keyed by column."
    )
    index: list[Any] | None = Field(default=None, description="Optional; when present, as long as data.")
    parameters: ScoreParameters = Field(default_factory=lambda: ScoreParameters())
    _rows: list[PromptRow] = PrivateAttr(default_factory=list)

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: list[str]) -> list[str]:
        unknown = [name for name in columns if name not in COLUMNS]
        if unknown or len(set(columns)) != len(columns) or PROMPT_COLUMN not in columns:
            raise _contract_error(
                'columns must contain "prompt" and may add "negative_prompt" and "seed", each once'
            )
        return columns

    @model_validator(mode="after")
    def _rows_fit(self, info: ValidationInfo) -> InputData:
        limits = _limits(info)
        if "parameters" not in self.model_fields_set:  # the defaults, under this server's limits
            self.parameters = ScoreParameters.model_validate({}, context={"limits": limits})
        if len(self.data) > limits.max_prompts:
            raise _contract_error(
                f"data has {len(self.data)} rows; this server takes at most {limits.max_prompts} per request"
            )
        if self.index is not None and len(self.index) != len(self.data):
            raise _contract_error(f"index has {len(self.index)} entries but data has {len(self.data)} rows")
        negative = self.parameters.negative_prompt
        if negative is not None and len(negative) > limits.max_prompt_chars:
            raise _contract_error(
                f"parameters.negative_prompt is longer than {limits.max_prompt_chars} characters"
            )
        self._rows = [self._row(position, raw) for position, raw in enumerate(self.data)]
        for position, row in enumerate(self._rows):
            for column, text in ((PROMPT_COLUMN, row.prompt), (NEGATIVE_PROMPT_COLUMN, row.negative_prompt)):
                if text is not None and len(text) > limits.max_prompt_chars:
                    raise _contract_error(
                        f"data[{position}].{column} is longer than {limits.max_prompt_chars} characters"
                    )
        return self

    @property
    def rows(self) -> list[PromptRow]:
        """``data`` normalised to rows (filled by validation)."""
        return self._rows

    def _row(self, position: int, raw: Any) -> PromptRow:
        # 1. Bring the three accepted shapes to one mapping column -> value.
        if isinstance(raw, str) and len(self.columns) == 1:
            values: dict[str, Any] = {PROMPT_COLUMN: raw}
        elif isinstance(raw, list) and len(raw) == len(self.columns):
            values = dict(zip(self.columns, raw, strict=True))
        elif isinstance(raw, dict) and set(raw) <= set(self.columns):
            values = raw
        else:
            raise _contract_error(
                f"data[{position}] must be a string (with one column), a list of {len(self.columns)} values "
                "in column order, or an object whose keys are among the columns"
            )
        # 2. Check each value's type; nothing is coerced.
        prompt = values.get(PROMPT_COLUMN)
        if not isinstance(prompt, str):
            raise _contract_error(f"data[{position}].prompt must be a string")
        check_text(prompt, f"data[{position}].prompt")
        negative = values.get(NEGATIVE_PROMPT_COLUMN)
        if negative is not None and not isinstance(negative, str):
            raise _contract_error(f"data[{position}].negative_prompt must be a string or null")
        if negative is not None:
            check_text(negative, f"data[{position}].negative_prompt")
        seed = values.get(SEED_COLUMN)
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
        ):
            raise _contract_error(f"data[{position}].seed must be an integer from 0 to {MAX_SEED}, or null")
        return PromptRow(prompt=prompt, negative_prompt=negative, seed=seed)


class ScoreRequest(BaseModel):
    """The body of ``POST /score``."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [SAMPLE_REQUEST]})

    input_data: InputData


class ImageRecord(BaseModel):
    """One generated image. With ``num_images_per_prompt`` k, each prompt has k records in a row."""

    prompt: str
    generated_image: str = Field(description="Base64 PNG (standard alphabet, padded, no data: prefix).")
    nsfw_content_detected: bool | None = Field(
        description="true: flagged and blacked out; null: the model has no safety checker."
    )
    seed: int = Field(description="Send it back (with num_images_per_prompt 1) to get the same image.")


class ErrorDetail(BaseModel):
    code: str = Field(description="snake_case, stable; match on it rather than on the message.")
    message: str
    status: int


class ErrorResponse(BaseModel):
    """The body of every non-2xx answer."""

    error: ErrorDetail


class InfoLimits(BaseModel):
    max_prompts: int
    max_prompt_chars: int
    max_steps: int
    max_images_per_prompt: int
    min_size: int
    max_size: int
    max_batch_size: int


class InfoEngine(BaseModel):
    """One engine of the server: one per device of SD_DEVICES, in the metrics' ``engine`` label order."""

    engine: str = Field(description='The metrics\' engine label: "0", "1", ...')
    device: str
    dtype: str
    running: int = Field(description="Images in its running set now.")
    max_running: int = Field(description="Its room now: SD_MAX_BATCH_SIZE, less after out of memory.")
    serving: bool = Field(description="false: taken out of rotation after failed steps.")
    failures: int = Field(description="Failed steps in a row (not out of memory).")


class InfoResponse(BaseModel):
    """``GET /info``: the loaded model, its engines and the request limits."""

    name: str
    architecture: str
    native_height: int
    native_width: int
    schedulers: list[str]
    default_scheduler: str
    safety_checker: bool
    random_weights: bool
    device: str
    dtype: str
    version: str
    limits: InfoLimits
    engines: list[InfoEngine] = Field(default_factory=list)
    adapters: list[str] = Field(default_factory=list, description="LoRA adapters requests may name.")


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
