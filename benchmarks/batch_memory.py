"""Batch memory: peak RSS of planning a job and reading its rows (and, with --run, generating them),
each row count in a fresh process, so that memory that grows with the row count shows.

    python benchmarks/batch_memory.py --rows 10000 200000                     # plan + read every row
    python benchmarks/batch_memory.py --rows 500 5000 --run --model random:tiny --steps 1

Prompts are distinct (about 60 bytes each) in CSV files of --per-file rows (one file: --per-file 0).
Prints one line per row count: seconds and peak RSS after importing, after planning, after reading
every pending row (or running them).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def write_prompts(folder: Path, rows: int, per_file: int) -> None:
    """Distinct prompts in CSV files of ``per_file`` rows (written by the parent: not measured)."""
    folder.mkdir()
    per_file = per_file or rows
    for start in range(0, rows, per_file):
        numbers = range(start, min(start + per_file, rows))
        text = "".join(f"a watercolour of lighthouse number {i} at dusk, seed {i * 7}\n" for i in numbers)
        (folder / f"part-{start:08d}.csv").write_text("prompt\n" + text)


def measure(folder: Path, rows: int, run: bool, model: str, steps: int, batch_size: int) -> dict[str, float]:
    """In this process: plan the job in ``folder``, then read (or run) every pending row."""
    sys.path.insert(0, str(ROOT))
    from service.batch.params import JobParams
    from service.batch.plan import plan_job

    out: dict[str, float] = {"rows": rows}
    params = JobParams(num_inference_steps=steps, height=64 if run else None, width=64 if run else None)
    out["import_mb"] = peak_mb()
    started = time.perf_counter()
    plan = plan_job(str(folder), str(folder.parent / "out"), params)
    out["plan_s"], out["plan_mb"] = time.perf_counter() - started, peak_mb()
    started = time.perf_counter()
    if run:
        from service.batch.engine import load_job_engine
        from service.batch.runner import RunConfig, run_job
        from service.settings import load_settings

        engine = load_job_engine(load_settings(model=model, device="cpu"), plan.params)
        out["engine_mb"] = peak_mb()
        result = run_job(engine, plan, RunConfig(batch_size=batch_size))
        assert result.generated == rows, result.stopped
    else:
        pending = plan.pending() if callable(plan.pending) else plan.pending  # also runs older code
        assert sum(1 for _ in pending) == rows
    out["rows_s"], out["rows_mb"] = time.perf_counter() - started, peak_mb()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 200_000])
    p.add_argument("--per-file", type=int, default=5_000, help="rows per input file; 0: one file")
    p.add_argument("--run", action="store_true", help="generate the rows (records and images) too")
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: its rows
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)  # and its input
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.folder, args.one, args.run, args.model, args.steps, args.batch_size)))
        return
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            write_prompts(Path(tmp) / "in", rows, args.per_file)
            child = [sys.executable, __file__, "--one", str(rows), "--folder", str(Path(tmp) / "in")]
            child += ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            child += ["--run"] if args.run else []
            result = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        print("  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
