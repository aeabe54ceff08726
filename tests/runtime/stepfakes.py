"""A fake step engine for the step loop's unit tests: each image needs its own number of steps,
a step costs nothing (or waits on a gate), and failures are injected by prompt or by size."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.errors import EngineFailure, EngineOutOfMemoryError, InvalidRequestError
from model.types import GenerationItem, GenerationResult
from service.settings import Settings
from tests.runtime.fakes import FakeEngine


@dataclass
class _Running:
    item: GenerationItem
    done: int = 0


class FakeStepEngine(FakeEngine):
    """``max_rows``: a step with more running images runs out of memory. ``fail_prompts``: a step
    holding one fails. ``refuse_prompts``: admit refuses them. ``steps`` records the running set of
    every step that happened (by seed); ``gate`` holds each step."""

    def __init__(self, max_rows: int | None = None) -> None:
        super().__init__(max_rows)
        self.refuse_prompts: set[str] = set()
        self.undecodable: set[str] = set()
        self.running: dict[int, _Running] = {}
        self.steps: list[list[int]] = []
        self.cancelled: list[int] = []
        self.step_started = threading.Semaphore(0)
        self._next = 0

    def admit(self, item: GenerationItem) -> int:
        if item.prompt in self.refuse_prompts:
            raise InvalidRequestError("this engine cannot take that prompt")
        self._next += 1
        self.running[self._next] = _Running(item)
        return self._next

    def step(self, only: Collection[int] | None = None) -> list[int]:
        """Every running image one step, or those of ``only`` (the others pause)."""
        self.step_started.release()
        if self.gate is not None:
            self.gate.wait(30)
        stepping = {h: r for h, r in self.running.items() if only is None or h in only}
        items = [r.item for r in stepping.values()]
        if self.max_rows is not None and len(items) > self.max_rows:
            raise EngineOutOfMemoryError(f"{len(items)} images do not fit")
        if any(item.prompt in self.fail_prompts for item in items):
            raise EngineFailure("the device failed")
        self.steps.append(sorted(item.seed for item in items))
        finished = []
        for handle, running in stepping.items():
            running.done += 1
            if running.done >= running.item.num_inference_steps:
                finished.append(handle)
        return finished

    def retire(self, handles: Sequence[int]) -> list[GenerationResult]:
        if any(self.running[h].item.prompt in self.undecodable for h in handles):
            raise EngineFailure("the decoder produced NaN")  # like the real engine: the handles stay
        results = []
        for handle in handles:
            item = self.running.pop(handle).item
            image = np.full((8, 8, 3), item.seed % 256, dtype=np.uint8)
            results.append(GenerationResult(image=image, nsfw_content_detected=False, seed=item.seed))
        return results

    def cancel(self, handle: int) -> None:
        if self.running.pop(handle, None) is not None:
            self.cancelled.append(handle)


class ThreadRecording(FakeStepEngine):
    """Records the thread of its load and of every later call to it, and torch's CPU thread
    count in each of those calls."""

    def __init__(self, device: str | None) -> None:
        super().__init__()
        self.device = device
        self.threads = {("load", threading.get_ident())}
        self.cpu_threads = {torch.get_num_threads()}

    def _saw(self, call: str) -> None:
        self.threads.add((call, threading.get_ident()))
        self.cpu_threads.add(torch.get_num_threads())

    def warmup(self) -> None:
        self._saw("warmup")

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        self._saw("generate")
        return super().generate(items)

    def admit(self, item: GenerationItem) -> int:
        self._saw("admit")
        return super().admit(item)

    def step(self, only: Collection[int] | None = None) -> list[int]:
        self._saw("step")
        return super().step(only)

    def retire(self, handles: Sequence[int]) -> list[GenerationResult]:
        self._saw("retire")
        return super().retire(handles)


async def serve_six_images(settings: Settings) -> list[ThreadRecording]:
    """A Lifecycle on ``settings`` (whose load_serving_engine the caller patched to give ThreadRecording
    engines) serves six 3-step images in seed order, stops, and hands back its engines."""
    from service.runtime.lifecycle import Lifecycle
    from service.runtime.metrics import Metrics
    from tests.runtime.fakes import item

    lifecycle = Lifecycle(settings, Metrics())
    lifecycle.begin()
    await lifecycle.wait_started()
    runtime = lifecycle.require_ready()
    results = await asyncio.gather(*runtime.step_loop.submit([item(seed=s, steps=3) for s in range(6)]))
    assert [r.seed for r in results] == list(range(6))
    await lifecycle.stop()
    return list(runtime.engines)  # type: ignore[arg-type]
