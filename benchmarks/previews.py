"""Do previews slow the images that did not ask for them? Step time of a running set with and
without a previewing neighbour.

    python benchmarks/previews.py                      # random:tiny on the CPU, about a minute
    python benchmarks/previews.py --model DIR --device cuda --size 512 --decoder TAESD_DIR

Four images step together, as the step loop runs them (one engine, one thread). In the "previewing"
case one of them asks for a preview after every step (the most any client can ask: OpenAI's
partial_images asks for 3 per image, A1111's progress one per poll), and the step loop makes it in
the engine thread between two steps, so the other three wait for it. The cases alternate, several
rounds each, so that a busy host slows both alike. Reported: milliseconds per step (median) and
the previewing case's cost relative to none, for the linear preview and, with --decoder, for an
AutoencoderTiny folder (SD_PREVIEW_DECODER).

Writes benchmarks/results/previews.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import model
from model.options import EngineOptions
from model.types import GenerationItem

RESULTS = Path(__file__).parent / "results"


def step_times(engine: Any, size: int, steps: int, previewing: bool) -> list[float]:
    """Seconds of each step (the preview, when asked, counted in the step it follows)."""
    items = [GenerationItem(f"image {i}", seed=i, num_inference_steps=steps + 1, height=size, width=size)
             for i in range(4)]  # fmt: skip
    handles = [engine.admit(item) for item in items]
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        if previewing:
            engine.preview(handles[0])
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    for handle in handles:
        engine.cancel(handle)
    return times


def measure(engine: Any, size: int, steps: int, rounds: int) -> dict[str, float]:
    step_times(engine, size, 2, True)  # warm
    none: list[float] = []
    previewing: list[float] = []
    for _ in range(rounds):
        none += step_times(engine, size, steps, False)
        previewing += step_times(engine, size, steps, True)
    quiet, busy = statistics.median(none) * 1000, statistics.median(previewing) * 1000
    return {
        "step_ms_without": round(quiet, 3),
        "step_ms_with": round(busy, 3),
        "cost": round(busy / quiet - 1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (the engine thread's policy)"
    )
    parser.add_argument("--decoder", default=None, help="an AutoencoderTiny folder (SD_PREVIEW_DECODER)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = {"linear": None, **({"tiny decoder": args.decoder} if args.decoder else {})}
    results: dict[str, Any] = {"model": args.model, "device": args.device, "size": args.size,
                               "images": 4, "host": platform.node(), "cases": {}}  # fmt: skip
    for name, decoder in cases.items():
        engine = model.load(args.model, device=args.device, options=EngineOptions(preview_decoder=decoder))
        results["cases"][name] = measure(engine, args.size, args.steps, args.rounds)
        print(name, results["cases"][name])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "previews.json").write_text(json.dumps(results, indent=2) + "\n")
    title = f"# Previews: 4 images, one previewed every step ({args.model}, {args.device}, {args.size}px)"
    lines = [title, "", "| preview | ms/step without | ms/step with | cost |", "|---|---|---|---|"]
    for name, row in results["cases"].items():
        lines.append(f"| {name} | {row['step_ms_without']} | {row['step_ms_with']} | {row['cost']:+.1%} |")
    (RESULTS / "previews.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
