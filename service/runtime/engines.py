"""The one engine protocol and the one engine loader, for every consumer: the server, batch
jobs, Ray actors and both Azure ML entry scripts.

Light to import (no torch, no web stack): ``load_engine`` imports the model's libraries when it
runs, which is always in a thread or a worker process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from model.types import GenerationItem, GenerationResult, ModelInfo
from service.settings import Settings

log = logging.getLogger(__name__)


class ServingEngine(Protocol):
    """What every consumer needs of an engine; ``model.Engine`` has it, and so do the tests' fakes.

    Batch jobs and the request-level batcher call ``generate``; the server's step loop
    (service/runtime/batching/steploop.py) calls the per-step API: ``admit`` an item (its handle back),
    ``step`` every running item once (the handles now finished; on an exception nothing has
    advanced), ``retire`` finished handles into results, ``cancel`` a handle at any time.
    """

    @property
    def info(self) -> ModelInfo: ...

    def validate(self, items: Sequence[GenerationItem]) -> None: ...

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]: ...

    def warmup(self) -> None: ...

    def close(self) -> None: ...

    def admit(self, item: GenerationItem) -> int: ...

    def step(self) -> list[int]: ...

    def retire(self, handles: Sequence[int]) -> list[GenerationResult]: ...

    def cancel(self, handle: int) -> None: ...


def engine_thread(index: int) -> ThreadPoolExecutor:
    """The one thread that runs all of an engine's work: its load, its warm-up and every step.

    One thread, first because the engine is not re-entrant; and because torch keeps per-thread
    state that a second thread would not share: on the CPU, an OpenMP thread team per calling
    thread (with two teams on a 2-core VM, libgomp stops spin-waiting and random:tiny's 20 steps
    took 0.55 s instead of 0.16 s), on CUDA the current device and stream.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{index}")


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to the largest batch, which itself is always a bucket (for CUDA graphs)."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def resolve_devices(settings: Settings) -> list[str | None]:
    """The devices of SD_DEVICES (or SD_DEVICE), one engine each; ``all`` is every visible CUDA
    device, or the model's default device (None) where there is none. Imports torch."""
    devices: list[str | None] = []
    for entry in settings.device_list:
        if entry != "all":
            devices.append(entry)
            continue
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices += [f"cuda:{index}" for index in range(count)] or [None]
    return devices


def load_engine(settings: Settings, device: str | None = "settings") -> ServingEngine:
    """Load the model the settings name, on ``device`` (default: SD_DEVICE) and with the options
    they name.

    Raises ModelLoadError, with the reason, when the spec names nothing loadable.
    """
    from model import EngineOptions, load

    # 1. The options the settings ask for.
    options = EngineOptions(
        compile=settings.compile,
        cuda_graphs=settings.cuda_graphs,
        accelerator=settings.accelerator,
        compile_cache_dir=str(settings.compile_cache_dir) if settings.compile_cache_dir else None,
        batch_buckets=batch_buckets(settings.max_batch_size),
    )
    if device == "settings":
        device = None if settings.device == "auto" else settings.device
    dtype = None if settings.dtype == "auto" else settings.dtype
    checker = str(settings.safety_checker) if settings.safety_checker else None
    # 2. The model.
    log.info("loading model %s on %s", settings.model_spec, device or "the default device")
    engine: ServingEngine = load(
        settings.model_spec,
        device,
        dtype,
        safety_checker=checker,
        options=options,
        variant=settings.model_variant,
        config=settings.model_config_dir,
    )
    return engine
