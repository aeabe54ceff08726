"""How the stages of benchmarks/gpu_suite.py time their cases: the device helpers, the case loop
(every batch size one timed run before any gets a second, within the stage's deadline) and the
engine variants they load.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from gpu_plan import MAX_MEAN_ABS_DIFF, PEAK_TFLOPS, PROMPT, Plan, Record

# ---------------------------------------------------------------------------------------- devices


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return float(torch.cuda.max_memory_allocated() / 2**30)
    return None


def _host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


@contextlib.contextmanager
def init_device(plan: Plan) -> Iterator[None]:
    """Random weights drawn on the run's device (seconds instead of a CPU init per stage)."""
    import torch

    if plan.init_on_device and plan.device != "cpu":
        with torch.device(plan.device):
            yield
    else:
        yield


def use_compile_backend(backend: str) -> None:
    """Make every torch.compile of this process use ``backend`` (the dry run's "eager": Dynamo
    traces the same graphs, Inductor generates no code, so the CPU run fits CI)."""
    import torch

    if backend == "inductor":
        return
    original = torch.compile

    def compile_with(model: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("mode", None)
        kwargs["backend"] = backend
        return original(model, **kwargs)

    torch.compile = compile_with


# ------------------------------------------------------------------------------------------ cases


def arch_of(spec: str) -> str:
    return spec.split(":")[1] if spec.startswith("random:") else spec


def flops_entry(plan: Plan, spec: str) -> tuple[dict[str, Any], str]:
    import flops

    return flops.lookup(arch_of(spec), plan.size, Path(plan.flops_file))


def image_tflop(entry: dict[str, Any], steps: int, checker: bool) -> float:
    import flops

    return float(flops.image_tflop(entry, steps, checker))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Bx H x W x 3 in [0,1] (diffusers' np output) -> uint8 as its PIL conversion rounds it."""
    if images.dtype == np.uint8:
        return images
    return np.asarray((images * 255).round().clip(0, 255), dtype=np.uint8)


def reference_path(plan: Plan, spec: str, batch: int) -> Path:
    safe = spec.replace(":", "-").replace("/", "-")
    return plan.reference_dir / f"{safe}-{plan.size}px-{plan.steps}steps-b{batch}.npy"


def mean_abs_diff(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute difference of two 8-bit image batches, in [0,1] units."""
    a = to_uint8(images).astype(np.int16)
    b = to_uint8(reference).astype(np.int16)
    return float(np.abs(a - b).mean() / 255)


Generate = Callable[[int, int], np.ndarray]  # (batch, steps) -> B x H x W x 3 images


def run_cases(
    plan: Plan,
    record: Record,
    generate: Generate,
    spec: str,
    checker: bool,
    compiled: bool,
    compare: bool = False,
    save_reference: bool = False,
) -> list[dict[str, Any]]:
    """Time ``generate`` at every batch size: first one timed run of each (so that every case gets
    a figure), then more runs, up to ``plan.repeats``, while the deadline allows. The figure is
    the median. Warm-up is untimed: a few steps (and, when compiled, a full run: CUDA graphs are
    recorded on the first runs of a path)."""
    entry, source = flops_entry(plan, spec)
    tflop = image_tflop(entry, plan.steps, checker)
    record.config(tflop_per_image=tflop, flops_source=source, peak_tflops=PEAK_TFLOPS)
    rows: list[dict[str, Any]] = []
    times: dict[int, list[float]] = {}
    peaks: dict[int, float | None] = {}
    for batch in plan.batch_sizes:
        if plan.left() < 5:
            record.skipped(f"batch {batch}: not started, {plan.left():.0f} s left")
            continue
        start = time.perf_counter()
        generate(batch, plan.warm_steps)
        if compiled:
            generate(batch, plan.steps)
        warmup_s = time.perf_counter() - start
        seconds, peaks[batch], images = _timed(plan, generate, batch)
        times[batch] = [seconds]
        row = _row(plan, batch, times[batch], tflop, warmup_s, peaks[batch])
        if save_reference:  # stock diffusers: NaN would show here (the engine refuses it instead)
            row["nonfinite_pixels"] = int(np.count_nonzero(~np.isfinite(images.astype(np.float32))))
            plan.reference_dir.mkdir(parents=True, exist_ok=True)
            np.save(reference_path(plan, spec, batch), images)
        if compare:
            ref = reference_path(plan, spec, batch)
            if ref.is_file():
                mad = mean_abs_diff(images, np.load(ref))
                row["mean_abs_diff_vs_diffusers"] = mad
                row["within_0_01"] = mad < MAX_MEAN_ABS_DIFF
            else:
                row["mean_abs_diff_vs_diffusers"] = None
                row["diff_note"] = "no stage-2 images for this case (stage 2 did not finish it)"
        rows.append(record.case(row))
        print(_line(plan.stage, row), flush=True)
    # more timed runs while time allows
    for row in rows:
        batch = row["batch_size"]
        while len(times[batch]) < plan.repeats:
            needed = 1.5 * max(times[batch]) + 2
            if plan.left() < needed:
                record.skipped(
                    f"batch {batch}: {len(times[batch])} of {plan.repeats} timed runs "
                    f"(another needs ~{needed:.0f} s, {plan.left():.0f} s left)"
                )
                break
            seconds, peak, _ = _timed(plan, generate, batch)
            times[batch].append(seconds)
            peaks[batch] = None if peak is None else max(peak, peaks[batch] or 0.0)
            row.update(_row(plan, batch, times[batch], tflop, row["warmup_s"], peaks[batch]))
            record.save()
    return rows


def _timed(plan: Plan, generate: Generate, batch: int) -> tuple[float, float | None, np.ndarray]:
    """(seconds, peak GiB allocated during the run, images) of one full generation."""
    _reset_peak(plan.device)
    sync(plan.device)
    start = time.perf_counter()
    images = generate(batch, plan.steps)
    sync(plan.device)
    return time.perf_counter() - start, _peak_gib(plan.device), images


def _row(
    plan: Plan, batch: int, runs: list[float], tflop: float, warmup_s: float, peak: float | None
) -> dict[str, Any]:
    seconds = statistics.median(runs)
    per_image = seconds / batch
    return {
        "batch_size": batch,
        "steps": plan.steps,
        "size": plan.size,
        "seconds_per_batch": seconds,
        "seconds_per_image": per_image,
        "images_per_s": batch / seconds,
        "timed_runs": len(runs),
        "run_seconds": [round(r, 4) for r in runs],
        "warmup_s": round(warmup_s, 2),
        "peak_gib": peak,
        "peak_host_rss_gib": None if peak is not None else round(_host_peak_gib(), 2),
        "tflop_per_image": tflop,
        "mfu": tflop / per_image / PEAK_TFLOPS,
    }


def _line(stage: str, row: dict[str, Any]) -> str:
    mad = row.get("mean_abs_diff_vs_diffusers")
    return (
        f"[{stage}] batch {row['batch_size']}: {row['seconds_per_image']:.4f} s/image, "
        f"{row['images_per_s']:.2f} images/s, MFU {row['mfu']:.1%}"
        + (f", mean |diff| {mad:.5f}" if mad is not None else "")
    )


# --------------------------------------------------------------------------------------- variants


def engine_options(plan: Plan, variant: str) -> Any:
    import model

    buckets = tuple(sorted(set(plan.batch_sizes)))
    if variant == "engine":
        return model.EngineOptions(channels_last=True, fuse_qkv=True, batch_buckets=buckets)
    if variant == "compiled":
        return model.EngineOptions(
            channels_last=True,
            fuse_qkv=True,
            compile=True,
            cuda_graphs=True,
            batch_buckets=buckets,
            compile_cache_dir=str(plan.compile_cache),
        )
    if variant == "deepspeed":
        # DeepSpeed's own CUDA graphs capture one input shape; the engine's start-up check runs
        # batch 2, so its kernels run here without them.
        return model.EngineOptions(accelerator="deepspeed", batch_buckets=buckets)
    raise ValueError(f"unknown variant {variant!r}")


def load_engine(plan: Plan, record: Record, spec: str, variant: str) -> Any:
    import model

    options = engine_options(plan, variant)
    record.config(variant=variant, model=spec, options=asdict(options))
    start = time.perf_counter()
    with init_device(plan):
        engine = model.load(spec, device=plan.device, dtype=plan.dtype, options=options)
    record.config(load_s=round(time.perf_counter() - start, 2), engine=asdict(engine.info))
    return engine


def engine_generate(plan: Plan, engine: Any) -> Generate:
    from model.types import GenerationItem

    def generate(batch: int, steps: int) -> np.ndarray:
        items = [
            GenerationItem(
                prompt=PROMPT, seed=i, num_inference_steps=steps, height=plan.size, width=plan.size
            )
            for i in range(batch)
        ]
        return np.stack([r.image for r in engine.generate(items)])

    return generate
