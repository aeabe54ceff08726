"""The stages of benchmarks/gpu_suite.py, declared in ``STAGES``, and what a stage process shares
with the suite: the plan it is given and the record (``<out>/NN-name.json``) it keeps.

A stage runs in a process of its own, started by the suite with its plan (a JSON file). It does
its work within its deadline and saves its record after every case, so that whatever it finished
before being stopped stays on disk. It never raises: a failure is recorded as the stage's error.
Nothing here imports torch at module level: the suite imports this module to read the table.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from common import MAX_MEAN_ABS_DIFF, PEAK_TFLOPS, PROMPT, ROOT, Timing, mean_abs_diff, time_once

# ------------------------------------------------------------------------------ plan and record


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
    fastest: str = "engine"  # the profile stage's variant
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


def read_record(out: str | Path, index: int, name: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(stage_file(out, index, name).read_text())
        return data
    except (OSError, ValueError):
        return None


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

    def add(self, key: str, value: Any) -> Any:
        """A case, a note or a line of ``skipped_for_time``, appended and saved."""
        self.data[key].append(value)
        self.save()
        return value

    def finish(self, status: str, **values: Any) -> None:
        self.data.update(values, status=status)
        self.save()


def say(plan: Plan, text: str) -> None:
    print(f"[{plan.stage}] {text}", flush=True)


# ------------------------------------------------------------------------------------ the cases

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
    a figure), then more, up to ``plan.repeats``, while the deadline allows; the figure is their
    median. Warm-up is untimed: a few steps (and, when compiled, a full run: CUDA graphs are
    recorded on the first runs of a path)."""
    import flops

    arch = spec.split(":")[1] if spec.startswith("random:") else spec
    entry, source = flops.lookup(arch, plan.size, Path(plan.flops_file))
    tflop = float(flops.image_tflop(entry, plan.steps, checker))
    record.config(tflop_per_image=tflop, flops_source=source, peak_tflops=PEAK_TFLOPS)
    timings: dict[int, Timing] = {}
    rows: list[dict[str, Any]] = []
    for batch in plan.batch_sizes:
        if plan.left() < 5:
            record.add("skipped_for_time", f"batch {batch}: not started, {plan.left():.0f} s left")
            continue
        start = time.perf_counter()
        generate(batch, plan.warm_steps)
        if compiled:
            generate(batch, plan.steps)
        warmup_s = time.perf_counter() - start
        timing = timings[batch] = time_once(lambda b=batch: generate(b, plan.steps), plan.device)  # type: ignore[misc]
        images, timing.output = timing.output, None
        row: dict[str, Any] = {"batch_size": batch, "steps": plan.steps, "size": plan.size}
        row["warmup_s"] = round(warmup_s, 2)
        row |= figures(timing, batch, tflop)
        reference = (
            plan.reference_dir
            / f"{spec.replace(':', '-').replace('/', '-')}-{plan.size}px-{plan.steps}steps-b{batch}.npy"
        )
        if save_reference:  # stock diffusers: NaN would show here (the engine refuses it instead)
            row["nonfinite_pixels"] = int(np.count_nonzero(~np.isfinite(images.astype(np.float32))))
            plan.reference_dir.mkdir(parents=True, exist_ok=True)
            np.save(reference, images)
        if compare and reference.is_file():
            mad = row["mean_abs_diff_vs_diffusers"] = mean_abs_diff(images, np.load(reference))
            row["within_0_01"] = mad < MAX_MEAN_ABS_DIFF
        elif compare:
            row["mean_abs_diff_vs_diffusers"] = None
            row["diff_note"] = "no stage-2 images for this case (stage 2 did not finish it)"
        rows.append(record.add("cases", row))
        say(
            plan,
            f"batch {batch}: {row['seconds_per_image']:.4f} s/image, {row['images_per_s']:.2f} "
            f"images/s, MFU {row['mfu']:.1%}"
            + (
                f", mean |diff| {mad:.5f}"
                if compare and row["mean_abs_diff_vs_diffusers"] is not None
                else ""
            ),
        )
    for row in rows:  # more timed runs while time allows
        batch, timing = row["batch_size"], timings[row["batch_size"]]
        while len(timing.runs) < plan.repeats:
            needed = 1.5 * max(timing.runs) + 2
            if plan.left() < needed:
                record.add(
                    "skipped_for_time",
                    f"batch {batch}: {len(timing.runs)} of {plan.repeats} timed "
                    f"runs (another needs ~{needed:.0f} s, {plan.left():.0f} s left)",
                )
                break
            timing.add(time_once(lambda b=batch: generate(b, plan.steps), plan.device))  # type: ignore[misc]
            timing.output = None
            row.update(figures(timing, batch, tflop))
            record.save()
    return rows


def figures(timing: Timing, batch: int, tflop: float) -> dict[str, Any]:
    import resource

    seconds = timing.seconds
    host_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    return {
        "seconds_per_batch": seconds,
        **timing.figures(batch),
        "peak_host_rss_gib": None if timing.peak_gib is not None else round(host_gib, 2),
        "tflop_per_image": tflop,
        "mfu": tflop / (seconds / batch) / PEAK_TFLOPS,
    }


# ------------------------------------------------------------------------------------- variants

# each engine variant's EngineOptions (batch buckets: the cases' batch sizes only). DeepSpeed's own
# CUDA graphs capture one input shape and the engine's start-up check runs batch 2: none there.
VARIANTS: dict[str, dict[str, Any]] = {
    "engine": {"channels_last": True, "fuse_qkv": True},
    "compiled": {"channels_last": True, "fuse_qkv": True, "compile": True, "cuda_graphs": True},
    "deepspeed": {"accelerator": "deepspeed"},
}


def on_device(plan: Plan) -> Any:
    """Random weights drawn on the run's device (seconds instead of a CPU init per stage)."""
    import contextlib

    import torch

    return (
        torch.device(plan.device)
        if plan.init_on_device and plan.device != "cpu"
        else contextlib.nullcontext()
    )


def load_engine(plan: Plan, record: Record, spec: str, variant: str) -> Any:
    import model

    cache: dict[str, Any] = {"compile_cache_dir": str(plan.compile_cache)} if variant == "compiled" else {}
    options = model.EngineOptions(
        **VARIANTS[variant], **cache, batch_buckets=tuple(sorted(set(plan.batch_sizes)))
    )
    record.config(variant=variant, model=spec, options=asdict(options))
    start = time.perf_counter()
    with on_device(plan):
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


# --------------------------------------------------------------------------------------- stages


def stage_environment(plan: Plan, record: Record) -> None:
    import diffusers
    import torch
    import transformers

    record.config(suite=plan.extra, plan={k: v for k, v in asdict(plan).items() if k != "extra"})
    site = Path(plan.deepspeed_site or "/nonexistent")
    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,  # type: ignore[no-untyped-call]
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda_available": cuda,
        "deepspeed_site": plan.deepspeed_site,
        "deepspeed_site_packages": sorted(
            p.name.removesuffix(".dist-info") for p in site.glob("*.dist-info")
        ),
    }
    if cuda:
        props, (free, total) = torch.cuda.get_device_properties(0), torch.cuda.mem_get_info()
        env |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}"}
        env |= {"multiprocessors": props.multi_processor_count, "memory_total_gib": total / 2**30}
        env["memory_free_gib"] = free / 2**30
    smi = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.free", "--format=csv,noheader"]
    env["nvidia_smi"] = _command(smi)
    env["nvcc"] = (_command(["nvcc", "--version"]) or "").strip().splitlines()[-1:] or None
    record.finish("ok", environment=env)
    say(plan, f"{env.get('gpu', 'no GPU')}, torch {env['torch']}, CUDA {env['cuda']}")


def _command(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def load_diffusers(plan: Plan, record: Record) -> tuple[Generate, bool]:
    """Stock StableDiffusionPipeline on the same components, before any optimisation."""
    import torch
    from diffusers import StableDiffusionPipeline

    from model.loading import load_components
    from model.options import resolve_dtype

    start = time.perf_counter()
    dtype = resolve_dtype(plan.dtype, torch.device(plan.device))
    with on_device(plan):
        components = load_components(plan.model, dtype)
        components.to(plan.device)
    pipe = StableDiffusionPipeline(**components.modules(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    checker = components.safety_checker is not None
    processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    record.config(variant="diffusers", model=plan.model, dtype=str(dtype).replace("torch.", ""))
    record.config(attention_processors=processors, safety_checker=checker)
    record.config(load_s=round(time.perf_counter() - start, 2))

    def generate(batch: int, steps: int) -> np.ndarray:
        seeds = [torch.Generator(plan.device).manual_seed(i) for i in range(batch)]
        size = {"height": plan.size, "width": plan.size}
        out = pipe([PROMPT] * batch, num_inference_steps=steps, generator=seeds, output_type="np", **size)
        return np.asarray(out.images)

    return generate, checker


def stage_cases(plan: Plan, record: Record) -> None:
    """The stage's variant (or the fastest of its candidates) on the plan's cases; an engine
    variant's images compared with stock diffusers' (stage 2) for the same seeds."""
    stage = next(s for s in STAGES if s.name == plan.stage)
    variant = stage.variants[0] if len(stage.variants) == 1 else plan.fastest
    spec, compare = getattr(plan, stage.model), variant != "diffusers" and stage.model == "model"
    if len(stage.variants) > 1:
        record.config(variant_reason=plan.fastest_reason)
    if variant == "compiled":
        record.add("notes", f"torch.compile backend: {plan.compile_backend}; buckets: the cases' batch sizes")
    if variant == "deepspeed" and (reason := deepspeed_missing(plan, record)):
        record.finish("not_run", reason=reason)
        return say(plan, f"not run: {reason}")
    if variant == "diffusers":
        generate, checker, compiled, end = *load_diffusers(plan, record), False, {}
    else:
        engine = load_engine(plan, record, spec, variant)
        if variant == "deepspeed" and engine.accelerator != "deepspeed":
            if stage.name == "deepspeed":
                record.finish("not_run", reason=engine.accelerator_note)
                return say(plan, f"not run: {engine.accelerator_note}")
            record.add("notes", f"DeepSpeed not used: {engine.accelerator_note}; timed the engine's own path")
        generate, checker = engine_generate(plan, engine), engine.info.safety_checker
        compiled, end = engine.options.compiled, {"accelerator_note": engine.accelerator_note}
    rows = run_cases(plan, record, generate, spec, checker, compiled, compare, variant == "diffusers")
    diffs = [r["mean_abs_diff_vs_diffusers"] for r in rows if r.get("mean_abs_diff_vs_diffusers") is not None]
    if compare:
        end["max_mean_abs_diff_vs_diffusers"] = max(diffs) if diffs else None
        end["all_within_0_01"] = all(d < MAX_MEAN_ABS_DIFF for d in diffs) if diffs else None
    record.finish("ok", **end)


def deepspeed_missing(plan: Plan, record: Record) -> str | None:
    """Why DeepSpeed cannot be imported here, or None."""
    import importlib.util

    import transformers

    record.config(transformers=transformers.__version__, deepspeed_site=plan.deepspeed_site)
    if importlib.util.find_spec("deepspeed") is None:
        site = plan.deepspeed_site
        return "deepspeed is not importable" + (
            f" from --deepspeed-site {site}" if site else " (no --deepspeed-site)"
        )
    import deepspeed

    record.config(deepspeed=deepspeed.__version__)
    return None


def stage_profile(plan: Plan, record: Record) -> None:
    """Per step: (profile of 1 + P steps) - (profile of 1 step), over P; the text encoder, decode
    and checker cancel out, what stays is P denoising steps."""
    import torch

    engine = load_engine(plan, record, plan.model, plan.fastest)
    record.config(variant_reason=plan.fastest_reason, profiled_steps=plan.profile_steps)
    generate, steps = engine_generate(plan, engine), plan.profile_steps
    for batch in plan.batch_sizes:
        if plan.left() < 10:
            record.add("skipped_for_time", f"batch {batch}: not profiled, {plan.left():.0f} s left")
            continue
        one, many = functools.partial(generate, batch, 1), functools.partial(generate, batch, 1 + steps)
        for warm in (one, many, *((many,) if engine.options.compiled else ())):
            warm()
        (wall_one, kernels_one), (wall_many, kernels_many) = _profiled(plan, one), _profiled(plan, many)
        plain_one, plain_many = time_once(one, plan.device).seconds, time_once(many, plan.device).seconds
        per_step = {}
        for name, (us, calls) in kernels_many.items():
            us_one, calls_one = kernels_one.get(name, (0.0, 0))
            per_step[name] = {"ms": (us - us_one) / 1000 / steps, "calls": (calls - calls_one) / steps}
        total_ms = sum(v["ms"] for v in per_step.values())
        top = sorted(per_step.items(), key=lambda kv: kv[1]["ms"], reverse=True)[:10]
        row: dict[str, Any] = {"batch_size": batch, "profiled_steps": steps}
        row["step_wall_ms"] = (plain_many - plain_one) * 1000 / steps
        row["step_wall_ms_profiled"] = (wall_many - wall_one) * 1000 / steps
        row["timed"] = "cuda kernels" if torch.cuda.is_available() else "cpu ops (no CUDA)"
        row["kernel_ms_per_step"] = total_ms
        row["kernel_launches_per_step"] = sum(v["calls"] for v in per_step.values())
        row["top_kernels"] = [
            {"name": name[:200], "ms_per_step": v["ms"], "calls_per_step": v["calls"],
             "share": v["ms"] / total_ms if total_ms else None}
            for name, v in top
        ]  # fmt: skip
        record.add("cases", row)
        top_name = top[0][0][:60] if top else "-"
        say(plan, f"batch {batch}: {row['step_wall_ms']:.2f} ms/step wall, {total_ms:.2f} ms/step in "
                  f"{row['timed']}; top: {top_name}")  # fmt: skip
    record.finish("ok")


def _profiled(plan: Plan, fn: Callable[[], Any]) -> tuple[float, dict[str, tuple[float, int]]]:
    """(wall seconds, {kernel or op: (total us, calls)}): CUDA kernels on a GPU, CPU ops without."""
    import torch
    from torch.autograd import DeviceType  # type: ignore[attr-defined]
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and plan.device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        wall = time_once(fn, plan.device).seconds
    table: dict[str, tuple[float, int]] = {}
    for event in prof.key_averages():
        if getattr(event, "is_user_annotation", False) or cuda != (event.device_type == DeviceType.CUDA):
            continue
        us = float(getattr(event, "self_device_time_total" if cuda else "self_cpu_time_total", 0.0))
        if us > 0:
            table[event.key] = (us, int(event.count))
    return wall, table


def stage_tests(plan: Plan, record: Record) -> None:
    """pytest on the GPU tests, in a process of its own; each test's outcome from its JUnit XML."""
    import xml.etree.ElementTree as ET

    path = next((p for p in plan.tests if (ROOT / p).is_file()), None)
    if path is None:
        return record.finish("error", error=f"none of {plan.tests} exists")
    junit = Path(plan.work) / "junit.xml"
    junit.unlink(missing_ok=True)
    cache = plan.compile_cache
    env = os.environ | {"OMP_NUM_THREADS": str(plan.cpu_threads)} if plan.cpu_threads else dict(os.environ)
    env |= {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    timeout = max(plan.left() - 5, 1)
    argv = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", path, f"--junitxml={junit}"]
    record.config(command=" ".join(["python", "-m", *argv[2:]]), timeout_s=round(timeout))
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else (stopped.stdout or "")
        record.add("skipped_for_time", f"pytest stopped after {timeout:.0f} s; the tests left did not run")
        return record.finish("timeout", output_tail=output[-4000:])
    print(done.stdout[-3000:], flush=True)
    tests = []
    for case in ET.parse(junit).iter("testcase") if junit.is_file() else ():
        test: dict[str, Any] = {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": "passed"}
        test["seconds"] = float(case.get("time") or 0)
        for tag in ("failure", "error", "skipped"):
            if (found := case.find(tag)) is not None:
                test["outcome"] = "failed" if tag == "failure" else tag
                test["message"] = (found.get("message") or "")[:500]
        tests.append(test)
    counts = {k: sum(1 for t in tests if t["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    failed = {"error": f"pytest exited {done.returncode}"} if done.returncode else {}
    output = (done.stdout + done.stderr)[-4000:]
    status = "error" if done.returncode else "ok"
    record.finish(
        status, returncode=done.returncode, counts=counts, tests=tests, output_tail=output, **failed
    )


def stage_images_in(plan: Plan, record: Record) -> None:
    """benchmarks/images_in.py on the plan's model with the eager engine: what image-to-image (strength
    0.5 and 1.0) and inpainting cost per image against text-to-image of the same steps, at the plan's
    batch sizes capped at 8, and a mix of requests (a third each text-to-image, image-to-image 0.6,
    inpainting) stepped together against stock diffusers' three pipelines one request at a time.
    Batch 1 first, then the mix, then the larger batch: what fits first matters most. The 9-channel
    inpainting rows need a random ARCH-inpaint sibling (random:tiny has one, sd-v1-4 none). Its rows
    are under ``cost`` and ``mix`` (not ``cases``: the suite's case table is text-to-image's)."""
    import images_in
    import torch

    import model
    from model.options import resolve_dtype

    device = torch.device(plan.device)
    batches = sorted({min(b, images_in.GPU_MAX_BATCH) for b in plan.batch_sizes})
    requests, warm = (3 if plan.dry_run else 6), max(plan.warm_steps, 2)  # 2: strength 0.5 keeps a step
    sibling = images_in.inpainting_sibling(plan.model)
    options = model.EngineOptions(**VARIANTS["engine"], batch_buckets=tuple(batches))
    record.data |= {"cost": [], "mix": []}
    record.config(variant="engine", model=plan.model, inpaint_model=sibling, batch_sizes=batches,
                  steps=plan.steps, size=plan.size, requests=requests, mix_kinds=list(images_in.MIX_KINDS),
                  warm_steps=warm, options=asdict(options))  # fmt: skip
    if sibling is None:
        record.add("notes", f"{plan.model} has no 9-channel sibling: no 9-channel inpainting rows")
    start = time.perf_counter()
    with on_device(plan):
        engines = {False: model.load(plan.model, device=plan.device, dtype=plan.dtype, options=options)}
        if sibling is not None:
            engines[True] = model.load(sibling, device=plan.device, dtype=plan.dtype, options=options)
        stock = images_in.Stock(plan.model, device, resolve_dtype(plan.dtype, device))
    record.config(load_s=round(time.perf_counter() - start, 2))
    runner = images_in.Runner(
        device, plan.repeats, plan.left, record.save, lambda line: record.add("skipped_for_time", line)
    )
    cost, mix = record.data["cost"], record.data["mix"]
    images_in.cost_cases(runner, engines, batches[0], plan.steps, plan.size, warm, cost)
    images_in.mix_cases(runner, engines[False], stock, requests, plan.steps, plan.size, warm, mix)
    for batch in batches[1:]:
        images_in.cost_cases(runner, engines, batch, plan.steps, plan.size, warm, cost)
    runner.more()
    diff = mix[0].get("max_diff_8bit") if mix else None
    record.finish("ok", max_diff_8bit_vs_diffusers=diff)
    for row in cost:
        say(plan, f"{row['kind']}, batch {row['batch_size']}: {row['seconds_per_image']:.4f} s/image, "
                  f"x{row.get('vs_text_to_image', float('nan')):.2f} text-to-image")  # fmt: skip
    for row in mix:
        say(plan, f"mix of {row['requests']}, {row['runner']}: {row['images_per_s']:.2f} images/s, "
                  f"x{row.get('vs_diffusers', float('nan')):.2f} diffusers, max diff {diff}")  # fmt: skip


def stage_models(plan: Plan, record: Record) -> None:
    """benchmarks/models.py on the plan's architecture (random weights; the suite has no real
    folders: ``--models`` of the script takes them), in the plan's dtype, eager engine: the first
    image (the plan's steps) after a switch from disk (two models saved under ``--work``), from host
    memory and with no switch, with the load time alone; then 8 images (4 in the dry run) of at most
    20 steps round-robin over 1, 2 and 4 resident models, through the step API and the step loop.
    Switches first: what fits first matters most. Rows under ``switch`` and ``throughput`` (not
    ``cases``: the suite's case table is text-to-image's)."""
    import shutil

    import images_in
    import models
    import torch

    from model.options import resolve_dtype

    arch = plan.model.split(":")[1] if plan.model.startswith("random:") else "sd-v1-4"
    dtype = resolve_dtype(plan.dtype, torch.device(plan.device))
    steps, images = (plan.steps, min(plan.steps, 20)), 4 if plan.dry_run else 8
    folder = Path(plan.work) / "models"
    shutil.rmtree(folder, ignore_errors=True)
    record.data |= {"switch": [], "throughput": []}
    record.config(variant="engine", model=f"random:{arch}", dtype=str(dtype).replace("torch.", ""),
                  size=plan.size, steps=steps[0], throughput_steps=steps[1], images=images,
                  share_parts=list(models.shared_parts(plan.device)))  # fmt: skip
    if not plan.model.startswith("random:"):
        record.add("notes", f"{plan.model} is no random model: random:{arch} measured instead")
    start = time.perf_counter()
    folders, specs = models.random_models(arch, folder, dtype, plan.device)
    record.config(
        save_s=round(time.perf_counter() - start, 2), switch_models=folders, throughput_models=specs
    )
    runner = images_in.Runner(
        torch.device(plan.device), plan.repeats, plan.left, record.save,
        lambda line: record.add("skipped_for_time", line),
    )  # fmt: skip
    rows = (record.data["switch"], record.data["throughput"])
    try:
        models.measure(runner, folders, specs, plan.device, dtype, plan.size, steps, images,
                       plan.cpu_threads or None, rows)  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    record.finish("ok")
    for row in rows[0]:
        load = f", load {row['load_s']:.3f} s" if row.get("load_s") is not None else ""
        say(plan, f"switch {row['case']}: {row['seconds']:.3f} s to the first image, "
                  f"x{row.get('vs_resident', float('nan')):.2f} resident{load}")  # fmt: skip
    for row in rows[1]:
        say(plan, f"{row['models']} model(s), {row['runner']}: {row['images_per_s']:.2f} images/s, "
                  f"x{row.get('vs_one_model', float('nan')):.2f} one model")  # fmt: skip


@dataclass(frozen=True)
class Stage:
    """A stage: its cap (the most seconds it may take), the variant it times (or the candidates
    whose fastest it takes) on which of the plan's models, and what runs it."""

    name: str
    title: str
    cap_s: float
    variants: tuple[str, ...] = ()
    model: str = "model"
    run: Callable[[Plan, Record], None] = stage_cases


ENGINE_VARIANTS = ("engine", "compiled", "deepspeed")
# in the order the suite runs them and the report lists them
STAGES: tuple[Stage, ...] = (
    Stage("environment", "environment: GPU, driver, versions, free memory", 30, run=stage_environment),
    Stage("diffusers", "stock diffusers StableDiffusionPipeline, fp16, SDPA", 100, ("diffusers",)),
    Stage("engine", "this engine, eager", 90, ("engine",)),
    Stage("compiled", "this engine, torch.compile + CUDA graphs", 210, ("compiled",)),
    Stage("profile", "per-step profile of the fastest variant (top 10 kernels)", 75, ("engine", "compiled"),
          run=stage_profile),
    Stage("deepspeed", "DeepSpeed-Inference kernels (SD_ACCELERATOR=deepspeed)", 150, ("deepspeed",)),
    Stage("sd2", "random:sd-2-base with the fastest variant", 150, ENGINE_VARIANTS, "sd2_model"),
    Stage("images_in", "images in: image-to-image and inpainting against text-to-image and diffusers", 90,
          run=stage_images_in),
    Stage("models", "several models: a switch's first image (disk, host, none); 1, 2, 4 models interleaved",
          75, run=stage_models),
    Stage("tests", "tests/engine/test_gpu.py", 240, run=stage_tests),
)  # fmt: skip


def use_compile_backend(backend: str) -> None:
    """Make every torch.compile of this process use ``backend`` (the dry run's "eager": Dynamo
    traces the same graphs, Inductor generates no code, so the CPU run fits CI)."""
    import torch

    if backend == "inductor":
        return
    original = torch.compile

    def compile_with(model: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("mode", None)
        return original(model, **kwargs | {"backend": backend})

    torch.compile = compile_with


def preload() -> None:
    """Import what every stage imports, once, in a suite that forks its stage processes."""
    import diffusers  # noqa: F401
    import flops  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import model.loader  # noqa: F401


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
        next(s for s in STAGES if s.name == plan.stage).run(plan, record)
    except BaseException as error:  # a stage's failure is data: record it and let the suite go on
        text = str(error).strip()
        lines = traceback.format_exception(type(error), error, error.__traceback__)
        record.finish(
            "error",
            error=f"{type(error).__name__}: {text.splitlines()[0] if text else ''}",
            traceback="".join(lines)[-6000:],
        )
        say(plan, f"error: {record.data['error']}")
    return 0
