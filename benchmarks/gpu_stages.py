"""The stages of benchmarks/gpu_suite.py. Each runs in a process of its own, started by the suite.

A stage reads the suite's plan (a JSON file), does its work within its deadline and keeps its
record (``<out>/NN-name.json``) up to date after every case, so that whatever it finished before
being stopped stays on disk. It never raises: a failure is recorded as the stage's error.

What the stages share is in gpu_plan.py (the plan and the record) and gpu_cases.py (devices,
case timing, engine variants); the profile stage is in gpu_profile.py.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from gpu_cases import engine_generate, init_device, load_engine, run_cases, use_compile_backend
from gpu_plan import MAX_MEAN_ABS_DIFF, PROMPT, ROOT, Plan, Record
from gpu_profile import stage_profile

# ----------------------------------------------------------------------------------------- stages


def stage_environment(plan: Plan, record: Record) -> None:
    import diffusers
    import torch
    import transformers

    record.config(suite=plan.extra, plan={k: v for k, v in asdict(plan).items() if k != "extra"})
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,  # type: ignore[no-untyped-call]
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "deepspeed_site": plan.deepspeed_site,
        "deepspeed_site_packages": _dist_infos(plan.deepspeed_site),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        env |= {
            "gpu": torch.cuda.get_device_name(0),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_total_gib": total / 2**30,
            "memory_free_gib": free / 2**30,
        }
    env["nvidia_smi"] = _command(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.free", "--format=csv,noheader"]
    )
    env["nvcc"] = (_command(["nvcc", "--version"]) or "").strip().splitlines()[-1:] or None
    record.finish("ok", environment=env)
    print(f"[environment] {env.get('gpu', 'no GPU')}, torch {env['torch']}, CUDA {env['cuda']}", flush=True)


def _dist_infos(site: str | None) -> list[str]:
    if not site or not Path(site).is_dir():
        return []
    return sorted(p.name.removesuffix(".dist-info") for p in Path(site).glob("*.dist-info"))


def _command(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def stage_diffusers(plan: Plan, record: Record) -> None:
    """Stock StableDiffusionPipeline on the same components, before any optimisation."""
    import torch
    from diffusers import StableDiffusionPipeline

    from model.loading import load_components
    from model.options import resolve_dtype

    start = time.perf_counter()
    dtype = resolve_dtype(plan.dtype, torch.device(plan.device))
    with init_device(plan):
        components = load_components(plan.model, dtype)
        components.to(plan.device)
    pipe = StableDiffusionPipeline(**components.modules(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    record.config(
        variant="diffusers",
        model=plan.model,
        dtype=str(dtype).replace("torch.", ""),
        attention_processors=processors,
        safety_checker=components.safety_checker is not None,
        load_s=round(time.perf_counter() - start, 2),
    )

    def generate(batch: int, steps: int) -> np.ndarray:
        generators = [torch.Generator(plan.device).manual_seed(i) for i in range(batch)]
        images: np.ndarray = pipe(
            [PROMPT] * batch,
            num_inference_steps=steps,
            height=plan.size,
            width=plan.size,
            generator=generators,
            output_type="np",
        ).images
        return images

    run_cases(
        plan,
        record,
        generate,
        plan.model,
        checker=components.safety_checker is not None,
        compiled=False,
        save_reference=True,
    )
    record.finish("ok")


def _stage_engine_variant(plan: Plan, record: Record, variant: str) -> None:
    engine = load_engine(plan, record, plan.model, variant)
    if variant == "deepspeed" and engine.accelerator != "deepspeed":
        record.finish("not_run", reason=engine.accelerator_note)
        print(f"[{plan.stage}] not run: {engine.accelerator_note}", flush=True)
        return
    rows = run_cases(
        plan,
        record,
        engine_generate(plan, engine),
        plan.model,
        checker=engine.info.safety_checker,
        compiled=engine.options.compiled,
        compare=True,
    )
    diffs = [r["mean_abs_diff_vs_diffusers"] for r in rows if r.get("mean_abs_diff_vs_diffusers") is not None]
    record.finish(
        "ok",
        accelerator_note=engine.accelerator_note,
        max_mean_abs_diff_vs_diffusers=max(diffs) if diffs else None,
        all_within_0_01=all(d < MAX_MEAN_ABS_DIFF for d in diffs) if diffs else None,
    )


def stage_engine(plan: Plan, record: Record) -> None:
    _stage_engine_variant(plan, record, "engine")


def stage_compiled(plan: Plan, record: Record) -> None:
    record.note(f"torch.compile backend: {plan.compile_backend}; buckets: the cases' batch sizes only")
    _stage_engine_variant(plan, record, "compiled")


def stage_deepspeed(plan: Plan, record: Record) -> None:
    import importlib.util

    import transformers

    spec = importlib.util.find_spec("deepspeed")
    record.config(transformers=transformers.__version__, deepspeed_site=plan.deepspeed_site)
    if spec is None:
        reason = "deepspeed is not importable" + (
            f" from --deepspeed-site {plan.deepspeed_site}"
            if plan.deepspeed_site
            else " (no --deepspeed-site)"
        )
        record.finish("not_run", reason=reason)
        print(f"[deepspeed] not run: {reason}", flush=True)
        return
    import deepspeed

    record.config(deepspeed=deepspeed.__version__)
    _stage_engine_variant(plan, record, "deepspeed")


def stage_sd2(plan: Plan, record: Record) -> None:
    engine = load_engine(plan, record, plan.sd2_model, plan.sd2_variant)
    record.config(variant_reason=plan.fastest_reason)
    if plan.sd2_variant == "deepspeed" and engine.accelerator != "deepspeed":
        record.note(f"DeepSpeed not used here: {engine.accelerator_note}; timed the engine's own path")
    run_cases(
        plan,
        record,
        engine_generate(plan, engine),
        plan.sd2_model,
        checker=engine.info.safety_checker,
        compiled=engine.options.compiled,
    )
    record.finish("ok")


def stage_tests(plan: Plan, record: Record) -> None:
    path = next((p for p in plan.tests if (ROOT / p).is_file()), None)
    if path is None:
        record.finish("error", error=f"none of {plan.tests} exists")
        return
    junit = Path(plan.work) / "junit.xml"
    junit.unlink(missing_ok=True)
    cache = plan.compile_cache
    env = os.environ | {
        **({"OMP_NUM_THREADS": str(plan.cpu_threads)} if plan.cpu_threads else {}),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
    }
    timeout = max(plan.left() - 5, 1)
    argv = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", path, f"--junitxml={junit}"]
    record.config(command=" ".join(["python", "-m", *argv[2:]]), timeout_s=round(timeout))
    try:
        done = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")
        record.skipped(f"pytest stopped after {timeout:.0f} s; tests that had not finished did not run")
        record.finish("timeout", output_tail=output[-4000:])
        return
    print(done.stdout[-3000:], flush=True)
    tests = _junit_cases(junit)
    counts = {k: sum(1 for t in tests if t["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    record.finish(
        "ok" if done.returncode == 0 else "error",
        returncode=done.returncode,
        counts=counts,
        tests=tests,
        output_tail=(done.stdout + done.stderr)[-4000:],
        **({"error": f"pytest exited {done.returncode}"} if done.returncode else {}),
    )


def _junit_cases(path: Path) -> list[dict[str, Any]]:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return []
    cases = []
    for case in ET.parse(path).iter("testcase"):
        outcome = "passed"
        message = None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (found.get("message") or "")[:500]
        cases.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                **({"message": message} if message else {}),
            }
        )
    return cases


STAGES: dict[str, Callable[[Plan, Record], None]] = {
    "environment": stage_environment,
    "diffusers": stage_diffusers,
    "engine": stage_engine,
    "compiled": stage_compiled,
    "profile": stage_profile,
    "deepspeed": stage_deepspeed,
    "sd2": stage_sd2,
    "tests": stage_tests,
}


def preload() -> None:
    """Import what every stage imports, once, in a suite that forks its stage processes."""
    import diffusers
    import flops
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline

    import model.loader

    del diffusers, torch, transformers, StableDiffusionPipeline, flops, model


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def run_stage(plan_file: str) -> int:
    """A stage process: run one stage, record its outcome whatever happens."""
    plan = Plan(**json.loads(Path(plan_file).read_text()))
    record = Record(plan)
    use_compile_backend(plan.compile_backend)
    if plan.cpu_threads:
        import torch

        torch.set_num_threads(plan.cpu_threads)
    try:
        if plan.extra.get("hang"):  # the suite's own tests of a stage that overruns its budget
            time.sleep(3600)
        STAGES[plan.stage](plan, record)
    except BaseException as error:  # a stage's failure is data: record it and let the suite go on
        lines = traceback.format_exception(type(error), error, error.__traceback__)
        record.finish(
            "error",
            error=f"{type(error).__name__}: {first_line(error)}",
            traceback="".join(lines)[-6000:],
        )
        print(f"[{plan.stage}] error: {record.data['error']}", flush=True)
    return 0
