"""Stage 5 of benchmarks/gpu_suite.py: the per-step profile of the fastest variant (top 10 kernels).

Its own module because it is the one stage that reads torch's profiler; it runs, like every
stage, in a process of its own started by the suite (see gpu_stages.run_stage).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from gpu_cases import engine_generate, load_engine, sync
from gpu_plan import Plan, Record


def stage_profile(plan: Plan, record: Record) -> None:
    """Per step: (profile of 1 + P steps) - (profile of 1 step), over P; the text encoder, decode
    and checker cancel out, what stays is P denoising steps."""
    import torch

    engine = load_engine(plan, record, plan.model, plan.fastest)
    record.config(variant_reason=plan.fastest_reason, profiled_steps=plan.profile_steps)
    generate = engine_generate(plan, engine)
    steps = plan.profile_steps
    for batch in plan.batch_sizes:
        if plan.left() < 10:
            record.skipped(f"batch {batch}: not profiled, {plan.left():.0f} s left")
            continue
        generate(batch, 1)
        generate(batch, 1 + steps)
        if engine.options.compiled:
            generate(batch, 1 + steps)
        one = functools.partial(generate, batch, 1)
        many = functools.partial(generate, batch, 1 + steps)
        wall_one, kernels_one = _profiled(plan, one)
        wall_many, kernels_many = _profiled(plan, many)
        plain_one, plain_many = _wall(plan, one), _wall(plan, many)
        per_step: dict[str, dict[str, float]] = {}
        for name, (us, calls) in kernels_many.items():
            us_one, calls_one = kernels_one.get(name, (0.0, 0))
            per_step[name] = {"ms": (us - us_one) / 1000 / steps, "calls": (calls - calls_one) / steps}
        total_ms = sum(v["ms"] for v in per_step.values())
        top = sorted(per_step.items(), key=lambda kv: kv[1]["ms"], reverse=True)[:10]
        row = record.case(
            {
                "batch_size": batch,
                "profiled_steps": steps,
                "step_wall_ms": (plain_many - plain_one) * 1000 / steps,
                "step_wall_ms_profiled": (wall_many - wall_one) * 1000 / steps,
                "timed": "cuda kernels" if torch.cuda.is_available() else "cpu ops (no CUDA)",
                "kernel_ms_per_step": total_ms,
                "kernel_launches_per_step": sum(v["calls"] for v in per_step.values()),
                "top_kernels": [
                    {
                        "name": name[:200],
                        "ms_per_step": v["ms"],
                        "calls_per_step": v["calls"],
                        "share": v["ms"] / total_ms if total_ms else None,
                    }
                    for name, v in top
                ],
            }
        )
        print(
            f"[profile] batch {batch}: {row['step_wall_ms']:.2f} ms/step wall, "
            f"{total_ms:.2f} ms/step in {row['timed']}; top: {top[0][0][:60] if top else '-'}",
            flush=True,
        )
    record.finish("ok")


def _wall(plan: Plan, fn: Callable[[], Any]) -> float:
    sync(plan.device)
    start = time.perf_counter()
    fn()
    sync(plan.device)
    return time.perf_counter() - start


def _profiled(plan: Plan, fn: Callable[[], Any]) -> tuple[float, dict[str, tuple[float, int]]]:
    """(wall seconds, {kernel or op: (total us, calls)}): CUDA kernels on a GPU, CPU ops without."""
    import torch
    from torch.autograd import DeviceType  # type: ignore[attr-defined]
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and plan.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall = _wall(plan, fn)
    table: dict[str, tuple[float, int]] = {}
    for event in prof.key_averages():
        if getattr(event, "is_user_annotation", False):
            continue
        on_device = event.device_type == DeviceType.CUDA
        if cuda != on_device:
            continue
        us = float(
            getattr(event, "self_device_time_total", 0.0)
            if cuda
            else getattr(event, "self_cpu_time_total", 0.0)
        )
        if us > 0:
            table[event.key] = (us, int(event.count))
    return wall, table
