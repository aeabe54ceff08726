"""The one place where wire types (schemas/) become engine types (model/) and back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from model.types import GenerationItem, GenerationResult, ModelInfo
from schemas.score import InputData
from service.runtime.errors import ContractError
from service.runtime.items import MAX_SEED, make_item, random_seed, seed_in_range


def to_items(input_data: InputData, info: ModelInfo) -> list[GenerationItem]:
    """One item per image, in response order: each row's images in a run, rows in input order.

    Seeds: a row's own seed s gives its images s, s+1, ...; otherwise the n-th image of the response
    gets base + n, where base is ``parameters.seed`` or one random number per request. With one
    image per prompt, row i gets base + i.
    """
    params = input_data.parameters
    if params.scheduler is not None and params.scheduler not in info.schedulers:
        # Checked here too (the engine would) so that the message does not repeat the client's text.
        raise ContractError(f"input_data.parameters.scheduler must be one of: {', '.join(info.schedulers)}")
    base_seed = params.seed if params.seed is not None else random_seed()
    per_prompt = params.num_images_per_prompt
    items: list[GenerationItem] = []
    for row in input_data.rows:
        for image in range(per_prompt):
            seed = (row.seed + image) if row.seed is not None else base_seed + len(items)
            if not seed_in_range(seed):
                raise ContractError(f"seed + image number must stay at most {MAX_SEED}; send a smaller seed")
            items.append(
                make_item(
                    info,
                    prompt=row.prompt,
                    seed=seed,
                    negative_prompt=row.negative_prompt or params.negative_prompt or "",
                    num_inference_steps=params.num_inference_steps,
                    guidance_scale=params.guidance_scale,
                    height=params.height,
                    width=params.width,
                    scheduler=params.scheduler,
                )
            )
    return items


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
