"""The Stable Diffusion engine: ``load(spec) -> Engine``; ``Engine.generate(items) -> results``.

Synchronous, batch in, batch out. Knows nothing of HTTP, pydantic, asyncio or metrics.
Importing this package is light (no torch): ``load``, ``Engine`` and ``EngineOptions`` import
torch and diffusers on first use, so light callers (CLIs validating input) stay fast.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from model.errors import (
    EngineError,
    EngineFailure,
    EngineOutOfMemoryError,
    InvalidRequestError,
    ModelLoadError,
)
from model.types import BatchKey, GenerationItem, GenerationResult, ModelInfo

if TYPE_CHECKING:
    import torch

    from model.engine import Engine
    from model.options import EngineOptions

__all__ = [
    "BatchKey",
    "Engine",
    "EngineError",
    "EngineFailure",
    "EngineOptions",
    "EngineOutOfMemoryError",
    "GenerationItem",
    "GenerationResult",
    "InvalidRequestError",
    "ModelInfo",
    "ModelLoadError",
    "load",
]


def load(
    spec: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    safety_checker: str | None = None,
    options: EngineOptions | None = None,
    variant: str | None = None,
    config: str | None = None,
    adapters: str | os.PathLike[str] | None = None,
    max_adapters: int | None = None,
) -> Engine:
    """Load ``spec`` onto ``device`` (default: CUDA if present) and return a ready engine
    (``adapters``: a folder of LoRA adapters, model/adapters, at most ``max_adapters`` on the
    device at once)."""
    from model.loader import load_engine

    return load_engine(
        spec,
        device,
        dtype,
        safety_checker=safety_checker,
        options=options,
        variant=variant,
        config=config,
        adapters=adapters,
        max_adapters=max_adapters,
    )


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from model.engine import Engine

        return Engine
    if name == "EngineOptions":
        from model.options import EngineOptions

        return EngineOptions
    raise AttributeError(f"module 'model' has no attribute {name!r}")
