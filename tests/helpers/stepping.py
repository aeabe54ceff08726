"""What the engine tests read of a model.Engine's running set, which serving never needs: its
rows, its items, and finished images before 8-bit conversion; and a scheduler step that fails the way
a GPU does."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from model.schedulers import SCHEDULER_CLASSES
from model.stepping.item import rows_of

__all__ = ["fail_step_once", "retire_float", "rows_of", "running", "running_rows"]


def running_rows(engine: Any) -> int:
    """UNet rows the next step takes: 2 per guided item with steps left, 1 per unguided."""
    rows: int = engine._running.rows
    return rows


def running(engine: Any) -> int:
    """Items admitted and not yet retired or cancelled (finished ones included)."""
    return len(engine._running)


def retire_float(engine: Any, handles: Sequence[int]) -> tuple[list[torch.Tensor], list[bool | None]]:
    """``engine.retire`` before 8-bit conversion: each image 3xHxW in [0,1] on the CPU, and the
    flags (for comparisons)."""
    images, flags = engine._floats(engine._running.finished(handles))
    for handle in handles:
        engine._running.discard(handle)
    return images, flags


def fail_step_once(monkeypatch: pytest.MonkeyPatch, scheduler: str, at: int) -> None:
    """``scheduler``'s step raises a CUDA failure at its ``at``-th call in any item, once (after it ran:
    the state it changed must be restored), as a GPU fails mid-step."""
    cls = SCHEDULER_CLASSES[scheduler]
    original = cls.step
    failures = [at]

    # wraps: the step's signature stays readable (the engine reads which keywords step() takes; a
    # bare (*args, **kwargs) would hide the generator from an ancestral sampler not seen before)
    @functools.wraps(original)
    def failing_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        failures[0] -= 1
        if failures[0] == 0:
            raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")
        return out

    monkeypatch.setattr(cls, "step", failing_step)
