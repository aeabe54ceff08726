"""The stages of benchmarks/gpu_suite.py. Each runs in a process of its own, started by the suite.

A stage reads the suite's plan (a JSON file), does its work within its deadline and keeps its
record (``<out>/NN-name.json``) up to date after every case, so that whatever it finished before
being stopped stays on disk. It never raises: a failure is recorded as the stage's error.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

PROMPT = "a photograph of an astronaut riding a horse"
PEAK_TFLOPS = 790.0  # the H200's measured dense bf16/fp16 matmul rate
MAX_MEAN_ABS_DIFF = 0.01
ENGINE_VARIANTS = ("engine", "compiled", "deepspeed")


@dataclass
class Plan:
    """What the suite decided; written by the suite, read by each stage process."""

    out: str
    work: str
    dry_run: bool
    device: str
    dtype: str
    model: str
    sd2_model: str
    size: int
    steps: int
    batch_sizes: list[int]
    repeats: int
    warm_steps: int
    profile_steps: int
    compile_backend: str
    deepspeed_site: str | None
    tests: list[str]
    flops_file: str
    init_on_device: bool
    cpu_threads: int = 0  # torch's intra-op threads; 0: torch's default
    stage: str = ""
    index: int = 0
    title: str = ""
    deadline: float = 0.0  # time.time() by which the stage must have ended
    budget_s: float = 0.0
    fastest: str = "engine"
    fastest_reason: str = ""
    sd2_variant: str = "engine"
    extra: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.time()

    @property
    def reference_dir(self) -> Path:
        return Path(self.work) / "reference"

    @property
    def compile_cache(self) -> Path:
        return Path(self.work) / "compile-cache"


def stage_file(out: str | Path, index: int, name: str) -> Path:
    return Path(out) / f"{index:02d}-{name}.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Record:
    """A stage's JSON record, saved after every change."""

    def __init__(self, plan: Plan) -> None:
        self.path = stage_file(plan.out, plan.index, plan.stage)
        self.data: dict[str, Any] = {
            "stage": plan.index,
            "name": plan.stage,
            "title": plan.title,
            "status": "running",
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "dry_run": plan.dry_run,
            "budget_s": round(plan.budget_s, 1),
            "config": {},
            "cases": [],
            "skipped_for_time": [],
            "notes": [],
        }
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def config(self, **values: Any) -> None:
        self.data["config"].update(values)
        self.save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    def skipped(self, text: str) -> None:
        self.data["skipped_for_time"].append(text)
        self.save()

    def case(self, row: dict[str, Any]) -> dict[str, Any]:
        self.data["cases"].append(row)
        self.save()
        return row

    def finish(self, status: str, **values: Any) -> None:
        self.data.update(values, status=status)
        self.save()


# ---------------------------------------------------------------------------------------- devices


def _sync(device: str) -> None:
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
def _init_device(plan: Plan) -> Iterator[None]:
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
    _sync(plan.device)
    start = time.perf_counter()
    images = generate(batch, plan.steps)
    _sync(plan.device)
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
    with _init_device(plan):
        engine = model.load(spec, device=plan.device, dtype=plan.dtype, options=options)
    record.config(load_s=round(time.perf_counter() - start, 2), engine=asdict(engine.info))
    return engine


def _engine_generate(plan: Plan, engine: Any) -> Generate:
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
    with _init_device(plan):
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
        _engine_generate(plan, engine),
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
        _engine_generate(plan, engine),
        plan.sd2_model,
        checker=engine.info.safety_checker,
        compiled=engine.options.compiled,
    )
    record.finish("ok")


def stage_profile(plan: Plan, record: Record) -> None:
    """Per step: (profile of 1 + P steps) - (profile of 1 step), over P; the text encoder, decode
    and checker cancel out, what stays is P denoising steps."""
    import torch

    engine = load_engine(plan, record, plan.model, plan.fastest)
    record.config(variant_reason=plan.fastest_reason, profiled_steps=plan.profile_steps)
    generate = _engine_generate(plan, engine)
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
    _sync(plan.device)
    start = time.perf_counter()
    fn()
    _sync(plan.device)
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
