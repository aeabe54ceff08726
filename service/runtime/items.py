"""The one way to build a ``GenerationItem`` from request or job parameters, and the seed rules.

Online (service/runtime/convert.py, one mapping per protocol) and batch (service/batch/params.py)
both describe a request as an ``Ask`` and build its items here, so that a default (native size,
the model's own scheduler) and the seed numbering mean the same on every path.

Seeds: the engine's bound is ``model.types.MAX_SEED`` (schemas/score.py repeats the number for
the wire schema, which imports nothing from the project; a test keeps the two equal). Seeds the
service chooses itself (random per request, derived per batch row) are drawn below
``SEED_DRAW_RANGE`` so that people can read them and type them back.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model.types import DEFAULT_SCHEDULER, MAX_SEED, GenerationItem, ModelInfo, adapter_set

SEED_DRAW_RANGE = 2**32

__all__ = ["MAX_SEED", "SEED_DRAW_RANGE", "Ask", "Prompt", "random_seed", "seed_in_range"]


def random_seed() -> int:
    return secrets.randbelow(SEED_DRAW_RANGE)


def seed_in_range(seed: int) -> bool:
    return not isinstance(seed, bool) and isinstance(seed, int) and 0 <= seed <= MAX_SEED


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its text, its negative prompt, and its own seed (its images get
    seed, seed + 1, ...; None: the request's numbering)."""

    text: str
    negative: str = ""
    seed: int | None = None


@dataclass(frozen=True)
class Ask:
    """What one request asks of the engine, whatever protocol it came in. Each protocol maps its
    own schema to this once (service/runtime/convert.py), and ``items`` is the one place where a
    ``GenerationItem``'s fields are spelled. None for height, width or scheduler: the model's own."""

    prompts: tuple[Prompt, ...]
    steps: int
    guidance: float
    per_prompt: int = 1  # images per prompt
    seed: int | None = None  # the request's base: its n-th image gets seed + n (None: one drawn)
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None  # the engine's name, checked against the model already
    adapters: Mapping[str, float] | None = None  # LoRA adapter names and scales
    eta: float = 0.0
    clip_skip: int = 0

    @classmethod
    def of(cls, fields: Any, prompts: tuple[Prompt, ...], **given: Any) -> Ask:
        """From a request or parameters object that names its fields as schemas/fields.py does
        (num_inference_steps, guidance_scale, height, width, and seed and adapters where it has
        them); ``given`` sets the rest (scheduler, images per prompt) or overrides."""
        common = {
            "steps": fields.num_inference_steps,
            "guidance": fields.guidance_scale,
            "height": fields.height,
            "width": fields.width,
            "seed": getattr(fields, "seed", None),
            "adapters": getattr(fields, "adapters", None),
        }
        return cls(prompts=prompts, **{**common, **given})

    def items(self, info: ModelInfo) -> list[GenerationItem]:
        """One item per image, in response order: each prompt's images in a run, prompts in order.
        A prompt's own seed s gives its images s, s+1, ...; otherwise the n-th image of the request
        gets base + n (with one image per prompt, prompt i gets base + i)."""
        base = self.seed if self.seed is not None else random_seed()
        items: list[GenerationItem] = []
        for prompt in self.prompts:
            for image in range(self.per_prompt):
                seed = prompt.seed + image if prompt.seed is not None else base + len(items)
                items.append(
                    GenerationItem(
                        prompt=prompt.text,
                        seed=seed,
                        negative_prompt=prompt.negative,
                        num_inference_steps=self.steps,
                        guidance_scale=self.guidance,
                        height=self.height or info.native_height,
                        width=self.width or info.native_width,
                        scheduler=self.scheduler
                        or DEFAULT_SCHEDULER,  # the engine's name for the model's own
                        adapters=adapter_set(self.adapters),
                        eta=self.eta,
                        clip_skip=self.clip_skip,
                    )
                )
        return items
