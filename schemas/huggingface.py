"""Hugging Face's text-to-image task on the wire: ``POST /`` with ``{"inputs", "parameters"}``, as
``huggingface_hub.InferenceClient(base_url=...).text_to_image`` and Inference Endpoints send it.

The parameters are /score's (same bounds, defaults and operator limits); ``scheduler`` takes this
server's names or the diffusers class names HF's clients send (``EulerDiscreteScheduler``...).
This module imports nothing outside ``schemas/``. Error messages never repeat what the client sent.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from schemas.score import ScoreLimits, ScoreParameters, check_text, steps_within_limit

# diffusers' class names (what HF's text-to-image parameters name) -> this server's schedulers
SCHEDULER_CLASSES = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpmsolver++",
    "UniPCMultistepScheduler": "unipc",
}
SAMPLE_TEXT_TO_IMAGE: dict[str, Any] = {
    "inputs": "a photograph of an astronaut riding a horse",
    "parameters": {"num_inference_steps": 30, "guidance_scale": 7.5, "seed": 42},
}


def _limits(info: ValidationInfo) -> ScoreLimits:
    limits = (info.context or {}).get("limits")
    return limits if isinstance(limits, ScoreLimits) else ScoreLimits()


def _as_on_score(name: str) -> Any:
    return ScoreParameters.model_fields[name]


class TextToImageParameters(BaseModel):
    """HF's text-to-image parameters; ``null`` means the default, as the client sends unset ones."""

    model_config = ConfigDict(extra="forbid", strict=True)

    negative_prompt: str | None = _as_on_score("negative_prompt")
    height: int | None = _as_on_score("height")
    width: int | None = _as_on_score("width")
    num_inference_steps: int | None = Field(
        default=None, ge=1, le=150, description="Default: 50 (or the server's max)."
    )
    guidance_scale: float | None = Field(
        default=None, ge=0, le=30, allow_inf_nan=False, description="Default: 7.5."
    )
    scheduler: str | None = Field(
        default=None, max_length=64, description="A GET /info scheduler or its diffusers class name."
    )
    seed: int | None = _as_on_score("seed")

    @field_validator("negative_prompt", "scheduler")
    @classmethod
    def _valid_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if info.field_name == "negative_prompt" and len(value) > _limits(info).max_prompt_chars:
            raise PydanticCustomError(
                "contract", f"is longer than {_limits(info).max_prompt_chars} characters"
            )
        return check_text(value, f"parameters.{info.field_name}")

    @field_validator("num_inference_steps")
    @classmethod
    def _within_operator_steps(cls, value: int | None, info: ValidationInfo) -> int | None:
        return None if value is None else steps_within_limit(value, info)

    @property
    def scheduler_name(self) -> str | None:
        return SCHEDULER_CLASSES.get(self.scheduler or "", self.scheduler)


class TextToImageRequest(BaseModel):
    """The body of ``POST /``."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [SAMPLE_TEXT_TO_IMAGE]}
    )

    inputs: str = Field(description="The prompt.")
    parameters: TextToImageParameters = Field(default_factory=TextToImageParameters)

    @field_validator("inputs")
    @classmethod
    def _prompt(cls, value: str, info: ValidationInfo) -> str:
        if len(value) > _limits(info).max_prompt_chars:
            raise PydanticCustomError(
                "contract", f"is longer than {_limits(info).max_prompt_chars} characters"
            )
        return check_text(value, "inputs")

    @model_validator(mode="after")
    def _steps_default(self, info: ValidationInfo) -> TextToImageRequest:
        if self.parameters.num_inference_steps is None:
            self.parameters.num_inference_steps = _limits(info).default_steps
        return self
