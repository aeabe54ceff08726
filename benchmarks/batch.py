"""Batch benchmark: the batch runner against the engine alone at the same batch size, in one run.

    python benchmarks/batch.py --model random:tiny --rows 48 --batch-size 8 --steps 4            # CPU smoke
    python benchmarks/batch.py --model random:sd-v1-4 --rows 256 --batch-size 8 --steps 25       # GPU

Engine alone: the job's items, in batches of --batch-size, results dropped (no PNG, no storage).
Batch: ``plan_job`` + ``run_job`` (the code of `sd-endpoint batch`): the engine in this thread while
a pool encodes PNGs and writes images and records; targets a local folder and Azurite (when
`npm install --prefix .ci azurite` has been run). The engine alone and the targets run in interleaved
rounds and the medians are compared; the goal is >= 95 % of the engine alone. Prints a table and writes
JSON + markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from service.batch.params import JobParams
from service.batch.plan import plan_job
from service.batch.process import RetryPolicy
from service.batch.runner import RunConfig, run_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--rows", type=int, default=48, help="prompts in the job")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    p.add_argument("--write-workers", type=int, default=4)
    p.add_argument("--targets", default="local,azurite", help="comma-separated: local, azurite")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CPU threads for the engine; fewer than the cores leaves CPU for I/O, as a GPU does",
    )
    p.add_argument("--out-dir", default=str(common.RESULTS))
    p.add_argument("--tag", default="", help="suffix for the result file names")
    return p.parse_args(argv)


def load(args: argparse.Namespace, params: JobParams) -> Any:
    """The engine as `sd-endpoint batch` loads it, warmed up at the job's batch shape."""
    from service.runtime.engines import load_serving_engine, settings_device
    from service.settings import Settings

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    settings = Settings(model=args.model, max_batch_size=args.batch_size)
    engine = load_serving_engine(settings, settings_device(settings))
    items = [params.item("warm-up", "", seed, engine.info) for seed in range(args.batch_size)]
    for _ in range(2):  # kernels are chosen on the first call of a shape
        engine.generate(items)
    return engine


def write_inputs(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True)
    lines = "".join(f"a photograph of object number {i} on a table\n" for i in range(rows))
    (folder / "prompts.csv").write_text("prompt\n" + lines)


def engine_alone(engine: Any, inputs: Path, params: JobParams, batch_size: int) -> float:
    """Seconds to generate every row of the job, batch after batch, with nothing else."""
    with tempfile.TemporaryDirectory() as scratch:
        rows = list(plan_job(str(inputs), scratch, params).rows())
    items = [params.item(r.prompt, r.negative_prompt, r.seed or 0, engine.info) for r in rows]
    started = time.perf_counter()
    for start in range(0, len(items), batch_size):
        engine.generate(items[start : start + batch_size])
    return time.perf_counter() - started


def batch_job(engine: Any, inputs: Path, output: str, params: JobParams, args: argparse.Namespace) -> float:
    """Seconds of run_job (generation, PNG encoding, writes of images and records) into ``output``."""
    plan = plan_job(str(inputs), output, params)
    config = RunConfig(batch_size=args.batch_size, retry=RetryPolicy(), write_workers=args.write_workers)
    result = run_job(engine, plan, config)
    assert result.generated == plan.total and not result.stopped, result
    return result.seconds


def label(run: str) -> str:
    return run if run == "engine alone" else f"batch -> {run}"


@contextlib.contextmanager
def azurite_outputs() -> Iterator[Callable[[], str]]:
    """One Azurite for every round (started before the rounds: its start-up takes CPU); a container each."""
    from tests.helpers.blobs import AZURITE_BIN, start_azurite  # the launcher the tests use

    if not AZURITE_BIN.exists():
        raise FileNotFoundError(f"{AZURITE_BIN} is missing: run `npm install --prefix .ci azurite`")
    with tempfile.TemporaryDirectory(prefix="azurite-") as workspace:
        process, server = start_azurite(workspace)
        try:
            os.environ["AZURE_STORAGE_CONNECTION_STRING"] = server.connection_string
            time.sleep(5)  # let it settle, as a long-running store would be
            yield lambda: f"az://{server.new_container()}/out"
        finally:
            process.terminate()
            process.wait(timeout=10)


@contextlib.contextmanager
def local_outputs() -> Iterator[Callable[[], str]]:
    with tempfile.TemporaryDirectory(prefix="sd-batch-") as root:
        yield lambda: tempfile.mkdtemp(dir=root)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = JobParams(num_inference_steps=args.steps, height=args.size, width=args.size)
    engine = load(args, params)
    names = args.targets.split(",")
    runs: dict[str, list[float]] = {name: [] for name in ["engine alone", *names]}
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        inputs = Path(scratch) / "in"
        write_inputs(inputs, args.rows)
        new_output = {
            name: stack.enter_context(azurite_outputs() if name == "azurite" else local_outputs())
            for name in names
        }
        # Rounds interleave the reference and the targets, so that drift (clocks, neighbours) hits all alike.
        for _ in range(args.repeats):
            runs["engine alone"].append(engine_alone(engine, inputs, params, args.batch_size))
            for name in names:
                runs[name].append(batch_job(engine, inputs, new_output[name](), params, args))
    seconds = {name: statistics.median(values) for name, values in runs.items()}
    alone = seconds["engine alone"]
    size = params.resolved(engine.info)["height"]
    report = {
        **common.header("batch.py", argv),
        **{k: getattr(args, k) for k in ("model", "rows", "batch_size", "steps", "write_workers")},
        "size": size, "device": engine.info.device, "dtype": engine.info.dtype, "cpus": os.cpu_count(),
        "torch_threads": args.torch_threads, "runs_s": runs,
        "images_per_s": {name: args.rows / s for name, s in seconds.items()},
        "ratio_to_engine_alone": {name: alone / s for name, s in seconds.items()},
    }  # fmt: skip
    title = f"{args.model}, {args.rows} rows, batch {args.batch_size}, {args.steps} steps, {size}px"
    where = f"{engine.info.device} {engine.info.dtype}, {os.cpu_count()} CPUs"
    rounds = (
        f"Median of {args.repeats} interleaved rounds; engine threads: {args.torch_threads or 'default'}."
    )
    rows = [[label(name), f"{args.rows / s:.2f}", f"{alone / s:.3f}"] for name, s in seconds.items()]
    lines = [f"# Batch vs engine alone: {title}, {where}", "", rounds, ""]
    lines += common.table(["run", "images/s", "ratio to engine alone"], rows)
    print("\n".join(lines))
    stem = f"batch-{engine.info.device.split(':')[0]}{'-' + args.tag if args.tag else ''}"
    common.write(Path(args.out_dir) / stem, report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
