"""Hugging Face's text-to-image and image-to-image tasks (``POST /``, and ``POST /models/NAME`` for
the model NAME): the request to an Ask, and its error body ``{"error": message, "error_type":
code}`` (its clients show ``error``). The answer is the PNG's bytes."""

from __future__ import annotations

from typing import Any

from model.types import ModelInfo
from schemas.fields import DEFAULT_GUIDANCE
from schemas.huggingface import ImageToImageRequest, TextToImageRequest
from service.runtime.items import Ask, Picture, Prompt
from service.runtime.protocols.common import check_scheduler

PATH = "/"
MODELS_PREFIX = "/models/"  # POST /models/NAME: POST / with the model NAME (the Inference API's path)


def huggingface_ask(request: TextToImageRequest, info: ModelInfo) -> Ask:
    """Hugging Face's text-to-image task (``POST /``): one image."""
    params = request.parameters
    return Ask(
        prompts=(Prompt(request.inputs, params.negative_prompt or "", params.seed),),
        steps=params.num_inference_steps or 1,  # set by validation
        guidance=DEFAULT_GUIDANCE if params.guidance_scale is None else params.guidance_scale,
        height=params.height,
        width=params.width,
        scheduler=check_scheduler(params.scheduler_name, info, "parameters.scheduler"),
    )


def huggingface_image_ask(request: ImageToImageRequest, info: ModelInfo, image: bytes | None = None) -> Ask:
    """Hugging Face's image-to-image task (``POST /`` with an image): one image; ``image`` is the
    body's bytes when the client sent the image alone."""
    params = request.parameters
    size = params.target_size
    return Ask(
        prompts=(
            Prompt(
                params.prompt or "",
                params.negative_prompt or "",
                params.seed,
                Picture(image if image is not None else request.inputs, "inputs"),
            ),
        ),
        steps=params.num_inference_steps or 1,  # set by validation
        guidance=DEFAULT_GUIDANCE if params.guidance_scale is None else params.guidance_scale,
        height=size.height if size is not None else params.height,
        width=size.width if size is not None else params.width,
        scheduler=check_scheduler(params.scheduler_name, info, "parameters.scheduler"),
        strength=params.strength,
    )


def owns(path: str, method: str) -> bool:
    # GET / is Azure's readiness probe, in /score's shape; /models/NAME is the Inference API's path
    return (path == PATH and method == "POST") or path.startswith(MODELS_PREFIX)


def huggingface_error(status: int, code: str, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
    return status, {"error": message, "error_type": code}
