"""What the engine tests read of a model.Engine's running set, which serving never needs: its
rows, its items, and finished images before 8-bit conversion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from model.stepping.item import rows_of

__all__ = ["retire_float", "rows_of", "running", "running_rows"]


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
