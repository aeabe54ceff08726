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

Here the plan and the schedule; the stage processes are run by gpu_process.py, the stages are in
gpu_stages.py (and the modules it names), the report is gpu_report.py.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_plan import ENGINE_VARIANTS, STAGES, Plan, read_record, stage_file, write_json
from gpu_process import SuiteStopped, run_stage_process
from gpu_report import report

HERE = Path(__file__).resolve().parent

RESERVE_S = 10.0  # kept back for each stage still to come
MIN_STAGE_S = 8.0  # a stage with less is skipped
GRACE_S = 8.0  # a stage stops starting work this long before it is killed


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
