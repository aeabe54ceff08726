"""The generation parameters of a job, and each row's seed.

Parameters use the Azure ML model-catalog names (num_inference_steps, guidance_scale, height,
width, scheduler, seed) in ``--params FILE.json``; command-line flags override the file.

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
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from schemas.score import BATCH_MAX_SIZE, BATCH_MIN_SIZE, MAX_ADAPTER_SCALE, SIZE_MULTIPLE
from service.batch.errors import BatchConfigError
from service.runtime.items import MAX_SEED, SEED_DRAW_RANGE, make_item, seed_in_range

if TYPE_CHECKING:
    from model.types import GenerationItem, ModelInfo


@dataclass(frozen=True)
class JobParams:
    """What every row of a job shares. None means the model's default (native size, scheduler)."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    seed: int | None = None
    adapters: dict[str, float] | None = None  # LoRA adapters of SD_ADAPTERS and their scales

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str) -> JobParams:
        """Parameters from a JSON object; unknown keys and wrong types are errors naming ``source``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BatchConfigError(
                f"{source}: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for name, value in data.items():
            if value is None:
                continue
            expected: tuple[type, ...] = {
                "guidance_scale": (int, float),
                "scheduler": (str,),
                "adapters": (dict,),
            }.get(name, (int,))
            if isinstance(value, bool) or not isinstance(value, expected):
                raise BatchConfigError(f"{source}: {name} must be {_kind(expected)}, got {value!r}")
            values[name] = (
                float(value) if name == "guidance_scale" and isinstance(value, int | float) else value
            )
        return cls(**values)

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
        """Reject values no engine accepts, before loading anything."""
        if not 1 <= self.num_inference_steps <= max_steps:
            raise BatchConfigError(f"steps must be between 1 and {max_steps}, got {self.num_inference_steps}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise BatchConfigError(f"guidance must be a finite number >= 0, got {self.guidance_scale}")
        for side, value in (("height", self.height), ("width", self.width)):
            if value is not None and not (
                BATCH_MIN_SIZE <= value <= BATCH_MAX_SIZE and value % SIZE_MULTIPLE == 0
            ):
                raise BatchConfigError(
                    f"{side} must be a multiple of {SIZE_MULTIPLE} between {BATCH_MIN_SIZE} and "
                    f"{BATCH_MAX_SIZE}, got {value}"
                )
        if self.seed is not None and not seed_in_range(self.seed):
            raise BatchConfigError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.scheduler is not None and not self.scheduler.strip():
            raise BatchConfigError("scheduler must not be empty; omit it for the model's default")
        for name, scale in (self.adapters or {}).items():
            if not isinstance(name, str) or isinstance(scale, bool) or not isinstance(scale, int | float):
                raise BatchConfigError('adapters must map adapter names to numbers: {"NAME": 0.8}')
            if not math.isfinite(scale) or abs(scale) > MAX_ADAPTER_SCALE:
                raise BatchConfigError(
                    f"adapter {name}'s scale must be a finite number from {-MAX_ADAPTER_SCALE} to "
                    f"{MAX_ADAPTER_SCALE}, got {scale}"
                )

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

    def item(self, prompt: str, negative_prompt: str, seed: int, info: ModelInfo) -> GenerationItem:
        return make_item(
            info,
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            scheduler=self.scheduler,
            adapters=self.adapters,
        )


def derive_seed(input_file: str, row: int, job_seed: int | None) -> int:
    """The seed of a row without its own: a hash of (job seed, input file, row), in [0, 2**32)."""
    text = f"{'' if job_seed is None else job_seed}\x00{input_file}\x00{row}"
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % SEED_DRAW_RANGE


def _kind(types: tuple[type, ...]) -> str:
    if types == (int,):
        return "an integer"
    if types == (dict,):
        return 'an object of adapter names and scales, {"NAME": 0.8}'
    return "a string" if types == (str,) else "a number"
