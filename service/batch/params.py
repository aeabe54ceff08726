"""The generation parameters of a job, and each row's seed.

Parameters use the Azure ML model-catalog names (num_inference_steps, guidance_scale, height,
width, scheduler, seed, strength) in ``--params FILE.json``; command-line flags override the file.
``strength`` applies to rows with an image (None: 0.8 for image to image, 1.0 with a mask).

Seeds: a row's own ``seed`` wins. Otherwise the seed is derived from (job seed, input file, row)
by a hash, so it depends on nothing else (not on other files, their order or row counts): a
resumed or re-split job reproduces every image. The job seed is ``--seed``, or else one drawn at
random when the job starts and kept in job.json (service/batch/plan.py), which a resume reuses; so
two jobs over files of the same names draw different images unless they are given the same seed.
Jobs started before job seeds existed have none in job.json; they keep deriving without one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config

from schemas.fields import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    Adapters,
    BatchSide,
    Guidance,
    Name,
    ScoreLimits,
    Seed,
    Steps,
    Strength,
    describe_problem,
)
from service.batch.errors import BatchConfigError
from service.runtime.items import MAX_SEED as MAX_SEED
from service.runtime.items import SEED_DRAW_RANGE, Ask, Picture, Prompt

if TYPE_CHECKING:
    from model.types import GenerationItem, ModelInfo

# pydantic's type errors in the words of the batch command's other messages
_KINDS = {"int_type": "an integer", "float_type": "a number", "string_type": "a string"}
_ADAPTERS_OBJECT = 'adapters must be an object of adapter names and scales, {"NAME": 0.8}'
_ADAPTERS_NUMBERS = 'adapters must map adapter names to numbers: {"NAME": 0.8}'


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True)
class JobParams:
    """What every row of a job shares. None means the model's default (native size, scheduler).

    The fields are the online routes' (schemas/fields.py) but for the sizes: a job owns its device."""

    num_inference_steps: Steps = DEFAULT_STEPS
    guidance_scale: Guidance = DEFAULT_GUIDANCE
    height: BatchSide | None = None
    width: BatchSide | None = None
    scheduler: Name | None = None
    seed: Seed | None = None
    adapters: Adapters = None  # LoRA adapters of SD_ADAPTERS and their scales
    strength: Strength | None = None  # rows with an image; None: diffusers' default (0.8; 1 with a mask)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str) -> JobParams:
        """Parameters from a JSON object (null: the default); errors name ``source``."""
        known = {field.name for field in dataclasses.fields(cls)}
        given = {name: value for name, value in data.items() if value is not None or name not in known}
        try:
            return _FIELDS.validate_python(given)
        except ValidationError as error:
            raise BatchConfigError(f"{source}: {_problem(error)}") from None

    @classmethod
    def from_file(cls, text: str, source: str) -> JobParams:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise BatchConfigError(f"{source} is not valid JSON ({error}); write one JSON object") from error
        except RecursionError as error:
            raise BatchConfigError(f"{source} is nested too deeply; write one flat JSON object") from error
        except ValueError as error:  # Python converts integers of at most 4,300 digits
            raise BatchConfigError(
                f"{source} holds an integer of more than 4,300 digits; give numbers of usual size"
            ) from error
        if not isinstance(data, dict):
            raise BatchConfigError(f"{source} must hold one JSON object of parameters")
        return cls.from_mapping(data, source)

    def replace(self, **changes: Any) -> JobParams:
        """A copy with the given (non-None) values changed."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def check(self, max_steps: int) -> None:
        """Reject values no engine accepts (flags are typed by the command line, not checked),
        before loading anything."""
        try:
            _FIELDS.validate_python(self.as_dict(), context={"limits": ScoreLimits(max_steps=max_steps)})
        except ValidationError as error:
            raise BatchConfigError(_problem(error)) from None
        if self.scheduler is not None and not self.scheduler.strip():
            raise BatchConfigError("scheduler must not be empty; omit it for the model's default")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, info: ModelInfo) -> dict[str, Any]:
        """The parameters actually used with this model (defaults filled in), for the summary."""
        return {
            **self.as_dict(),
            "height": self.height or info.native_height,
            "width": self.width or info.native_width,
            "scheduler": self.scheduler or info.default_scheduler,
        }

    def item(
        self, prompt: str, negative_prompt: str, seed: int, info: ModelInfo, picture: Picture | None = None
    ) -> GenerationItem:
        """A row's item; with a ``picture`` it is decoded here (ImageInputError when it is bad)."""
        prompts = (Prompt(prompt, negative_prompt, seed, picture),)
        return Ask.of(self, prompts, scheduler=self.scheduler, strength=self.strength).items(info)[0]


def derive_seed(input_file: str, row: int, job_seed: int | None) -> int:
    """The seed of a row without its own: a hash of (job seed, input file, row), in [0, 2**32)."""
    text = f"{'' if job_seed is None else job_seed}\x00{input_file}\x00{row}"
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % SEED_DRAW_RANGE


_FIELDS = TypeAdapter(JobParams)


def _problem(error: ValidationError) -> str:
    """The first problem of ``error`` in one line (all the unknown names, when there are some)."""
    details = error.errors(include_url=False, include_input=False, include_context=False)
    unknown = sorted(str(d["loc"][0]) for d in details if d["type"] == "unexpected_keyword_argument")
    if unknown:
        allowed = ", ".join(sorted(field.name for field in dataclasses.fields(JobParams)))
        return f"unknown parameter(s) {', '.join(unknown)}; allowed: {allowed}"
    detail = details[0]
    name, kind = str(detail["loc"][0]), _KINDS.get(detail["type"])
    if name == "adapters" and (kind or detail["type"] == "dict_type"):
        return _ADAPTERS_NUMBERS if len(detail["loc"]) > 1 else _ADAPTERS_OBJECT
    return f"{name} must be {kind}" if kind else describe_problem(detail)
