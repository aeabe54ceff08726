"""GPU suite: one command that measures the engine on an H200 in at most 9 minutes, stage by stage.

    # the GPU machine (the whole command line, wheels included, is in benchmarks/README.md)
    python3 benchmarks/gpu_suite.py --out "$OUT/gpu-suite" --deepspeed-site /tmp/site-ds
    # any CPU: every stage with random:tiny, 2 steps, batches 1 and 2, 64x64 (CI runs this)
    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu-suite
    # a run's folder as markdown, with the goals judged
    python benchmarks/gpu_suite.py --report /tmp/gpu-suite

The stages are declared in gpu_stages.STAGES (name, title, cap, what runs). Each runs in a
process of its own (a crash, a poisoned CUDA context or a hung compile ends that stage only) and
writes ``NN-name.json`` into ``--out`` as it goes. Each stage gets a time budget: at most its cap,
and never so much that the stages after it lose their minimum; time a stage leaves unused goes to
the next. A stage past its budget is killed and keeps what it had recorded; a stage without time
is recorded as skipped; every record lists what was skipped for time. Here: the plan, the
schedule, the stage processes and the report.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HERE, MAX_MEAN_ABS_DIFF, fmt, table
from gpu_stages import ENGINE_VARIANTS, STAGES, Plan, Stage, read_record, stage_file, write_json

RESERVE_S = 10.0  # kept back for each stage still to come
MIN_STAGE_S = 8.0  # a stage with less is skipped
GRACE_S = 8.0  # a stage stops starting work this long before it is killed
# what a run may set: option, type, the GPU run's value, the dry run's (CPU, random:tiny, seconds a stage)
SETTINGS: tuple[tuple[str, type, Any, Any], ...] = (
    ("device", str, "cuda", "cpu"),
    ("model", str, "random:sd-v1-4", "random:tiny"),
    ("sd2-model", str, "random:sd-2-base", "random:tiny"),
    ("size", int, 512, 64),
    ("steps", int, 50, 2),
    ("batch-sizes", str, "1,16", "1,2"),
    ("repeats", int, 3, 2),  # timed runs per case at most
    ("warm-steps", int, 3, 1),  # the untimed warm-up run's steps
    ("profile-steps", int, 10, 2),
    ("compile-backend", str, "inductor", "eager"),  # the dry run's: Dynamo traces, Inductor generates nothing
)


class SuiteStopped(Exception):
    """SIGTERM (a time limit from outside): finish the record of the running stage, then stop."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--out", help="one JSON file per stage goes here")
    add("--dry-run", action="store_true", help="every stage on the CPU with random:tiny")
    add("--report", metavar="DIR", help="print a finished run's folder as markdown, and exit")
    add("--budget-s", type=float, default=540.0, help="wall time for all stages (default 9 min)")
    add("--stages", default="", help="comma-separated names or numbers (default: all)")
    add("--cap", action="append", default=[], metavar="NAME=S", help="override a stage's cap")
    add("--work", default=str(Path(tempfile.gettempdir()) / "sd-gpu-suite"), help="reference images, "
        "logs, compile cache (not --out: that keeps one file per stage)")  # fmt: skip
    add("--deepspeed-site", help="a --target folder with deepspeed and transformers<5.6")
    for name, kind, gpu, dry in SETTINGS:
        add(f"--{name}", type=kind, help=f"default {gpu} (dry run: {dry})")
    add("--init-on-cpu", action="store_true", help="draw random weights on the CPU (default: the GPU)")
    add("--tests", default="tests/engine/test_gpu.py")
    add("--spawn", choices=("auto", "exec", "fork"), default="auto", help="stage processes: a fresh "
        "interpreter each (exec; auto on CUDA) or forks of the suite (auto on the CPU)")  # fmt: skip
    add("--hang", default="", help=argparse.SUPPRESS)  # the suite's tests: this stage never ends
    args = p.parse_args(argv)
    if not (args.report or args.out):
        p.error("--out is required")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    chosen = {}
    for name, _, gpu, dry in SETTINGS:
        given = getattr(args, name.replace("-", "_"))
        chosen[name.replace("-", "_")] = given if given is not None else (dry if args.dry_run else gpu)
    chosen["batch_sizes"] = [int(b) for b in chosen["batch_sizes"].split(",")]
    cpu = chosen["device"] == "cpu"
    site = str(Path(args.deepspeed_site).resolve()) if args.deepspeed_site else None
    return Plan(
        **chosen, out=str(Path(args.out).resolve()), work=str(Path(args.work).resolve()),
        dry_run=args.dry_run, dtype="fp32" if cpu else "fp16", deepspeed_site=site, tests=[args.tests],
        flops_file=str(HERE / "results" / "flops.json"), init_on_device=not args.init_on_cpu,
        cpu_threads=1 if cpu else 0,  # on a shared 2-core VM two spinning OpenMP threads cost 10x and more
    )  # fmt: skip


def fastest(plan: Plan, candidates: tuple[str, ...]) -> tuple[str, str]:
    """The variant with the lowest sum of seconds per image over the batch sizes, among the
    stages that finished every case. A compiled variant counts only when Inductor compiled it:
    Dynamo alone (the dry run's backend) optimises nothing, and would only trace again."""
    index = {s.name: i for i, s in enumerate(STAGES, start=1)}
    scores: dict[str, float] = {}
    note = ""
    for name in candidates:
        if name == "compiled" and plan.compile_backend != "inductor":
            note += f"; compiled left out (backend {plan.compile_backend})"
            continue
        record = read_record(plan.out, index[name], name) or {}
        cases = {c["batch_size"]: c["seconds_per_image"] for c in record.get("cases", [])}
        if record.get("status") == "ok" and all(b in cases for b in plan.batch_sizes):
            scores[name] = sum(cases[b] for b in plan.batch_sizes)
    if not scores:
        return "engine", f"none of {', '.join(candidates)} finished every case: the eager engine{note}"
    detail = ", ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items(), key=lambda kv: kv[1]))
    return min(
        scores, key=lambda k: scores[k]
    ), f"lowest sum of s/image over batches {plan.batch_sizes}: {detail}{note}"


def _stop(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM or SIGINT: once; what follows only completes the records and the report."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SuiteStopped


def run_suite(args: argparse.Namespace) -> int:
    """Steps: 1) plan and folders, 2) each stage in its own process within its budget,
    3) its record completed whatever happened, 4) the report."""
    started = time.time()
    plan = make_plan(args)
    caps = {s.name: s.cap_s if not plan.dry_run else 120.0 for s in STAGES}
    caps |= {name: float(s) for name, _, s in (item.partition("=") for item in args.cap)}
    wanted = {w.strip() for w in args.stages.split(",") if w.strip()}
    stages = [(i, s) for i, s in enumerate(STAGES, start=1) if not wanted or {s.name, str(i)} & wanted]
    if unknown := wanted - {s.name for s in STAGES} - {str(i) for i in range(1, len(STAGES) + 1)}:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {[s.name for s in STAGES]}")
    # 1) the output keeps one file per stage; the work folder keeps the compile cache between runs
    out, work = Path(plan.out), Path(plan.work)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("reference", "logs", "plans"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    for index, stage in stages:
        stage_file(out, index, stage.name).unlink(missing_ok=True)
    plan.extra = {
        "command": " ".join(["python3", "benchmarks/gpu_suite.py", *sys.argv[1:]]),
        "budget_s": args.budget_s,
        "caps_s": caps,
        "stages": [s.name for _, s in stages],
    }
    fork = args.spawn == "fork" or (args.spawn == "auto" and plan.device == "cpu")
    if fork:
        from gpu_stages import preload

        preload()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"GPU suite: {len(stages)} stages in at most {args.budget_s:.0f} s -> {out}", flush=True)
    stopped = False
    for position, (index, stage) in enumerate(stages):
        left = started + args.budget_s - time.time()
        budget = min(caps[stage.name], left - RESERVE_S * (len(stages) - position - 1))
        skip = "the suite was stopped" if stopped else f"{left:.0f} s left" if budget < MIN_STAGE_S else ""
        try:
            if not skip:  # 2) + 3)
                stopped = not run_stage_process(stage_plan(plan, index, stage, budget, args.hang), fork)
        except SuiteStopped:  # between stage processes
            stopped, skip = True, "the suite was stopped"
        if skip and read_record(plan.out, index, stage.name) is None:
            record = {"stage": index, "name": stage.name, "title": stage.title, "status": "skipped"}
            write_json(
                stage_file(out, index, stage.name), record | {"skipped_for_time": [f"not started: {skip}"]}
            )
            print(f"[{stage.name}] skipped: {skip}", flush=True)
    print(report(plan.out), flush=True)  # 4)
    print(f"GPU suite done in {time.time() - started:.0f} s", flush=True)
    return 0


def stage_plan(plan: Plan, index: int, stage: Stage, budget: float, hang: str) -> Plan:
    """The plan of one stage: its budget and deadline, and the variant it takes when it has a choice."""
    extra = plan.extra | ({"hang": True} if stage.name == hang else {})
    one = replace(plan, stage=stage.name, index=index, title=stage.title, budget_s=budget, extra=extra)
    one.deadline = time.time() + budget - GRACE_S
    if len(stage.variants) > 1:  # the fastest of the variants measured so far
        variant, one.fastest_reason = fastest(plan, stage.variants)
        one.fastest = one.sd2_variant = variant
    return one


# ------------------------------------------------------------------------------ stage processes


def run_stage_process(plan: Plan, fork: bool) -> bool:
    """Run one stage in a process of its own; complete its record. False if the suite was stopped.

    A fresh interpreter (spawn) wherever CUDA may be used: CUDA does not survive a fork. On the
    CPU (the dry run) a fork of the suite, which has imported torch and diffusers once, so that
    ten stages do not pay ten imports. DeepSpeed's stage always gets a fresh interpreter,
    with ``--deepspeed-site`` first on its path.
    """
    plan_file = Path(plan.work) / "plans" / f"{plan.index:02d}-{plan.stage}.json"
    log = Path(plan.work) / "logs" / f"{plan.index:02d}-{plan.stage}.log"
    write_json(plan_file, asdict(plan))
    print(f"[{plan.stage}] stage {plan.index}: {plan.title} (budget {plan.budget_s:.0f} s)", flush=True)
    deepspeed = "deepspeed" in (plan.stage, plan.fastest)
    site = plan.deepspeed_site if deepspeed else None
    context = multiprocessing.get_context("fork" if fork and not deepspeed else "spawn")
    started, cpu_before = time.time(), _children_cpu_s()
    stage = (str(plan_file), str(log), site)
    process = context.Process(target=_stage_main, args=stage)  # type: ignore[attr-defined]
    process.start()
    killed = stopped = False
    try:
        process.join(max(started + plan.budget_s - time.time(), 1))
        killed = process.exitcode is None
    except SuiteStopped:
        killed = stopped = True
    # a signal from here on waits until the record is complete
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    if killed:  # its process group: whatever it started (pytest, compile workers) goes with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        process.join()
    output = log.read_text(errors="replace") if log.is_file() else ""
    sys.stdout.write(output)
    finish_record(plan, process.exitcode, killed, stopped, time.time() - started, output)
    _add_to_record(plan, cpu_s=round(_children_cpu_s() - cpu_before, 1))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    return not stopped


def _stage_main(plan_file: str, log: str, site: str | None) -> None:
    """A stage process: a session of its own, its output into the log, the stage run, its code."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with open(log, "wb") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    for stream in (sys.stdout, sys.stderr):  # lines reach the log before a kill can come
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if site:  # before anything imports transformers: DeepSpeed needs its own
        sys.path.insert(0, site)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    from gpu_stages import run_stage

    sys.exit(run_stage(plan_file))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _add_to_record(plan: Plan, **values: Any) -> None:
    record = read_record(plan.out, plan.index, plan.stage)
    if record is not None:
        write_json(stage_file(plan.out, plan.index, plan.stage), record | values)


def finish_record(
    plan: Plan, returncode: int | None, killed: bool, stopped: bool, wall: float, output: str
) -> None:
    """The stage's record as the process left it, completed: its end, and why when it did not finish."""
    blank: dict[str, Any] = {"stage": plan.index, "name": plan.stage, "title": plan.title, "cases": []}
    blank["status"] = "running"
    record = read_record(plan.out, plan.index, plan.stage) or blank
    if record.get("status") == "running":
        record["status"] = "timeout" if killed else "crashed"
    if killed:
        why = "the suite was stopped" if stopped else f"its {plan.budget_s:.0f} s budget ran out"
        done = f"stopped: {why}; the cases above had finished, the rest did not run"
        record["skipped_for_time"] = [*record.get("skipped_for_time", []), done]
    record.update(returncode=returncode, wall_s=round(wall, 1), budget_s=round(plan.budget_s, 1))
    if record["status"] not in ("ok", "not_run", "skipped"):
        record["log_tail"] = "\n".join(output.splitlines()[-60:])[-6000:]
    write_json(stage_file(plan.out, plan.index, plan.stage), record)
    print(f"[{plan.stage}] {record['status']} in {wall:.0f} s", flush=True)


# ------------------------------------------------------------------------------------ the report


Row = dict[str, Any]


def reasons(record: Row) -> list[str]:
    return [record[k] for k in ("reason", "error") if record.get(k)]


# the report's tables, column by column: header, cell of (stage record, case, stock diffusers' case)
STAGE_COLUMNS: tuple[tuple[str, Callable[[Row], Any]], ...] = (
    ("stage", lambda r: f"{r['stage']} {r['name']}"),
    ("status", lambda r: r["status"]),
    ("wall s", lambda r: r.get("wall_s", "-")),
    ("budget s", lambda r: r.get("budget_s", "-")),
    ("skipped for time / reason", lambda r: "; ".join(r.get("skipped_for_time", []) + reasons(r)) or "-"),
)  # fmt: skip
CASE_COLUMNS: tuple[tuple[str, Callable[[Row, Row, Row | None], Any]], ...] = (
    ("stage", lambda r, c, s: r["stage"]),
    ("variant", lambda r, c, s: r.get("config", {}).get("variant", "-")),
    ("model", lambda r, c, s: r.get("config", {}).get("model", "-")),
    ("batch", lambda r, c, s: c["batch_size"]),
    ("s/image", lambda r, c, s: f"{c['seconds_per_image']:.4f}"),
    ("images/s", lambda r, c, s: f"{c['images_per_s']:.2f}"),
    ("peak GiB", lambda r, c, s: fmt(c.get("peak_gib"), ".1f")),
    ("MFU", lambda r, c, s: f"{c['mfu']:.1%}" if c["mfu"] >= 0.001 else f"{c['mfu']:.1e}"),
    ("x diffusers", lambda r, c, s: fmt(s and s["seconds_per_image"] / c["seconds_per_image"], ".2f")),
    ("mean abs diff", lambda r, c, s: fmt(c.get("mean_abs_diff_vs_diffusers"), ".5f")),
    ("runs", lambda r, c, s: c["timed_runs"]),
)  # fmt: skip
KERNEL_COLUMNS: tuple[tuple[str, Callable[[Row], Any]], ...] = (
    ("kernel", lambda k: f"`{k['name'][:90]}`"),
    ("ms/step", lambda k: f"{k['ms_per_step']:.3f}"),
    ("share", lambda k: fmt(k["share"], ".1%")),
    ("calls/step", lambda k: f"{k['calls_per_step']:.0f}"),
)
# the README's goals: text, the smallest (0) or largest (-1) batch, figure, bound, whether it is a floor
GOALS: tuple[tuple[str, int, str, float, bool], ...] = (
    ("batch-{b} latency <= {g} s/image", 0, "seconds_per_image", 0.30, False),
    ("throughput >= {g} images/s (batch {b})", -1, "images_per_s", 6.0, True),
    (">= {g}x stock diffusers at batch {b}", 0, "speedup", 2.5, True),
    (">= {g}x stock diffusers at batch {b}", -1, "speedup", 1.8, True),
)


def report(out: str) -> str:
    """A run's folder as markdown: stages, cases with speedups over stock diffusers, profiles, goals."""
    records = [r for i, s in enumerate(STAGES, start=1) if (r := read_record(out, i, s.name))]
    env: Row = next((r.get("environment", {}) for r in records if r["name"] == "environment"), {})
    dry = any(r.get("dry_run") for r in records)
    started = next((r.get("started") for r in records), "?")
    lines = [f"# GPU suite{' (dry run on CPU)' if dry else ''}: {env.get('gpu', 'no GPU')}", ""]
    versions = ", ".join(f"{k} {env.get(k.lower())}" for k in ("torch", "CUDA", "diffusers", "transformers"))
    lines += [f"{started}; {versions}, driver `{env.get('nvidia_smi') or '-'}`", ""]
    lines += table([h for h, _ in STAGE_COLUMNS], ([cell(r) for _, cell in STAGE_COLUMNS] for r in records))
    stock = {c["batch_size"]: c for r in records if r["name"] == "diffusers" for c in r.get("cases", [])}
    timed = [(r, c) for r in records if r["name"] not in ("profile", "tests") for c in r.get("cases", [])]
    against = {id(c): stock.get(c["batch_size"]) if r["name"] != "sd2" else None for r, c in timed}
    cases = ([cell(r, c, against[id(c)]) for _, cell in CASE_COLUMNS] for r, c in timed)
    lines += ["", *table([h for h, _ in CASE_COLUMNS], cases)]
    for r in (r for r in records if r["name"] == "profile"):
        config = r.get("config", {})
        lines += ["", f"Profile of `{config.get('variant')}` ({config.get('variant_reason', '')}):"]
        for c in r.get("cases", []):
            lines += ["", f"batch {c['batch_size']}: {c['step_wall_ms']:.2f} ms per step (wall), "
                      f"{c['kernel_ms_per_step']:.2f} ms of {c['timed']}, "
                      f"{c['kernel_launches_per_step']:.0f} calls per step", ""]  # fmt: skip
            kernels = ([cell(k) for _, cell in KERNEL_COLUMNS] for k in c["top_kernels"])
            lines += table([h for h, _ in KERNEL_COLUMNS], kernels)
    return "\n".join([*lines, "", *goals(records, dry)]) + "\n"


def goals(records: list[Row], dry: bool) -> list[str]:
    """Each goal, met or not, by the fastest engine variant at its batch size."""
    done = {r["name"]: {c["batch_size"]: c for c in r["cases"]} for r in records if r["status"] == "ok"}
    stock, variants = done.get("diffusers", {}), {n: done[n] for n in ENGINE_VARIANTS if done.get(n)}
    if not variants:
        return ["Goals: not judged (no engine variant finished)."]
    batches = sorted(stock or next(iter(variants.values())))
    rows = []
    for text, end, figure, bound, floor in GOALS:
        batch = batches[end]
        found = [
            (c[batch]["seconds_per_image"], name, c[batch]) for name, c in variants.items() if batch in c
        ]
        if not found or (figure == "speedup" and batch not in stock):
            continue
        _, name, case = min(found)
        value = (
            stock[batch]["seconds_per_image"] / case["seconds_per_image"]
            if figure == "speedup"
            else case[figure]
        )
        shown = (
            f"{value:.4f}" if figure == "seconds_per_image" else f"{value:.2f}" + "x" * (figure == "speedup")
        )
        rows.append(
            (text.format(b=batch, g=bound), f"{shown} ({name})", value >= bound if floor else value <= bound)
        )
    diffs = [c["mean_abs_diff_vs_diffusers"] for cs in variants.values() for c in cs.values()
             if c.get("mean_abs_diff_vs_diffusers") is not None]  # fmt: skip
    if diffs:
        rows.append((f"images within {MAX_MEAN_ABS_DIFF} mean abs of stock", f"max {max(diffs):.5f}",
                     max(diffs) < MAX_MEAN_ABS_DIFF))  # fmt: skip
    caveat = ": a dry run on CPU, so these say nothing about the goals" if dry else ""
    head = f"Goals (H200, 512x512, 50 steps, fp16, checker on){caveat}"
    return [head, "", *table(["goal", "measured", "met"], ((g, v, "yes" if m else "no") for g, v, m in rows))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print(report(args.report), end="")
        return 0
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
