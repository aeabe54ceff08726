"""Hugging Face's text-to-image task on the wire: ``POST /`` with ``{"inputs", "parameters"}``, as
``huggingface_hub.InferenceClient(base_url=...).text_to_image`` and Inference Endpoints send it.

The parameters are the definitions every route shares (schemas/fields.py), under the same operator
limits; ``scheduler`` takes this server's names or the diffusers class names HF's clients send
(``EulerDiscreteScheduler``...).
This module imports nothing outside ``schemas/``. Error messages never repeat what the client sent.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from schemas.fields import Guidance, ImageIn, Name, Prompt, Seed, Side, Steps, Strength, limits_of

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


class TextToImageParameters(BaseModel):
    """HF's text-to-image parameters; ``null`` means the default, as the client sends unset ones."""

    model_config = ConfigDict(extra="forbid", strict=True)

    negative_prompt: Prompt | None = Field(default=None, description="What to draw away from.")
    height: Side | None = Field(default=None, description="Default: the model's native.")
    width: Side | None = Field(default=None, description="Default: the model's native.")
    num_inference_steps: Steps | None = Field(default=None, description="Default: 50 (or the server's max).")
    guidance_scale: Guidance | None = Field(default=None, description="Default: 7.5.")
    scheduler: Name | None = Field(
        default=None, description="A GET /info scheduler or its diffusers class name."
    )
    seed: Seed | None = Field(default=None, description="Default: random.")

    @property
    def scheduler_name(self) -> str | None:
        return SCHEDULER_CLASSES.get(self.scheduler or "", self.scheduler)


class TextToImageRequest(BaseModel):
    """The body of ``POST /``."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [SAMPLE_TEXT_TO_IMAGE]}
    )

    inputs: Prompt = Field(description="The prompt.")
    parameters: TextToImageParameters = Field(default_factory=TextToImageParameters)

    @model_validator(mode="after")
    def _steps_default(self, info: ValidationInfo) -> TextToImageRequest:
        if self.parameters.num_inference_steps is None:  # none given, or null: the server's default
            self.parameters.num_inference_steps = limits_of(info).default_steps
        return self


# How the base64 of each image format accepted begins (PNG, JPEG, GIF, WebP, BMP, TIFF): an
# ``inputs`` that starts so is an image (InferenceClient.image_to_image), never a prompt.
_IMAGE_BASE64_STARTS = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "Qk", "SUkq", "TU0A", "data:image/")


def looks_like_image(inputs: Any) -> bool:
    """Whether a body's ``inputs`` is an image's base64 rather than a prompt."""
    return (
        isinstance(inputs, str)
        and inputs.lstrip().startswith(_IMAGE_BASE64_STARTS)
        and " " not in inputs[:64]
    )


class TargetSize(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    width: Side
    height: Side


class ImageToImageParameters(TextToImageParameters):
    """HF's image-to-image parameters (``InferenceClient.image_to_image``): the prompt is here."""

    prompt: Prompt | None = Field(default=None, description="What to draw.")
    target_size: TargetSize | None = Field(default=None, description="Default: the image's own size.")
    strength: Strength | None = Field(default=None, description="The share of the steps run; default 0.8.")


class ImageToImageRequest(BaseModel):
    """The body of ``POST /`` with an image: its base64 as ``inputs`` (or the image's bytes as the
    whole body, which the client sends when it has no parameters)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: ImageIn = Field(description="The image: base64 (a data: prefix allowed).")
    parameters: ImageToImageParameters = Field(default_factory=ImageToImageParameters)

    @model_validator(mode="after")
    def _steps_default(self, info: ValidationInfo) -> ImageToImageRequest:
        if self.parameters.num_inference_steps is None:
            self.parameters.num_inference_steps = limits_of(info).default_steps
        return self
