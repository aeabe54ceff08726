"""The one engine protocol and the one engine loader, for every consumer: the server, batch
jobs, Ray actors and both Azure ML entry scripts.

Light to import (no torch, no web stack): ``load_serving_engine`` imports the model's libraries when it
runs, which is always in a thread or a worker process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from model.types import GenerationItem, GenerationResult, ModelInfo
from service.settings import Settings

log = logging.getLogger(__name__)


class ServingEngine(Protocol):
    """What every consumer needs of an engine; ``model.Engine`` has it, and so do the tests' fakes.

    Batch jobs call ``generate``; the server's step loop
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


@runtime_checkable
class FollowableEngine(Protocol):
    """What following and interrupting a running image needs beyond ``ServingEngine`` (``model.Engine``
    has it): ``finish`` ends an item at its current step (``retire`` then decodes what it has),
    ``preview`` gives a cheap HxWx3 uint8 image of its current latents."""

    def finish(self, handle: int) -> None: ...

    def preview(self, handle: int) -> Any: ...


# Torch CPU threads of an engine on a GPU: its CPU work is small (scheduler arithmetic, the
# safety checker's pre-processing), and a wide team on every GPU's engine would oversubscribe the host.
GPU_ENGINE_CPU_THREADS = 2


def engine_thread(index: int, cpu_threads: int | None = None) -> ThreadPoolExecutor:
    """The one thread that runs all of an engine's work: its load, its warm-up and every step,
    with ``cpu_threads`` torch threads (None: torch's own default).

    One thread, first because the engine is not re-entrant; and because torch keeps per-thread
    state that a second thread would not share: on the CPU, an OpenMP thread team per calling
    thread (with two teams on a 2-core VM, libgomp stops spin-waiting and random:tiny's 20 steps
    took 0.55 s instead of 0.16 s), on CUDA the current device and stream. The thread count is
    one of those per-thread settings, so it is set in the thread itself, before anything runs there.
    """
    if cpu_threads is None:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{index}")
    name = f"engine-{index}"
    return ThreadPoolExecutor(1, name, initializer=use_cpu_threads, initargs=(cpu_threads,))


def use_cpu_threads(count: int) -> None:
    """Give the calling thread's torch operations ``count`` CPU threads. Imports torch."""
    import torch

    torch.set_num_threads(count)


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota (what a
    container's CPU limit sets, while the mask still shows every core of the host), rounded down: a
    team wider than the quota is throttled in every period."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limits = (("cpu.max",), ("cpu", "cpu.cfs_quota_us"))  # cgroup v2, then v1
    for parts in limits:
        try:
            text = cgroup.joinpath(*parts).read_text()
            if parts == ("cpu.max",):
                quota, period = text.split()[:2]
            else:
                quota, period = text.strip(), cgroup.joinpath("cpu", "cpu.cfs_period_us").read_text().strip()
        except (OSError, ValueError):
            continue  # no such limit to read here
        if quota not in ("max", "-1") and quota.isdigit() and period.isdigit() and int(period) > 0:
            cores = min(cores, max(1, int(quota) // int(period)))
        break
    return max(1, cores)


def cpu_threads_per_engine(settings: Settings, devices: Sequence[str | None], cores: int) -> list[int | None]:
    """Torch CPU threads for each engine of ``devices`` (in order) on a host with ``cores`` usable
    cores; None leaves torch's default (OMP_NUM_THREADS, which the user or Ray set).

    1. SD_CPU_THREADS, when it is a number, for every engine.
    2. Under auto, OMP_NUM_THREADS when set: someone sized the threads for this process already.
    3. CPU engines share all cores but one, evenly. The core left over is the server's own (HTTP,
       PNG encoding) and any neighbour's: a team as wide as the machine waits at every operation's
       barrier for whichever of its threads the OS has descheduled, and throughput collapses as
       soon as anything else runs (benchmarks/cpu_threads.py measures each policy).
    4. Engines on GPUs: a small team each (GPU_ENGINE_CPU_THREADS), within what is left.
    """
    if isinstance(settings.cpu_threads, int):
        return [settings.cpu_threads] * len(devices)
    if settings.omp_num_threads is not None:
        return [None] * len(devices)
    budget = max(1, cores - 1)
    on_cpu = [device is None or device.startswith("cpu") for device in devices]
    cpu_share = max(1, budget // max(1, sum(on_cpu)))
    gpu_share = max(1, min(GPU_ENGINE_CPU_THREADS, budget // max(1, len(devices))))
    return [cpu_share if cpu else gpu_share for cpu in on_cpu]


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


def settings_device(settings: Settings) -> str | None:
    """SD_DEVICE's device; None for auto (the model's default device)."""
    return None if settings.device == "auto" else settings.device


def load_serving_engine(settings: Settings, device: str | None) -> ServingEngine:
    """Load the model the settings name (SD_MODEL and its options) on ``device`` (None: the
    model's default device; ``settings_device`` gives SD_DEVICE's); with a library (SD_MODELS), the
    engine serves its models too, each loaded on first use (model/library/models.py).

    Raises ModelLoadError, with the reason, when the spec names nothing loadable.
    """
    from service.runtime.library import default_entry, library_of, with_default

    # 1. The default model (SD_MODEL, else a library's first model), with the server's LoRA adapters.
    chosen, settings = default_entry(settings), with_default(settings)
    log.info("loading model %s on %s", settings.model_spec, device or "the default device")
    engine: ServingEngine = _loader(settings, device, settings.model_spec, default=True)(None)
    if chosen is not None:  # known by its library name, as the others are
        engine.components.name = chosen.name  # type: ignore[attr-defined]
    # 2. The library's models: loaders only; nothing more is read until a request names one.
    library = library_of(settings, engine.info.name)
    if not library.several:
        return engine
    from model.library.models import ModelSet

    loaders = {library.default: _loader(settings, device, settings.model_spec, default=True)}
    for name, entry in library.entries.items():
        loaders[name] = _loader(settings, device, entry.spec, config=entry.config, variant=entry.variant)
    return ModelSet(
        library.default,
        loaders,
        engine,  # type: ignore[arg-type]
        cap=settings.max_resident_models,
        host_cache_bytes=settings.model_host_cache_bytes,
        share_parts=_shareable(settings, engine),
    )


def _shareable(settings: Settings, engine: Any) -> tuple[str, ...]:
    """Components two models may share: never one an optimisation rewrites in place (the VAE is
    fused and compiled on a GPU), nor a text encoder that carries LoRA layers."""
    on_cpu = str(engine.info.device).startswith("cpu")
    untouched = on_cpu and not (settings.compile or settings.cuda_graphs) and settings.accelerator == "none"
    parts = ["vae"] if untouched else []
    if settings.accelerator == "none" and not engine.adapters.names:
        parts.append("text_encoder")
    return (*parts, "safety_checker")


def _loader(
    settings: Settings,
    device: str | None,
    spec: str,
    *,
    default: bool = False,
    config: str | None = None,
    variant: str | None = None,
) -> Any:
    """A function that loads ``spec`` on ``device`` with the settings' options and LoRA adapters
    (given the hook that shares components with the device's other models, or None); ``default``:
    the default model (SD_MODEL's variant and config, rather than its library entry's)."""
    from model import EngineOptions, load

    options = EngineOptions(
        compile=settings.compile,
        cuda_graphs=settings.cuda_graphs,
        accelerator=settings.accelerator,
        compile_cache_dir=str(settings.compile_cache_dir) if settings.compile_cache_dir else None,
        batch_buckets=batch_buckets(settings.max_batch_size),
        preview_decoder=str(settings.preview_decoder) if settings.preview_decoder else None,
    )
    dtype = None if settings.dtype == "auto" else settings.dtype
    checker = str(settings.safety_checker) if settings.safety_checker else None
    given_config = str(settings.model_config_dir) if settings.model_config_dir else None

    def load_it(share: Any) -> Any:
        return load(
            spec,
            device,
            dtype,
            safety_checker=checker,
            options=options,
            variant=settings.model_variant if default else variant,
            config=given_config if default else config,
            adapters=settings.adapters,
            max_adapters=settings.max_adapters,
            share=share,
        )

    return load_it
