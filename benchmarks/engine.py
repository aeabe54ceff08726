"""Engine benchmark: stock diffusers vs this engine (vs DeepSpeed kernels), side by side, one run.

    python benchmarks/engine.py --model random:sd-v1-4 --batch-sizes 1,4,8,16 --steps 50,25   # GPU
    python benchmarks/engine.py --model random:tiny --batch-sizes 1,2 --steps 4 --size 128     # CPU smoke

For each batch size and step count it times (a) diffusers' StableDiffusionPipeline on the same
components, the baseline a user would run instead, (b) this engine with its optimisations, and
(c) this engine with DeepSpeed-Inference kernels when `--deepspeed` is given. It prints seconds
per image, images/s, peak GPU memory, model-FLOPs utilisation and ratios to the baseline, checks
that the images agree (mean absolute difference of the 8-bit images, in [0,1]), and writes JSON +
markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import flops
import numpy as np
import torch

import model
from model.errors import ModelLoadError
from model.loading import load_components
from model.options import resolve_device, resolve_dtype
from model.types import GenerationItem

COLUMNS = (  # the markdown table: header, result key, format
    ("variant", "variant", ""),
    ("batch", "batch_size", ""),
    ("steps", "steps", ""),
    ("s/image", "seconds_per_image", ".4f"),
    ("images/s", "images_per_s", ".2f"),
    ("peak GiB", "peak_gib", ".1f"),
    ("MFU", "mfu", ".1%"),
    ("x diffusers", "speedup_vs_diffusers", ".2f"),
    ("mean abs diff", "mean_abs_diff_vs_diffusers", ".5f"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp16 (GPU default), bf16, fp32 (CPU default)")
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--steps", default="50,25")
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (after one warm-up)")
    p.add_argument("--no-compile", action="store_true", help="engine without torch.compile / CUDA graphs")
    p.add_argument("--deepspeed", action="store_true", help="also time DeepSpeed-Inference kernels")
    p.add_argument("--out-dir", default=str(common.RESULTS))
    p.add_argument("--tag", default="", help="suffix for the result file names")
    return p.parse_args(argv)


def variants(args: argparse.Namespace, on_gpu: bool, batches: list[int]) -> dict[str, model.EngineOptions]:
    """The engine's variants, each timed against stock diffusers."""
    compiled = on_gpu and not args.no_compile
    table = {
        "engine": model.EngineOptions(
            channels_last=on_gpu,
            fuse_qkv=on_gpu,
            compile=compiled,
            cuda_graphs=compiled,
            batch_buckets=tuple(sorted(set(batches))),
        ),
    }
    if args.deepspeed:
        table["deepspeed"] = model.EngineOptions(accelerator="deepspeed", cuda_graphs=on_gpu)
    return table


def row(
    variant: str,
    batch: int,
    steps: int,
    timing: common.Timing,
    tflop: float | None,
    speedup: float | None = None,
    mad: float | None = None,
) -> dict[str, Any]:
    per_image = timing.seconds / batch
    return {
        "variant": variant,
        "batch_size": batch,
        "steps": steps,
        "seconds_per_batch": timing.seconds,
        "seconds_per_image": per_image,
        "images_per_s": batch / timing.seconds,
        "peak_gib": timing.peak_gib,
        "mfu": (tflop / per_image / common.PEAK_TFLOPS) if tflop else None,
        "speedup_vs_diffusers": speedup,
        "mean_abs_diff_vs_diffusers": mad,
    }


def main(argv: list[str] | None = None) -> int:
    """Steps: 1) stock diffusers at every point, 2) each engine variant at the same points, its
    images compared with diffusers' and its time divided into diffusers', 3) the report."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    points = [(batch, int(steps)) for steps in args.steps.split(",") for batch in batches]

    # 1) the baseline: stock diffusers on the components as loaded (before any optimisation)
    from diffusers import StableDiffusionPipeline

    components = load_components(args.model, dtype)
    components.to(device)
    pipe = StableDiffusionPipeline(**components.modules(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = args.size or int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    checker = components.safety_checker is not None

    def tflop(steps: int) -> float | None:
        """TFLOP per image, counted by benchmarks/flops.py; None for an architecture it cannot build."""
        try:
            return float(flops.image_tflop(flops.lookup(components.architecture, size)[0], steps, checker))
        except ModelLoadError:
            return None

    def stock(batch: int, steps: int) -> np.ndarray:
        gens = [torch.Generator(device).manual_seed(i) for i in range(batch)]
        out = pipe(
            [common.PROMPT] * batch,
            num_inference_steps=steps,
            height=size,
            width=size,
            generator=gens,
            output_type="np",
        )
        return np.asarray(out.images)

    baseline: dict[tuple[int, int], common.Timing] = {}
    results: list[dict[str, Any]] = []
    for batch, steps in points:
        timing = baseline[batch, steps] = common.timed(
            functools.partial(stock, batch, steps), device, args.repeats
        )
        results.append(row("diffusers", batch, steps, timing, tflop(steps)))
        print(f"diffusers  b={batch:<3} steps={steps:<3} {timing.seconds / batch:.4f} s/img", flush=True)

    # 2) this engine, then with DeepSpeed kernels
    for name, options in variants(args, device.type == "cuda", batches).items():
        engine = model.load(args.model, device=str(device), dtype=dtype, options=options)
        if name == "deepspeed" and engine.accelerator != "deepspeed":
            print(f"deepspeed not measured: {engine.accelerator_note}", flush=True)
            results.append({"variant": name, "skipped": engine.accelerator_note})
            continue
        warmup = common.time_once(engine.warmup, device)
        print(f"{name}: warm-up (compile/capture) {warmup.seconds:.1f} s", flush=True)
        for batch, steps in points:
            items = [
                GenerationItem(common.PROMPT, seed=i, num_inference_steps=steps, height=size, width=size)
                for i in range(batch)
            ]
            timing = common.timed(functools.partial(engine.generate, items), device, args.repeats)
            base = baseline[batch, steps]
            mad = common.mean_abs_diff(np.stack([r.image for r in timing.output]), base.output)
            results.append(row(name, batch, steps, timing, tflop(steps), base.seconds / timing.seconds, mad))
            line = f"{name:<10} b={batch:<3} steps={steps:<3} {timing.seconds / batch:.4f} s/img"
            print(
                f"{line} x{base.seconds / timing.seconds:.2f} vs diffusers, mean |diff| {mad:.5f}", flush=True
            )
        engine.close()

    # 3)
    write_report(args, device, dtype, size, results)
    return 0


def write_report(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    size: int,
    results: list[dict[str, Any]],
) -> None:
    head = common.header("engine.py")
    where = f"cpu ({head['machine']}, {torch.get_num_threads()} threads)"
    meta = head | {"device": torch.cuda.get_device_name() if device.type == "cuda" else where}
    meta |= {"dtype": str(dtype).replace("torch.", ""), "size": size, "model": args.model}
    lines = [f"# Engine benchmark: {args.model} on {meta['device']}", ""]
    lines += [
        f"{meta['date']}, {meta['dtype']}, {size}x{size}, `{meta['command']}`, versions {meta['versions']}"
    ]
    skipped = [
        {"variant": r["variant"], "batch_size": f"skipped: {r['skipped']}"} for r in results if "skipped" in r
    ]
    lines += ["", *common.columns(COLUMNS, [r for r in results if "skipped" not in r] + skipped)]
    stem = f"engine-{args.model.replace(':', '-').replace('/', '-')}-{device.type}{args.tag}"
    common.write(Path(args.out_dir) / stem, {"meta": meta, "results": results}, lines)
    print(f"wrote {Path(args.out_dir) / stem}.json and .md")


if __name__ == "__main__":
    sys.exit(main())
