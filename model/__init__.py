"""The Stable Diffusion engine: ``load(spec) -> Engine``; ``Engine.generate(items) -> results``.

Synchronous, batch in, batch out. Knows nothing of HTTP, pydantic, asyncio or metrics.
Importing this package is light (no torch): ``load``, ``Engine`` and ``EngineOptions`` import
torch and diffusers on first use, so light callers (CLIs validating input) stay fast.
"""

from __future__ import annotations

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
    from model.engine import Engine
    from model.loader import load_engine as load
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


def __getattr__(name: str) -> Any:
    # ``load(spec, device=None, dtype=None, *, ...) -> Engine``: model/loader.py's load_engine
    if name == "load":
        from model.loader import load_engine

        return load_engine
    if name == "Engine":
        from model.engine import Engine

        return Engine
    if name == "EngineOptions":
        from model.options import EngineOptions

        return EngineOptions
    raise AttributeError(f"module 'model' has no attribute {name!r}")
