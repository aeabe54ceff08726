"""fp16 range of the random-weight architectures: every module's largest absolute activation.

    python benchmarks/fp16_range.py --models random:sd-v1-4,random:sd-2-base --size 512 \
        --json benchmarks/results/fp16-range.json                  # full size, fp32 on CPU (minutes)
    python benchmarks/fp16_range.py --models random:tiny --size 64  # seconds

Random weights can overflow in fp16 where trained ones do not, and the engine refuses NaN. This
runs generations through the engine in fp32 on the CPU with a forward hook on every module of
the text encoder, the UNet, the VAE (the decoder is what generation runs) and the safety checker,
and records the largest absolute value each module outputs. fp16's largest finite value is 65504;
the margin is 65504 over the largest activation seen.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model
from model.types import GenerationItem

FP16_MAX = 65504.0
NETWORKS = ("text_encoder", "unet", "vae", "safety_checker")
PROMPT = "a photograph of an astronaut riding a horse"


def _largest(value: Any) -> float | None:
    """The largest absolute finite-or-not value among the floating tensors in a module's output."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.numel():
            return float(value.detach().abs().max())
        return None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        found = [v for v in (_largest(item) for item in value) if v is not None]
        return max(found) if found else None
    return None


@contextlib.contextmanager
def record_maxima(networks: dict[str, torch.nn.Module]) -> Iterator[dict[str, dict[str, float]]]:
    """Yield {network: {module name: largest |output| seen}}, filled while the block runs."""
    maxima: dict[str, dict[str, float]] = {name: {} for name in networks}
    handles = []
    for net_name, net in networks.items():
        for module_name, module in net.named_modules():

            def hook(_m: Any, _i: Any, output: Any, net: str = net_name, key: str = module_name) -> None:
                largest = _largest(output)
                if largest is not None:
                    table = maxima[net]
                    table[key or "(root)"] = max(largest, table.get(key or "(root)", 0.0))

            handles.append(module.register_forward_hook(hook))
    try:
        yield maxima
    finally:
        for handle in handles:
            handle.remove()


def summarise(maxima: dict[str, dict[str, float]], top: int = 5) -> dict[str, Any]:
    """Per network: the largest activation, its module, the margin to fp16's max and the top modules."""
    report: dict[str, Any] = {}
    for net, table in maxima.items():
        if not table:
            report[net] = {"modules_seen": 0}
            continue
        ranked = sorted(table.items(), key=lambda kv: kv[1], reverse=True)
        largest = ranked[0][1]
        report[net] = {
            "modules_seen": len(table),
            "max_abs": largest,
            "argmax_module": ranked[0][0],
            "margin_to_fp16_max": FP16_MAX / largest if largest > 0 else None,
            "top": [{"module": name, "max_abs": value} for name, value in ranked[:top]],
        }
    return report


def measure(spec: str, size: int, steps: int, seeds: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Steps: 1) load in fp32 on the CPU, 2) hook every module, 3) generate, 4) summarise."""
    started = time.perf_counter()
    engine = model.load(spec, device="cpu", dtype="fp32")
    c = engine.components
    networks = {"text_encoder": c.text_encoder, "unet": c.unet, "vae": c.vae}
    if c.safety_checker is not None:
        networks["safety_checker"] = c.safety_checker
    items = [
        GenerationItem(prompt=PROMPT, seed=seed, num_inference_steps=steps, height=size, width=size)
        for seed in seeds
    ]
    with record_maxima(networks) as maxima:
        images, flags = engine.generate_float(items)
    report = summarise(maxima)
    overall = max((r["max_abs"] for r in report.values() if "max_abs" in r), default=0.0)
    engine.close()
    return {
        "model": spec,
        "size": size,
        "steps": steps,
        "seeds": list(seeds),
        "networks": report,
        "max_abs": overall,
        "margin_to_fp16_max": FP16_MAX / overall if overall > 0 else None,
        "images_finite": bool(torch.isfinite(images).all()),
        "nsfw_flags": flags,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="random:sd-v1-4,random:sd-2-base")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    import diffusers
    import transformers

    results = []
    for spec in args.models.split(","):
        result = measure(spec, args.size, args.steps)
        results.append(result)
        print(
            f"{spec} {args.size}x{args.size} {args.steps} step(s): largest |activation| "
            f"{result['max_abs']:.1f}, margin x{result['margin_to_fp16_max']:.0f} to fp16's 65504 "
            f"({result['seconds']:.0f} s)",
            flush=True,
        )
        for net, r in result["networks"].items():
            if "max_abs" in r:
                print(f"  {net:<15} {r['max_abs']:>10.2f}  {r['argmax_module']}", flush=True)
    report = {
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/fp16_range.py", *(argv or sys.argv[1:])]),
            "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads), fp32",
            "fp16_max": FP16_MAX,
            "versions": {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
        },
        "results": results,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
