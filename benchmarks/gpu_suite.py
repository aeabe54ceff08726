"""GPU suite: one command that measures the engine on an H200 in at most 9 minutes, stage by stage.

    # the GPU machine (the whole command line, wheels included, is in benchmarks/README.md)
    python3 benchmarks/gpu_suite.py --out "$OUT/gpu-suite" --deepspeed-site /tmp/site-ds
    # any CPU: every stage with random:tiny, 2 steps, batches 1 and 2, 64x64 (CI runs this)
    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu-suite
    # a run's folder as markdown, with the goals judged
    python benchmarks/gpu_suite.py --report /tmp/gpu-suite

Stages, in this order, each in a process of its own (a crash, a poisoned CUDA context or a hung
compile ends that stage only), each writing ``NN-name.json`` into ``--out`` as it goes:
  1 environment   GPU, driver, torch/CUDA/diffusers/transformers versions, free memory
  2 diffusers     stock StableDiffusionPipeline, fp16, SDPA, random:sd-v1-4, 512x512, 50 steps, batch 1, 16
  3 engine        this engine eager, same cases, mean absolute image difference to stage 2
  4 compiled      torch.compile + CUDA graphs (only the buckets these cases need), same cases
  5 profile       per-step profile of the fastest of 3 and 4 at batch 1 and 16 (top 10 CUDA kernels)
  6 deepspeed     DeepSpeed-Inference kernels, same cases, or the reason they could not run
  7 sd2           random:sd-2-base at batch 1 and 16 with the fastest variant
  8 tests         tests/engine/test_gpu.py
Each stage gets a time budget: at most its cap, and never so much that the stages after it lose
their minimum; time a stage leaves unused goes to the next. A stage past its budget is killed and
keeps what it had recorded; a stage without time is recorded as skipped; every record lists what
was skipped for time. Cases report seconds per image, images/s, peak memory and MFU against
790 TFLOP/s with the FLOPs counted by benchmarks/flops.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_stages import ENGINE_VARIANTS, MAX_MEAN_ABS_DIFF, Plan, stage_file, write_json

HERE = Path(__file__).resolve().parent

# name, title, cap in seconds (the most the stage may take)
STAGES: tuple[tuple[str, str, float], ...] = (
    ("environment", "environment: GPU, driver, versions, free memory", 30),
    ("diffusers", "stock diffusers StableDiffusionPipeline, fp16, SDPA", 100),
    ("engine", "this engine, eager", 90),
    ("compiled", "this engine, torch.compile + CUDA graphs", 210),
    ("profile", "per-step profile of the fastest variant (top 10 kernels)", 75),
    ("deepspeed", "DeepSpeed-Inference kernels (SD_ACCELERATOR=deepspeed)", 150),
    ("sd2", "random:sd-2-base with the fastest variant", 150),
    ("tests", "tests/engine/test_gpu.py", 240),
)
RESERVE_S = 10.0  # kept back for each stage still to come
MIN_STAGE_S = 8.0  # a stage with less is skipped
GRACE_S = 8.0  # a stage stops starting work this long before it is killed
GOALS = {"latency_s": 0.30, "throughput": 6.0, "speedup_b1": 2.5, "speedup_b16": 1.8}


class SuiteStopped(Exception):
    """SIGTERM (a time limit from outside): finish the record of the running stage, then stop."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="one JSON file per stage goes here")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU with random:tiny")
    p.add_argument("--report", metavar="DIR", help="print a finished run's folder as markdown, and exit")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall time for all stages (default 9 min)")
    p.add_argument("--stages", default="", help="comma-separated names or numbers (default: all)")
    p.add_argument("--cap", action="append", default=[], metavar="NAME=S", help="override a stage's cap")
    p.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "sd-gpu-suite"),
        help="reference images, logs, compile cache (not --out: that keeps one file per stage)",
    )
    p.add_argument(
        "--deepspeed-site",
        default=None,
        help="a --target folder with deepspeed and transformers<5.6 (first on the DeepSpeed stage's path)",
    )
    p.add_argument("--model", default=None)
    p.add_argument("--sd2-model", default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-sizes", default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case at most")
    p.add_argument("--profile-steps", type=int, default=None)
    p.add_argument("--compile-backend", default=None, help="inductor (GPU default), eager (dry-run default)")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--init-on-cpu",
        action="store_true",
        help="draw random weights on the CPU (default: on the GPU, seconds instead of a minute)",
    )
    p.add_argument("--tests", default="tests/engine/test_gpu.py")
    p.add_argument(
        "--spawn",
        choices=("auto", "exec", "fork"),
        default="auto",
        help="stage processes: a fresh interpreter each (exec; auto on CUDA) or forks (auto on the CPU)",
    )
    p.add_argument("--stage-plan", help=argparse.SUPPRESS)  # internal: run one stage from its plan
    p.add_argument("--hang", default="", help=argparse.SUPPRESS)  # the suite's tests: this stage never ends
    args = p.parse_args(argv)
    if not (args.report or args.stage_plan or args.out):
        p.error("--out is required")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    dry = args.dry_run
    device = args.device or ("cpu" if dry else "cuda")
    return Plan(
        out=str(Path(args.out).resolve()),
        work=str(Path(args.work).resolve()),
        dry_run=dry,
        device=device,
        dtype="fp32" if device == "cpu" else "fp16",
        model=args.model or ("random:tiny" if dry else "random:sd-v1-4"),
        sd2_model=args.sd2_model or ("random:tiny" if dry else "random:sd-2-base"),
        size=args.size or (64 if dry else 512),
        steps=args.steps or (2 if dry else 50),
        batch_sizes=[int(b) for b in (args.batch_sizes or ("1,2" if dry else "1,16")).split(",")],
        repeats=args.repeats or (2 if dry else 3),
        warm_steps=1 if dry else 3,
        profile_steps=args.profile_steps or (2 if dry else 10),
        compile_backend=args.compile_backend or ("eager" if dry else "inductor"),
        deepspeed_site=str(Path(args.deepspeed_site).resolve()) if args.deepspeed_site else None,
        tests=[args.tests],
        flops_file=str(HERE / "results" / "flops.json"),
        init_on_device=not args.init_on_cpu,
        # one thread: on a shared 2-core VM, two spinning OpenMP threads per op cost 10x and more
        cpu_threads=1 if device == "cpu" else 0,
    )


def selected_stages(text: str) -> list[tuple[int, str, str, float]]:
    stages = [(i, name, title, cap) for i, (name, title, cap) in enumerate(STAGES, start=1)]
    if not text:
        return stages
    wanted = {w.strip() for w in text.split(",") if w.strip()}
    known = {name for _, name, _, _ in stages} | {str(i) for i, *_ in stages}
    if wanted - known:
        raise SystemExit(f"unknown stages {sorted(wanted - known)}; choose from {[s[1] for s in stages]}")
    return [s for s in stages if s[1] in wanted or str(s[0]) in wanted]


def read_record(out: str, index: int, name: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(stage_file(out, index, name).read_text())
        return data
    except (OSError, ValueError):
        return None


def fastest(plan: Plan, candidates: tuple[str, ...]) -> tuple[str, str]:
    """The variant with the lowest sum of seconds per image over the batch sizes, among the
    stages that finished every case. A compiled variant counts only when Inductor compiled it:
    Dynamo alone (the dry run's backend) optimises nothing, and would only trace again."""
    index = {name: i for i, (name, _, _) in enumerate(STAGES, start=1)}
    scores: dict[str, float] = {}
    left_out = []
    for name in candidates:
        if name == "compiled" and plan.compile_backend != "inductor":
            left_out.append(f"compiled left out (backend {plan.compile_backend})")
            continue
        record = read_record(plan.out, index[name], name)
        if not record or record.get("status") != "ok":
            continue
        cases = {c["batch_size"]: c["seconds_per_image"] for c in record.get("cases", [])}
        if all(b in cases for b in plan.batch_sizes):
            scores[name] = sum(cases[b] for b in plan.batch_sizes)
    note = "".join(f"; {text}" for text in left_out)
    if not scores:
        return "engine", f"none of {', '.join(candidates)} finished every case: the eager engine{note}"
    best = min(scores, key=lambda k: scores[k])
    detail = ", ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items(), key=lambda kv: kv[1]))
    return best, f"lowest sum of s/image over batches {plan.batch_sizes}: {detail}{note}"


def _stop(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM or SIGINT: once; what follows only completes the records and the report."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SuiteStopped


def _skip(out: Path, index: int, name: str, title: str, reason: str) -> None:
    record = {"stage": index, "name": name, "title": title, "status": "skipped"}
    write_json(stage_file(out, index, name), record | {"skipped_for_time": [f"not started: {reason}"]})
    print(f"[{name}] skipped: {reason}", flush=True)


def run_suite(args: argparse.Namespace) -> int:
    """Steps: 1) plan and folders, 2) each stage in its own process within its budget,
    3) its record completed whatever happened, 4) the report."""
    started = time.time()
    deadline = started + args.budget_s
    plan = make_plan(args)
    caps = {name: cap if not plan.dry_run else 120.0 for name, _, cap in STAGES}
    for item in args.cap:
        name, _, seconds = item.partition("=")
        caps[name] = float(seconds)
    stages = selected_stages(args.stages)
    # 1) the output keeps one file per stage; the work folder keeps the compile cache between runs
    out, work = Path(plan.out), Path(plan.work)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("reference", "logs", "plans"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    for index, name, _, _ in stages:
        stage_file(out, index, name).unlink(missing_ok=True)
    plan.extra = {
        "command": " ".join(["python3", "benchmarks/gpu_suite.py", *sys.argv[1:]]),
        "budget_s": args.budget_s,
        "caps_s": caps,
        "stages": [name for _, name, _, _ in stages],
    }
    fork = args.spawn == "fork" or (args.spawn == "auto" and plan.device == "cpu")
    if fork:
        from gpu_stages import preload

        preload()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"GPU suite: {len(stages)} stages in at most {args.budget_s:.0f} s -> {out}", flush=True)
    stopped = False
    for position, (index, name, title, _) in enumerate(stages):
        later = len(stages) - position - 1
        left = deadline - time.time()
        budget = min(caps[name], left - RESERVE_S * later)
        if stopped or budget < MIN_STAGE_S:
            _skip(out, index, name, title, "the suite was stopped" if stopped else f"{left:.0f} s left")
            continue
        try:
            stage_plan = Plan(**asdict(plan))
            stage_plan.stage, stage_plan.index, stage_plan.title = name, index, title
            stage_plan.budget_s = budget
            stage_plan.extra = plan.extra | ({"hang": True} if name == args.hang else {})
            stage_plan.deadline = time.time() + budget - GRACE_S
            if name in ("profile", "sd2"):
                candidates = ("engine", "compiled") if name == "profile" else ENGINE_VARIANTS
                variant, reason = fastest(plan, candidates)
                stage_plan.fastest = stage_plan.sd2_variant = variant
                stage_plan.fastest_reason = reason
            deepspeed_path = name == "deepspeed" or (name == "sd2" and stage_plan.sd2_variant == "deepspeed")
            # 2) + 3)
            stopped = not run_stage_process(stage_plan, deepspeed_path, fork)
        except SuiteStopped:  # between stage processes
            stopped = True
            if read_record(plan.out, index, name) is None:
                _skip(out, index, name, title, "the suite was stopped")
    # 4)
    print(report(plan.out), flush=True)
    print(f"GPU suite done in {time.time() - started:.0f} s", flush=True)
    return 0


def run_stage_process(plan: Plan, deepspeed_path: bool, fork: bool) -> bool:
    """Run one stage in its own process group; complete its record. False if the suite was stopped."""
    work = Path(plan.work)
    plan_file = work / "plans" / f"{plan.index:02d}-{plan.stage}.json"
    plan_file.write_text(json.dumps(asdict(plan), indent=2))
    log_path = work / "logs" / f"{plan.index:02d}-{plan.stage}.log"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    if deepspeed_path and plan.deepspeed_site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [plan.deepspeed_site, env.get("PYTHONPATH", "")]))
    started = time.time()
    cpu_before = _children_cpu_s()
    print(f"[{plan.stage}] stage {plan.index}: {plan.title} (budget {plan.budget_s:.0f} s)", flush=True)
    killed = stopped = False
    with log_path.open("w") as log:
        proc = StageProcess(plan_file, env, fork=fork and not deepspeed_path)
        reader = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(started + plan.budget_s - time.time(), 1))
        except subprocess.TimeoutExpired:
            killed = True
        except SuiteStopped:
            killed = stopped = True
        if killed:
            with _ignoring_sigterm():
                proc.kill()
        reader.join(timeout=5)
    finish_record(plan, proc.returncode, killed, stopped, time.time() - started, log_path)
    _add_to_record(plan, cpu_s=round(_children_cpu_s() - cpu_before, 1))
    return not stopped


class StageProcess:
    """A stage's process, in a process group of its own (killing it kills whatever it started).

    A fresh interpreter (exec) wherever CUDA may be used: CUDA does not survive a fork. On the CPU
    (the dry run) a fork of the suite, which has imported torch and diffusers once, so that eight
    stages do not pay eight imports.
    """

    def __init__(self, plan_file: Path, env: dict[str, str], fork: bool) -> None:
        self.returncode: int | None = None
        self._popen: subprocess.Popen[str] | None = None
        self.stdout: IO[str]
        if fork:
            sys.stdout.flush()
            sys.stderr.flush()
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                _forked_stage(plan_file, read, write)  # never returns
            os.close(write)
            self.pid = pid
            self.stdout = os.fdopen(read, "r", errors="replace")
        else:
            self._popen = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--stage-plan", str(plan_file)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                env=env,
                start_new_session=True,
            )
            self.pid = self._popen.pid
            assert self._popen.stdout is not None
            self.stdout = self._popen.stdout

    def wait(self, timeout: float) -> int:
        """The exit status; subprocess.TimeoutExpired if it is still running after ``timeout``."""
        if self._popen is not None:
            self.returncode = self._popen.wait(timeout=timeout)
            return self.returncode
        end = time.time() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                return self.returncode
            if time.time() >= end:
                raise subprocess.TimeoutExpired(f"stage process {self.pid}", timeout)
            time.sleep(0.1)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self._popen is not None:
            self.returncode = self._popen.wait()
        else:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)


def _forked_stage(plan_file: Path, read: int, write: int) -> None:
    """The forked child: a session of its own, output into the pipe, run the stage, exit."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.close(read)
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        from gpu_stages import run_stage

        code = run_stage(str(plan_file))
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _add_to_record(plan: Plan, **values: Any) -> None:
    record = read_record(plan.out, plan.index, plan.stage)
    if record is not None:
        write_json(stage_file(plan.out, plan.index, plan.stage), record | values)


class _ignoring_sigterm:
    def __enter__(self) -> None:
        self.previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _tee(stream: Any, log: Any) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        sys.stdout.write(line)
        sys.stdout.flush()


def finish_record(
    plan: Plan, returncode: int | None, killed: bool, stopped: bool, wall: float, log: Path
) -> None:
    record = read_record(plan.out, plan.index, plan.stage) or {
        "stage": plan.index,
        "name": plan.stage,
        "title": plan.title,
        "status": "running",
        "cases": [],
        "skipped_for_time": [],
    }
    if record.get("status") == "running":
        record["status"] = "timeout" if killed else "crashed"
    if killed:
        why = "the suite was stopped" if stopped else f"its {plan.budget_s:.0f} s budget ran out"
        record.setdefault("skipped_for_time", []).append(
            f"stopped: {why}; the cases above had finished, the rest did not run"
        )
    record.update(returncode=returncode, wall_s=round(wall, 1), budget_s=round(plan.budget_s, 1))
    if record["status"] not in ("ok", "not_run", "skipped"):
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        record["log_tail"] = "\n".join(lines[-60:])[-6000:]
    write_json(stage_file(plan.out, plan.index, plan.stage), record)
    print(f"[{plan.stage}] {record['status']} in {wall:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------ report


def report(out: str) -> str:
    """A run's folder as markdown: stages, cases with speedups, profiles, and the goals."""
    records = [r for i, (name, _, _) in enumerate(STAGES, start=1) if (r := read_record(out, i, name))]
    env: dict[str, Any] = next((r.get("environment", {}) for r in records if r["name"] == "environment"), {})
    dry = any(r.get("dry_run") for r in records)
    lines = [
        f"# GPU suite{' (dry run on CPU)' if dry else ''}: {env.get('gpu', 'no GPU')}",
        "",
        f"{next((r.get('started') for r in records), '?')}; torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}, "
        f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, "
        f"driver `{env.get('nvidia_smi') or '-'}`",
        "",
        "| stage | status | wall s | budget s | skipped for time / reason |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        why = "; ".join(r.get("skipped_for_time", []) + ([r["reason"]] if r.get("reason") else []))
        if r.get("error"):
            why = (why + "; " if why else "") + r["error"]
        lines.append(
            f"| {r['stage']} {r['name']} | {r['status']} | {r.get('wall_s', '-')} | "
            f"{r.get('budget_s', '-')} | {why or '-'} |"
        )
    base = {c["batch_size"]: c for r in records if r["name"] == "diffusers" for c in r.get("cases", [])}
    lines += [
        "",
        "| stage | variant | model | batch | s/image | images/s | peak GiB | MFU | x diffusers "
        "| mean abs diff | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["name"] in ("profile", "tests", "environment"):
            continue
        config = r.get("config", {})
        for c in r.get("cases", []):
            ref = base.get(c["batch_size"]) if r["name"] != "sd2" else None
            speedup = ref["seconds_per_image"] / c["seconds_per_image"] if ref else None
            cells = [
                r["stage"],
                config.get("variant", "-"),
                config.get("model", "-"),
                c["batch_size"],
                f"{c['seconds_per_image']:.4f}",
                f"{c['images_per_s']:.2f}",
                _fmt(c.get("peak_gib"), ".1f"),
                _percent(c["mfu"]),
                _fmt(speedup, ".2f"),
                _fmt(c.get("mean_abs_diff_vs_diffusers"), ".5f"),
                c["timed_runs"],
            ]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    for r in records:
        if r["name"] != "profile":
            continue
        lines += [
            "",
            f"Profile of `{r.get('config', {}).get('variant')}` "
            f"({r.get('config', {}).get('variant_reason', '')}):",
        ]
        for c in r.get("cases", []):
            lines += [
                "",
                f"batch {c['batch_size']}: {c['step_wall_ms']:.2f} ms per step (wall), "
                f"{c['kernel_ms_per_step']:.2f} ms of {c['timed']}, "
                f"{c['kernel_launches_per_step']:.0f} calls per step",
                "",
                "| kernel | ms/step | share | calls/step |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| `{k['name'][:90]}` | {k['ms_per_step']:.3f} | {_fmt(k['share'], '.1%')} "
                f"| {k['calls_per_step']:.0f} |"
                for k in c["top_kernels"]
            ]
    lines += ["", *goals(records, dry)]
    return "\n".join(lines) + "\n"


def goals(records: list[dict[str, Any]], dry: bool) -> list[str]:
    by_name = {r["name"]: r for r in records}

    def cases(name: str) -> dict[int, dict[str, Any]]:
        r = by_name.get(name)
        return {c["batch_size"]: c for c in r.get("cases", [])} if r and r["status"] == "ok" else {}

    stock = cases("diffusers")
    variants = {name: cases(name) for name in ENGINE_VARIANTS if cases(name)}
    if not variants:
        return ["Goals: not judged (no engine variant finished)."]
    small, large = min(stock or next(iter(variants.values()))), max(stock or next(iter(variants.values())))

    def best(batch: int) -> tuple[str, dict[str, Any]] | None:
        found = [(name, c[batch]) for name, c in variants.items() if batch in c]
        return min(found, key=lambda nc: nc[1]["seconds_per_image"]) if found else None

    rows = []
    one, many = best(small), best(large)
    if one:
        rows.append(
            (
                f"batch-{small} latency <= {GOALS['latency_s']} s/image",
                f"{one[1]['seconds_per_image']:.4f} ({one[0]})",
                one[1]["seconds_per_image"] <= GOALS["latency_s"],
            )
        )
    if many:
        rows.append(
            (
                f"throughput >= {GOALS['throughput']} images/s (batch {large})",
                f"{many[1]['images_per_s']:.2f} ({many[0]})",
                many[1]["images_per_s"] >= GOALS["throughput"],
            )
        )
    for batch, goal in ((small, GOALS["speedup_b1"]), (large, GOALS["speedup_b16"])):
        pick = best(batch)
        if pick and batch in stock:
            ratio = stock[batch]["seconds_per_image"] / pick[1]["seconds_per_image"]
            rows.append(
                (f">= {goal}x stock diffusers at batch {batch}", f"{ratio:.2f}x ({pick[0]})", ratio >= goal)
            )
    diffs: list[float] = [
        c["mean_abs_diff_vs_diffusers"]
        for cs in variants.values()
        for c in cs.values()
        if c.get("mean_abs_diff_vs_diffusers") is not None
    ]
    if diffs:
        rows.append(
            (
                f"images within {MAX_MEAN_ABS_DIFF} mean abs of stock",
                f"max {max(diffs):.5f}",
                max(diffs) < MAX_MEAN_ABS_DIFF,
            )
        )
    head = "Goals (H200, 512x512, 50 steps, fp16, checker on)" + (
        ": a dry run on CPU, so these say nothing about the goals" if dry else ""
    )
    return [head, "", "| goal | measured | met |", "|---|---|---|"] + [
        f"| {goal} | {value} | {'yes' if met else 'no'} |" for goal, value, met in rows
    ]


def _percent(value: float) -> str:
    return f"{value:.1%}" if value >= 0.001 else f"{value:.1e}"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage_plan:
        from gpu_stages import run_stage

        return run_stage(args.stage_plan)
    if args.report:
        print(report(args.report), end="")
        return 0
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
