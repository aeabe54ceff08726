"""CPU thread policies side by side: torch's thread team per engine, quiet and with busy neighbours.

    python benchmarks/cpu_threads.py                  # every table, about 8 minutes on 2 cores
    python benchmarks/cpu_threads.py --seconds 4 --skip-server

A "busy neighbour" is another process spinning on one core (`while True: pass`), what a test suite,
a second server or anything else on a small host does. Three tables, each measured in this one run:

1. Engine: random:tiny at its native 128x128, four images stepping together in a plain process, for
   each policy (threads per engine, OpenMP's wait policy, torch's inter-op threads) with 0, 1 and 2
   busy neighbours, interleaved (quiet, 1, 2, quiet again). Image-steps per second and the ratio to
   the policy's own quiet figure.
2. Engines side by side: two engines stepping in two threads of one process (as SD_DEVICES=cpu,cpu
   runs them), each against one engine alone with the same threads: what each keeps of its share.
3. Server: a real `sd-endpoint serve` on random:tiny with 4 closed-loop clients (10-step images),
   under the default policy (SD_CPU_THREADS=auto) and under torch's default (one thread per core,
   what the server did before), while the neighbours change: quiet, 1 busy, quiet, 2 busy, quiet.
   Images per second in each window and busy / quiet.

Writes benchmarks/results/cpu-threads.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from service.runtime.engines import available_cores

RESULTS = common.RESULTS
SPIN = [sys.executable, "-c", "while True: pass"]
ROWS = 4  # images stepping together in the engine tables
SERVER_CLIENTS = 4
SERVER_STEPS = 10


@contextmanager
def neighbours(count: int) -> Iterator[None]:
    """``count`` processes that each keep one core busy, for the duration of the block."""
    spinners = [subprocess.Popen(SPIN) for _ in range(count)]
    try:
        time.sleep(0.3)  # let the scheduler see them
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def threads(count: int) -> str:
    return f"{count} thread" if count == 1 else f"{count} threads"


def policies(cores: int) -> list[dict[str, Any]]:
    """The policies of the engine table: name, torch threads, extra environment, inter-op threads."""
    fewer = max(1, cores - 1)
    table = [
        {"name": f"{threads(cores)} (torch's default: every core)", "threads": cores, "env": {}},
        {"name": f"{threads(fewer)} (cores - 1: auto)", "threads": fewer, "env": {}},
        {"name": f"{threads(cores)}, OMP_WAIT_POLICY=passive", "threads": cores,
         "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
        {"name": f"{threads(fewer)}, OMP_WAIT_POLICY=passive", "threads": fewer,
         "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
        {"name": f"{threads(cores)}, 1 inter-op thread", "threads": cores, "env": {}, "interop": 1},
    ]  # fmt: skip
    if fewer > 1:
        table.append({"name": "1 thread", "threads": 1, "env": {}})
    return table


# ----------------------------------------------------------------------------- engine tables (child)


def load_tiny(threads: int) -> Any:
    """random:tiny on the CPU, loaded in (and for) the calling thread with ``threads`` threads."""
    import torch

    from model import load

    torch.set_num_threads(threads)
    return load("random:tiny", "cpu", None)


def image_steps_per_s(engine: Any, seconds: float) -> float:
    """Keep ROWS images stepping for ``seconds`` (at least one step); image-steps per second."""
    from model.types import GenerationItem

    info = engine.info

    def item(seed: int) -> Any:
        return GenerationItem(prompt="a lighthouse", seed=seed, num_inference_steps=50,
                              height=info.native_height, width=info.native_width)  # fmt: skip

    handles = [engine.admit(item(seed)) for seed in range(ROWS)]
    done, started = 0, time.perf_counter()
    while True:
        finished = engine.step()
        done += len(handles)
        if finished:
            engine.retire(finished)
            handles = [h for h in handles if h not in finished] + [engine.admit(item(h)) for h in finished]
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
    for handle in handles:
        engine.cancel(handle)
    return done / elapsed


def child(policy: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One policy's row of table 1 (in this process, whose environment the policy set)."""
    import torch

    if policy.get("interop"):
        torch.set_num_interop_threads(policy["interop"])
    engine = load_tiny(policy["threads"])
    image_steps_per_s(engine, 1.0)  # warm-up
    row: dict[str, Any] = {"policy": policy["name"]}
    for label, busy in (("quiet", 0), ("busy 1", 1), ("busy 2", 2), ("quiet again", 0)):
        with neighbours(busy):
            row[label] = image_steps_per_s(engine, seconds)
    return row


def side_by_side(threads: int, seconds: float) -> dict[str, Any]:
    """Table 2's row: one engine alone, then two engines at once in two threads, ``threads`` each."""
    engines: list[Any] = [None, None]
    rates: list[float] = [0.0, 0.0]

    def run(index: int, measure: bool) -> None:
        if engines[index] is None:
            engines[index] = load_tiny(threads)
            image_steps_per_s(engines[index], 1.0)
        if measure:
            rates[index] = image_steps_per_s(engines[index], seconds)

    def in_threads(measure: tuple[bool, bool]) -> None:
        workers = [threading.Thread(target=run, args=(i, measure[i])) for i in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    in_threads((False, False))  # load both, each in its own thread (threads are per-thread state)
    alone = _in_thread(lambda: image_steps_per_s(engines[0], seconds), threads)
    in_threads((True, True))
    return {"threads per engine": threads, "one engine alone": alone, "engine 1 beside engine 2": rates[0],
            "engine 2 beside engine 1": rates[1]}  # fmt: skip


def _in_thread(fn: Any, threads: int) -> float:
    result: list[float] = []

    def target() -> None:
        import torch

        torch.set_num_threads(threads)
        result.append(fn())

    worker = threading.Thread(target=target)
    worker.start()
    worker.join()
    return result[0]


def in_child(task: dict[str, Any]) -> dict[str, Any]:
    """Run ``task`` in a fresh process (OpenMP reads its wait policy once, when torch loads)."""
    env = {**os.environ, **task.get("env", {})}
    command = [sys.executable, __file__, "--child", json.dumps(task)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- server table


async def server_phases(url: str, phases: list[tuple[str, int]], seconds: float) -> dict[str, float]:
    """Closed-loop clients throughout; the neighbours change every ``seconds``; images/s per phase."""
    finished: list[float] = []
    marks: list[tuple[str, float, float]] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:

        async def client(number: int) -> None:
            n = 0
            while not stop.is_set():
                body = {"input_data": {"columns": ["prompt"], "data": [f"client {number}"],
                        "parameters": {"num_inference_steps": SERVER_STEPS, "seed": n}}}  # fmt: skip
                response = await http.post("/score", json=body)
                response.raise_for_status()
                finished.append(time.monotonic())
                n += 1

        tasks = [asyncio.create_task(client(c)) for c in range(SERVER_CLIENTS)]
        await asyncio.sleep(2)  # settle
        for label, busy in phases:
            spinners = [subprocess.Popen(SPIN) for _ in range(busy)]
            start = time.monotonic()
            await asyncio.sleep(seconds)
            marks.append((label, start, time.monotonic()))
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {label: sum(start <= t < end for t in finished) / (end - start) for label, start, end in marks}


def server_row(name: str, env: dict[str, str], seconds: float) -> dict[str, Any]:
    """The server under a thread policy (``env``) while the neighbours change; images/s per phase."""
    phases = [("quiet", 0), ("busy 1", 1), ("quiet again", 0), ("busy 2", 2), ("quiet at the end", 0)]
    with common.serving({"SD_MODEL": "random:tiny", **env}, ready="/health/ready") as (url, _):
        row: dict[str, Any] = {"policy": name, **asyncio.run(server_phases(url, phases, seconds))}
    quiet = (row["quiet"] + row["quiet again"] + row["quiet at the end"]) / 3
    row["busy 1 / quiet"] = row["busy 1"] / quiet if quiet else None
    row["busy 2 / quiet"] = row["busy 2"] / quiet if quiet else None
    return row


# ----------------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# CPU thread policies ({report['machine']})", "", f"`{report['command']}`", ""]
    lines += ["## Engine: random:tiny 128x128, 4 images stepping, image-steps/s", ""]
    columns = ["quiet", "busy 1", "busy 2", "quiet again"]
    rows = []
    for row in report["engine"]:
        quiet = (row["quiet"] + row["quiet again"]) / 2
        rows.append([row["policy"], *(f"{row[c]:.1f}" for c in columns), f"{row['busy 1'] / quiet:.2f}"])
    lines += common.table(["policy", "quiet", "1 busy", "2 busy", "quiet again", "1 busy / quiet"], rows)
    lines += ["", "## Two engines in one process (SD_DEVICES=cpu,cpu), image-steps/s", ""]
    rows = []
    for row in report["side_by_side"]:
        beside = [row["engine 1 beside engine 2"], row["engine 2 beside engine 1"]]
        alone = row["one engine alone"]
        rows.append([str(row["threads per engine"]), f"{alone:.1f}", *(f"{b:.1f}" for b in beside),
                     f"{min(beside) / alone:.2f}"])  # fmt: skip
    lines += common.table(
        ["threads each", "one alone", "engine 1 beside 2", "engine 2 beside 1", "each / alone"], rows
    )
    if report.get("server"):
        title = f"## Server: {SERVER_CLIENTS} closed-loop clients, {SERVER_STEPS}-step images, images/s"
        lines += ["", title, ""]
        columns = [
            "quiet",
            "busy 1",
            "quiet again",
            "busy 2",
            "quiet at the end",
            "busy 1 / quiet",
            "busy 2 / quiet",
        ]
        rows = [[row["policy"], *(f"{row[c]:.2f}" for c in columns)] for row in report["server"]]
        lines += common.table(
            ["policy", "quiet", "1 busy", "quiet", "2 busy", "quiet", "1 busy / quiet", "2 busy / quiet"],
            rows,
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="each measurement window (engine tables)")
    parser.add_argument("--server-seconds", type=float, default=15.0, help="each phase of the server table")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu-threads")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task = json.loads(args.child)
        seconds = task["seconds"]
        result = side_by_side(task["threads"], seconds) if task.get("pair") else child(task, seconds)
        print(json.dumps(result))
        return
    cores = available_cores()
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {cores} usable cores, {platform.python_version()}",
        "command": "python benchmarks/cpu_threads.py " + " ".join(sys.argv[1:]),
        "engine": [], "side_by_side": [], "server": [],
    }  # fmt: skip
    for policy in policies(cores):
        print(f"engine: {policy['name']} ...", flush=True)
        policy_args = {**policy, "seconds": args.seconds}
        report["engine"].append(in_child(policy_args))
    for each in sorted({cores, max(1, (cores - 1) // 2), max(1, cores // 2)}):
        print(f"two engines, {threads(each)} each ...", flush=True)
        report["side_by_side"].append(in_child({"pair": True, "threads": each, "seconds": args.seconds}))
    if not args.skip_server:
        os.environ.pop("OMP_NUM_THREADS", None)  # each server's policy is its SD_CPU_THREADS alone
        servers = [
            (f"auto (the default: {threads(max(1, cores - 1))})", {"SD_CPU_THREADS": "auto"}),
            (
                f"{threads(cores)} (torch's default, what the server did before)",
                {"SD_CPU_THREADS": str(cores)},
            ),
        ]
        for name, env in servers:
            print(f"server: {name} ...", flush=True)
            report["server"].append(server_row(name, env, args.server_seconds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
