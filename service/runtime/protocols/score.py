"""Azure ML's model-catalog contract, ``POST /score`` (and the Azure ML entry script): its table of
rows to an Ask, its answer (one record per image) and its error body."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from model.types import GenerationItem, GenerationResult, ModelInfo
from schemas.score import InputData, PromptRow
from service.runtime.items import Ask, Picture, Prompt
from service.runtime.protocols.common import check_scheduler

MODEL_FIELD = "input_data.parameters.model"


def score_ask(input_data: InputData, info: ModelInfo) -> Ask:
    """/score's rows and parameters; a row's own seed and negative prompt win over the parameters'."""
    params = input_data.parameters
    negative = params.negative_prompt or ""
    prompts = tuple(
        Prompt(row.prompt, row.negative_prompt or negative, row.seed, _row_picture(row, position))
        for position, row in enumerate(input_data.rows)
    )
    scheduler = check_scheduler(params.scheduler, info, "input_data.parameters.scheduler")
    return Ask.of(
        params,
        prompts,
        per_prompt=params.num_images_per_prompt,
        scheduler=scheduler,
        strength=params.strength,
        model=params.model or None,
        model_field=MODEL_FIELD,
    )


def _row_picture(row: PromptRow, position: int) -> Picture | None:
    """A /score row's image and mask (Azure's inpainting and image-to-image contracts)."""
    if not row.image:
        return None
    where = f"input_data.data[{position}]"
    return Picture(row.image, f"{where}.image", row.mask_image or None, f"{where}.mask_image")


def to_records(
    items: Sequence[GenerationItem], results: Sequence[GenerationResult], images_base64: Sequence[str]
) -> list[dict[str, Any]]:
    """The response body: one record per image, in the order of ``items``."""
    return [
        {
            "prompt": item.prompt,
            "generated_image": image,
            "nsfw_content_detected": result.nsfw_content_detected,
            "seed": result.seed,
        }
        for item, result, image in zip(items, results, images_base64, strict=True)
    ]


def score_error(status: int, code: str, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
    """``{"error": {"code", "message", "status"}}``: the body of every non-2xx answer but the other
    clients' (and of everything that is no client's route)."""
    return status, {"error": {"code": code, "message": message, "status": status}}
