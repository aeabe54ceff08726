"""What mixing LoRA adapters costs the step loop: the step time of one running set of images with
no adapter, one adapter for all, and 2, 4 or 8 different adapter sets, side by side in one run.

    python benchmarks/adapters.py                       # random:tiny on this machine's CPU
    python benchmarks/adapters.py --images 8 --steps 30 --spec random:sd-v1-4 --size 256

The engine makes one UNet call per (size, adapter set) at each step (model/stepping/running.py),
switching peft's active adapters between calls (model/adapters.py); this measures that cost
against the same images with one adapter or none. Adapters are random-weight LoRA layers on the
UNet and text encoder (tests/helpers/loras.py), written by diffusers' save_lora_weights.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

import model  # noqa: E402
from model.types import GenerationItem, adapter_set  # noqa: E402
from tests.helpers import loras  # noqa: E402

ADAPTERS = ("a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7")


def step_times(engine: Any, items: list[GenerationItem], steps: int) -> list[float]:
    """Seconds of each step of ``items`` running together (admission and decoding left out)."""
    return common.step_times(engine, engine.admit_all(items), steps)


def cases(images: int) -> dict[str, list[dict[str, float] | None]]:
    """Per case, each image's adapters."""
    return {
        "none (no SD_ADAPTERS)": [None] * images,
        "none (adapters loaded)": [None] * images,
        "one adapter for all": [{"a0": 1.0}] * images,
        "2 sets": [{ADAPTERS[i % 2]: 1.0} for i in range(images)],
        "4 sets": [{ADAPTERS[i % 4]: 1.0} for i in range(images)],
        f"{images} sets": [{ADAPTERS[i % len(ADAPTERS)]: 1.0} for i in range(images)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="random:tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adapters-cpu.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    for seed, name in enumerate(ADAPTERS):
        (folder / name).mkdir()
        loras.save_diffusers(folder / name, seed)
    plain = model.load(args.spec)
    with_adapters = model.load(args.spec, adapters=folder)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "diffusers", "peft")},
        "spec": args.spec,
        "size": args.size,
        "images": args.images,
        "cases": {},
    }
    for name, adapters in cases(args.images).items():
        engine = plain if name.startswith("none (no") else with_adapters
        items = [
            GenerationItem(
                "a lighthouse",
                seed=i,
                num_inference_steps=args.steps + 1,
                height=args.size,
                width=args.size,
                adapters=adapter_set(a),
            )
            for i, a in enumerate(adapters)
        ]
        step_times(engine, items, 2)  # warm
        medians = [statistics.median(step_times(engine, items, args.steps)) for _ in range(args.repeats)]
        report["cases"][name] = {"step_ms": round(1000 * min(medians), 2)}
        print(f"{name:28s} {1000 * min(medians):8.2f} ms/step")
    base = report["cases"]["one adapter for all"]["step_ms"]
    for values in report["cases"].values():
        values["vs_one_adapter"] = round(values["step_ms"] / base, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
