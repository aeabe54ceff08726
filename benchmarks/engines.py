"""Engines benchmark: does the step loop's one queue in front of N engine threads scale with N, or
does the GIL serialize them?

    python benchmarks/engines.py                          # N = 1, 2, 4; 10 % of each step holds the GIL
    python benchmarks/engines.py --gil-fraction 0.25 --seconds 10

Each fake step engine (one per "device") spends ``--step-ms`` per denoising step, whatever its
running set: ``--gil-fraction`` of it in a pure-Python busy loop (holding the GIL, as Python-side
kernel launches do) and the rest sleeping (the GIL released, as while CUDA kernels run). Closed-loop
clients, ``N x --batch`` of them (enough to fill every engine), each submit one image of ``--steps``
steps to the real StepLoop (service/runtime/batching/steploop.py, in process, no HTTP) and submit
the next when it is done. Throughput is compared with N x one engine's; the goal is >= 0.9.
Prints a table and writes JSON + markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from model.types import GenerationItem, GenerationResult, ModelInfo
from service.runtime.batching.steploop import StepLoop
from service.runtime.metrics import Metrics
from tests.runtime.fakes import FakeEngine

INFO = ModelInfo(
    name="gil-bench", architecture="fake", native_height=8, native_width=8, schedulers=("default",),
    default_scheduler="pndm", safety_checker=False, device="fake", dtype="fp32", random_weights=True,
)  # fmt: skip
IMAGE = np.zeros((8, 8, 3), dtype=np.uint8)


class GilStepEngine(FakeEngine):
    """A step costs ``step_s``: ``gil_fraction`` of it spinning in Python, the rest asleep. The test
    fake supplies what the loop never times (validate, warmup, close)."""

    def __init__(self, step_s: float, gil_fraction: float) -> None:
        super().__init__()
        self._busy_s = step_s * gil_fraction
        self._sleep_s = step_s - self._busy_s
        self._running: dict[int, list[int]] = {}  # handle -> [done, steps]
        self._next = 0
        self.steps = 0

    @property
    def info(self) -> ModelInfo:
        return INFO

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        raise NotImplementedError

    def admit(self, item: GenerationItem) -> int:
        self._next += 1
        self._running[self._next] = [0, item.num_inference_steps]
        return self._next

    def step(self) -> list[int]:
        deadline = time.perf_counter() + self._busy_s
        spins = 0
        while time.perf_counter() < deadline:  # holds the GIL
            spins += 1
        time.sleep(self._sleep_s)  # releases it
        self.steps += 1
        finished = []
        for handle, state in self._running.items():
            state[0] += 1
            if state[0] >= state[1]:
                finished.append(handle)
        return finished

    def retire(self, handles: Sequence[int]) -> list[GenerationResult]:
        for handle in handles:
            del self._running[handle]
        return [GenerationResult(image=IMAGE, nsfw_content_detected=False, seed=0) for _ in handles]

    def cancel(self, handle: int) -> None:
        self._running.pop(handle, None)


async def measure(engines: int, args: argparse.Namespace) -> dict[str, Any]:
    fakes = [GilStepEngine(args.step_ms / 1000, args.gil_fraction) for _ in range(engines)]
    queue = StepLoop(fakes, max_batch_size=args.batch, max_queue_items=1024, metrics=Metrics())
    queue.start()
    done = 0
    counting = False
    stop = asyncio.Event()

    async def client(seed: int) -> None:
        nonlocal done
        while not stop.is_set():
            item = GenerationItem(prompt="p", seed=seed, num_inference_steps=args.steps, height=8, width=8)
            (future,) = queue.submit([item])
            await future
            if counting:
                done += 1

    clients = [asyncio.create_task(client(n)) for n in range(engines * args.batch)]
    await asyncio.sleep(args.warmup_s)  # every engine full
    counting, started, steps_before = True, time.perf_counter(), sum(f.steps for f in fakes)
    await asyncio.sleep(args.seconds)
    counting, elapsed = False, time.perf_counter() - started
    steps = sum(f.steps for f in fakes) - steps_before
    stop.set()
    await asyncio.gather(*clients)
    await queue.close()
    return {
        "engines": engines,
        "images_per_s": done / elapsed,
        "steps_per_s_per_engine": steps / elapsed / engines,
        "ideal_steps_per_s_per_engine": 1000 / args.step_ms,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="1,2,4")
    p.add_argument("--step-ms", type=float, default=20.0)
    p.add_argument("--gil-fraction", type=float, default=0.10)
    p.add_argument("--steps", type=int, default=10, help="steps per image")
    p.add_argument("--batch", type=int, default=4, help="SD_MAX_BATCH_SIZE of each engine")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--out", default=str(common.RESULTS / "engines-gil"))
    args = p.parse_args(argv)
    runs = [asyncio.run(measure(int(n), args)) for n in args.engines.split(",")]
    one = next(run["images_per_s"] for run in runs if run["engines"] == 1)
    for run in runs:
        run["scaling"] = run["images_per_s"] / (run["engines"] * one)
    report = {
        "benchmark": "engines-gil",
        **common.header("engines.py", argv),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "goal": "images/s >= 0.9 x N x one engine's",
        "runs": runs,
        "passed": all(run["scaling"] >= 0.9 for run in runs),
    }
    for run in runs:
        run["x_one_engine"] = run["images_per_s"] / one
        run["steps_per_s"] = (
            f"{run['steps_per_s_per_engine']:.1f} ({run['ideal_steps_per_s_per_engine']:.0f})"
        )
    held = f"{args.gil_fraction:.0%} of each {args.step_ms:g} ms step holds the GIL"
    clients = f"closed-loop clients (N x {args.batch}), {args.seconds:g} s each"
    lines = [f"# N engines behind one queue: {held}", ""]
    lines += [
        f"{report['machine']}; {args.batch} images per engine, {args.steps} steps per image, "
        f"{args.engines.replace(',', ', ')} engines, {clients}.",
        f"Command: `{report['command']}`",
        "",
    ]
    spec = [
        ("engines", "engines", ""),
        ("images/s", "images_per_s", ".1f"),
        ("x one engine", "x_one_engine", ".2f"),
        ("of N x one engine", "scaling", ".3f"),
        ("steps/s per engine (ideal)", "steps_per_s", ""),
    ]
    lines += [
        *common.columns(spec, runs),
        "",
        f"Goal {report['goal']}: {'met' if report['passed'] else 'NOT met'}.",
    ]
    common.write(Path(args.out), report, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
