"""The one way to build a ``GenerationItem`` from request or job parameters, and the seed rules.

Online (service/runtime/convert.py) and batch (service/batch/params.py) both build their items
here, so that a default (native size, the model's own scheduler) means the same on every path.

Seeds: the engine's bound is ``model.types.MAX_SEED`` (schemas/score.py repeats the number for
the wire schema, which imports nothing from the project; a test keeps the two equal). Seeds the
service chooses itself (random per request, derived per batch row) are drawn below
``SEED_DRAW_RANGE`` so that people can read them and type them back.
"""

from __future__ import annotations

import secrets

from model.types import DEFAULT_SCHEDULER, MAX_SEED, GenerationItem, ModelInfo, adapter_set

SEED_DRAW_RANGE = 2**32

__all__ = ["MAX_SEED", "SEED_DRAW_RANGE", "make_item", "random_seed", "seed_in_range"]


def random_seed() -> int:
    return secrets.randbelow(SEED_DRAW_RANGE)


def seed_in_range(seed: int) -> bool:
    return not isinstance(seed, bool) and isinstance(seed, int) and 0 <= seed <= MAX_SEED


def make_item(
    info: ModelInfo,
    *,
    prompt: str,
    seed: int,
    negative_prompt: str,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    scheduler: str | None,
    adapters: dict[str, float] | None = None,
    eta: float = 0.0,
    clip_skip: int = 0,
) -> GenerationItem:
    """One item; None for height, width or scheduler means the model's own; ``adapters``: LoRA
    adapter names and scales; ``eta`` and ``clip_skip`` as ``GenerationItem`` reads them."""
    return GenerationItem(
        prompt=prompt,
        seed=seed,
        negative_prompt=negative_prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height or info.native_height,
        width=width or info.native_width,
        scheduler=scheduler or DEFAULT_SCHEDULER,  # the engine's name for the model's own
        adapters=adapter_set(adapters),
        eta=eta,
        clip_skip=clip_skip,
    )
