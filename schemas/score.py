"""The online scoring contract: Azure ML's model-catalog ``input_data`` request and its image list reply.

The fields are the definitions every route shares (schemas/fields.py: types, static bounds the
OpenAPI schema shows, text checks). Limits an operator sets (rows per request, prompt length, a lower
step cap) arrive as the validation context (see ``ScoreLimits``), so the same model serves any
configuration.

Error messages never repeat what the client sent: they name the place and the rule.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, model_validator

from schemas.fields import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    Adapters,
    Guidance,
    ImageCount,
    ImageIn,
    ModelName,
    Name,
    Prompt,
    Seed,
    Side,
    Steps,
    StepsWithinLimit,
    Strength,
    contract_error,
    limits_of,
    seeds_fit,
)

# The field definitions and limits every route shares; the names below stay importable from here.
from schemas.fields import MAX_ADAPTER_SCALE as MAX_ADAPTER_SCALE
from schemas.fields import MAX_ADAPTERS as MAX_ADAPTERS
from schemas.fields import MAX_IMAGES_PER_PROMPT as MAX_IMAGES_PER_PROMPT
from schemas.fields import MAX_SEED as MAX_SEED
from schemas.fields import MAX_SIZE as MAX_SIZE
from schemas.fields import MIN_SIZE as MIN_SIZE
from schemas.fields import ScoreLimits as ScoreLimits

PROMPT_COLUMN = "prompt"
NEGATIVE_PROMPT_COLUMN = "negative_prompt"
SEED_COLUMN = "seed"
# Images in (Azure's inpainting and image-to-image contracts): base64 of the file, or a URL.
IMAGE_COLUMN, MASK_COLUMN = "image", "mask_image"
# Azure's catalog cards list a column "mask" while their rows say "mask_image": the same column.
MASK_ALIAS = "mask"
COLUMNS = (PROMPT_COLUMN, NEGATIVE_PROMPT_COLUMN, SEED_COLUMN, IMAGE_COLUMN, MASK_COLUMN)

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


class PromptRow(BaseModel):
    """One row of ``data``, whichever of its three accepted shapes it came in."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: Prompt
    negative_prompt: Prompt | None = None
    seed: Seed | None = None
    # image to image, or inpainting with a mask (white: repaint, black: keep); null or "" (a
    # table's empty cell): none, so that text rows and image rows can share a table
    image: ImageIn | None = None
    mask_image: ImageIn | None = None

    @model_validator(mode="after")
    def _mask_has_image(self) -> PromptRow:
        if self.mask_image and not self.image:
            raise contract_error(
                "mask_image marks what to repaint of an image: add the image column (base64 or URL)"
            )
        return self


class ScoreParameters(StepsWithinLimit):
    """Generation parameters shared by every row of the request. All optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    num_inference_steps: Steps = Field(
        default=DEFAULT_STEPS,
        description=f"Denoising steps. Default: {DEFAULT_STEPS}, or the server's maximum when lower.",
    )
    guidance_scale: Guidance = Field(
        default=DEFAULT_GUIDANCE, description="Classifier-free guidance; 1 or less turns it off."
    )
    negative_prompt: Prompt | None = Field(
        default=None, description="Negative prompt for rows without their own."
    )
    height: Side | None = Field(default=None, description="Default: the model's native.")
    width: Side | None = Field(default=None, description="Default: the model's native.")
    seed: Seed | None = Field(
        default=None, description="The n-th image of the response gets seed + n. Default: random."
    )
    num_images_per_prompt: ImageCount = 1
    scheduler: Name | None = Field(default=None, description="One of GET /info's schedulers.")
    strength: Strength | None = Field(
        default=None,
        description="Rows with an image: the share of the schedule to run (1: repaint from noise). "
        "Default: 0.8, or 1 with a mask_image (diffusers' defaults).",
    )
    adapters: Adapters = Field(
        default=None,
        description=f'LoRA adapters and their scales, {{"NAME": scale}}: at most {MAX_ADAPTERS}, names from '
        f"GET /info, scales from {-MAX_ADAPTER_SCALE} to {MAX_ADAPTER_SCALE} (1: as trained).",
    )
    model: ModelName | None = Field(
        default=None,
        description="The model to draw with: a name GET /info's models lists. Default: the default one.",
    )


# What the OpenAPI schema shows for ``data``: the three shapes a row may take.
_ROWS_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {"anyOf": [{"type": "string"}, {"type": "array"}, {"type": "object"}]},
    "description": "Strings (one column), lists in column order, or objects keyed by column.",
}


class InputData(BaseModel):
    """A pandas-style table: ``columns`` names the fields of each row of ``data``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    columns: list[str] = Field(
        min_length=1,
        description='Must contain "prompt"; may add "negative_prompt", "seed", and "image" and '
        '"mask_image" (base64 PNG/JPEG, or a URL of a host SD_FETCH_IMAGE_URLS names).',
    )
    data: Annotated[list[PromptRow], WithJsonSchema(_ROWS_SCHEMA)] = Field(min_length=1)
    index: list[Any] | None = Field(default=None, description="Optional; when present, as long as data.")
    parameters: ScoreParameters = Field(default_factory=lambda: ScoreParameters())

    @model_validator(mode="before")
    @classmethod
    def _rows_as_objects(cls, value: Any, info: ValidationInfo) -> Any:
        """Each row of ``data`` as the object of its columns, so that one row type checks them all;
        the row count first, so that no more rows than the server takes are read."""
        if not isinstance(value, dict) or not isinstance(value.get("columns"), list):
            return value  # the fields' own types say what is wrong
        columns, data = _mask_named_once(value["columns"]), value.get("data")
        value = {**value, "columns": columns}
        if columns and (
            not all(isinstance(name, str) and name in COLUMNS for name in columns)
            or len(set(columns)) != len(columns)
            or PROMPT_COLUMN not in columns
        ):
            raise contract_error(
                'columns must contain "prompt" and may add "negative_prompt", "seed", "image" and '
                '"mask_image", each once'
            )
        if not columns or not isinstance(data, list):
            return value
        max_prompts = limits_of(info).max_prompts
        if len(data) > max_prompts:
            raise contract_error(
                f"data has {len(data)} rows; this server takes at most {max_prompts} per request"
            )
        return {**value, "data": [_row_object(position, raw, columns) for position, raw in enumerate(data)]}

    @model_validator(mode="after")
    def _rows_fit(self, info: ValidationInfo) -> InputData:
        if "parameters" not in self.model_fields_set:  # the defaults, under this server's limits
            self.parameters = ScoreParameters.model_validate({}, context=info.context)
        if self.index is not None and len(self.index) != len(self.data):
            raise contract_error(f"index has {len(self.index)} entries but data has {len(self.data)} rows")
        # The n-th image of the response gets parameters.seed + n, unless its row has a seed.
        per_prompt, base = self.parameters.num_images_per_prompt, self.parameters.seed
        for position, row in enumerate(self.data):
            first, images = (
                (row.seed, per_prompt) if row.seed is not None else (base, (position + 1) * per_prompt)
            )
            if first is not None and not seeds_fit(first, images):
                raise contract_error(f"seed + image number must stay at most {MAX_SEED}; send a smaller seed")
        return self

    @property
    def rows(self) -> list[PromptRow]:
        """``data``'s rows, each with its prompt, negative prompt and seed."""
        return self.data


def _mask_named_once(columns: list[Any]) -> list[Any]:
    """The columns with Azure's "mask" spelled "mask_image", as its rows spell it."""
    return [MASK_COLUMN if name == MASK_ALIAS else name for name in columns]


def _row_object(position: int, raw: Any, columns: list[str]) -> Any:
    """One row of ``data`` (a string with one column, a list in column order, or an object keyed
    by column) as the object of its columns."""
    if isinstance(raw, str) and len(columns) == 1:
        return {PROMPT_COLUMN: raw}
    if isinstance(raw, list) and len(raw) == len(columns):
        return dict(zip(columns, raw, strict=True))
    if isinstance(raw, dict) and MASK_ALIAS in raw and MASK_COLUMN not in raw:
        raw = {(MASK_COLUMN if key == MASK_ALIAS else key): cell for key, cell in raw.items()}
    if isinstance(raw, dict) and set(raw) <= set(columns):
        return raw
    raise contract_error(
        f"data[{position}] must be a string (with one column), a list of {len(columns)} values "
        "in column order, or an object whose keys are among the columns"
    )


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


class InfoModel(BaseModel):
    """One model requests may name (SD_MODEL's, then SD_MODELS' library), read without loading it."""

    name: str = Field(description="What requests name it by (parameters.model, OpenAI's model, ...).")
    architecture: str
    inpainting: bool = Field(description="true: a 9-channel inpainting model.")
    native_height: int
    native_width: int
    default: bool = Field(description="true: the model of requests that name none.")
    engines: list[int] = Field(description="The engines (GET /info engines) whose device holds it now.")


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
    models: list[InfoModel] = Field(
        default_factory=list, description="The models requests may name, the default first."
    )
