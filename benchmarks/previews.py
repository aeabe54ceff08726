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
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

import model
from model.options import EngineOptions
from model.types import GenerationItem


def step_times(engine: Any, size: int, steps: int, previewing: bool) -> list[float]:
    """Seconds of each step of four images (the preview, when asked, counted in the step it follows)."""
    items = [GenerationItem(f"image {i}", seed=i, num_inference_steps=steps + 1, height=size, width=size)
             for i in range(4)]  # fmt: skip
    handles = [engine.admit(item) for item in items]
    return common.step_times(
        engine, handles, steps, (lambda: engine.preview(handles[0])) if previewing else None
    )


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
    title = f"# Previews: 4 images, one previewed every step ({args.model}, {args.device}, {args.size}px)"
    rows = [{"preview": name, **row} for name, row in results["cases"].items()]
    spec = [("preview", "preview", ""), ("ms/step without", "step_ms_without", ""),
            ("ms/step with", "step_ms_with", ""), ("cost", "cost", "+.1%")]  # fmt: skip
    common.write(common.RESULTS / "previews", results, [title, "", *common.columns(spec, rows)])


if __name__ == "__main__":
    main()
