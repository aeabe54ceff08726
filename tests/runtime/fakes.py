"""A fake engine for the runtime's unit tests: instant, recording, failing on demand."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from model.errors import EngineFailure, EngineOutOfMemoryError
from model.types import GenerationItem, GenerationResult, ModelInfo

INFO = ModelInfo(
    name="fake",
    architecture="fake",
    native_height=8,
    native_width=8,
    schedulers=("default",),
    default_scheduler="pndm",
    safety_checker=True,
    device="cpu",
    dtype="fp32",
    random_weights=True,
)


class FakeEngine:
    """Each image is filled with its seed (mod 256), so a result shows which item it belongs to.

    ``max_rows``: a batch larger than this runs out of memory. ``fail_prompts``: a batch holding
    one of them fails as a whole. ``flag_prompts``: flagged (the image black, as the engine does).
    ``gate``: when set, each batch waits for it (to hold the engine busy).
    """

    def __init__(self, max_rows: int | None = None) -> None:
        self.max_rows = max_rows
        self.fail_prompts: set[str] = set()
        self.flag_prompts: set[str] = set()
        self.batches: list[list[GenerationItem]] = []
        self.gate: threading.Event | None = None
        self.closed = False

    @property
    def info(self) -> ModelInfo:
        return INFO

    def validate(self, items: Sequence[GenerationItem]) -> None:
        pass

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        if self.gate is not None:
            self.gate.wait(30)
        self.batches.append(list(items))
        if self.max_rows is not None and len(items) > self.max_rows:
            raise EngineOutOfMemoryError(f"{len(items)} rows do not fit")
        if any(item.prompt in self.fail_prompts for item in items):
            raise EngineFailure("the device failed")
        results = []
        for item in items:
            flagged = item.prompt in self.flag_prompts
            image = np.full((8, 8, 3), 0 if flagged else item.seed % 256, dtype=np.uint8)
            results.append(GenerationResult(image=image, nsfw_content_detected=flagged, seed=item.seed))
        return results

    def warmup(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def item(prompt: str = "p", seed: int = 0, steps: int = 2) -> GenerationItem:
    return GenerationItem(prompt=prompt, seed=seed, num_inference_steps=steps, height=8, width=8)
