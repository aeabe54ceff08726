"""Engine benchmark: stock diffusers vs this engine (vs DeepSpeed kernels), side by side, one run.

    python benchmarks/engine.py --model random:sd-v1-4 --batch-sizes 1,4,8,16 --steps 50,25   # GPU
    python benchmarks/engine.py --model random:tiny --batch-sizes 1,2 --steps 4 --size 128     # CPU smoke

For each batch size and step count it times (a) diffusers' StableDiffusionPipeline on the same
components, the baseline a user would run instead, (b) this engine with its optimisations, and
(c) this engine with DeepSpeed-Inference kernels when `--deepspeed` is given. It prints seconds
per image, images/s, peak GPU memory, model-FLOPs utilisation and ratios to the baseline, checks
that the images agree (mean absolute difference in [0,1]), and writes JSON + markdown to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flops as flop_counts

import model
from model.errors import ModelLoadError
from model.loading import load_components
from model.options import resolve_device, resolve_dtype
from model.types import GenerationItem

PEAK_TFLOPS = 790.0  # H200 dense bf16/fp16, measured
PROMPT = "a photograph of an astronaut riding a horse"


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
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="", help="suffix for the result file names")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: torch.device, repeats: int) -> tuple[float, float, Any]:
    """(median seconds, peak GiB, last output) after one untimed warm-up run."""
    fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, output = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        output = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return float(np.median(times)), peak, output


def flops_per_image(arch: str, steps: int, size: int, checker: bool) -> float | None:
    """TFLOP per image, counted by benchmarks/flops.py (benchmarks/results/flops.json); None for
    an architecture it cannot build."""
    try:
        entry, _ = flop_counts.lookup(arch, size)
    except ModelLoadError:
        return None
    return float(flop_counts.image_tflop(entry, steps, checker))


def row(
    variant: str,
    batch: int,
    steps: int,
    seconds: float,
    peak: float,
    tflop: float | None,
    baseline: float | None,
    mad: float | None,
) -> dict[str, Any]:
    per_image = seconds / batch
    return {
        "variant": variant,
        "batch_size": batch,
        "steps": steps,
        "seconds_per_batch": seconds,
        "seconds_per_image": per_image,
        "images_per_s": batch / seconds,
        "peak_gib": peak,
        "mfu": (tflop / per_image / PEAK_TFLOPS) if tflop else None,
        "speedup_vs_diffusers": (baseline / seconds) if baseline else None,
        "mean_abs_diff_vs_diffusers": mad,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    step_counts = [int(s) for s in args.steps.split(",")]
    on_gpu = device.type == "cuda"

    # 1) the baseline: stock diffusers on the components as loaded (before any optimisation)
    from diffusers import StableDiffusionPipeline

    components = load_components(args.model, dtype)
    components.to(device)
    pipe = StableDiffusionPipeline(**components.modules(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = args.size or int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    checker = components.safety_checker is not None
    baseline: dict[tuple[int, int], tuple[float, np.ndarray]] = {}
    results: list[dict[str, Any]] = []
    for steps in step_counts:
        for batch in batches:

            def run_pipe(b: int = batch, s: int = steps) -> np.ndarray:
                gens = [torch.Generator(device).manual_seed(i) for i in range(b)]
                out: np.ndarray = pipe(
                    [PROMPT] * b,
                    num_inference_steps=s,
                    height=size,
                    width=size,
                    generator=gens,
                    output_type="np",
                ).images
                return out

            seconds, peak, images = timed(run_pipe, device, args.repeats)
            baseline[(batch, steps)] = (seconds, images)
            results.append(
                row(
                    "diffusers",
                    batch,
                    steps,
                    seconds,
                    peak,
                    flops_per_image(components.architecture, steps, size, checker),
                    None,
                    None,
                )
            )
            print(f"diffusers  b={batch:<3} steps={steps:<3} {seconds / batch:.4f} s/img", flush=True)

    # 2) this engine, then 3) with DeepSpeed kernels
    variants = [
        (
            "engine",
            model.EngineOptions(
                channels_last=on_gpu,
                fuse_qkv=on_gpu,
                compile=on_gpu and not args.no_compile,
                cuda_graphs=on_gpu and not args.no_compile,
                batch_buckets=tuple(sorted(set(batches))),
            ),
        )
    ]
    if args.deepspeed:
        variants.append(("deepspeed", model.EngineOptions(accelerator="deepspeed", cuda_graphs=on_gpu)))
    for name, options in variants:
        engine = model.load(args.model, device=str(device), dtype=dtype, options=options)
        if name == "deepspeed" and engine.accelerator != "deepspeed":
            print(f"deepspeed not measured: {engine.accelerator_note}", flush=True)
            results.append({"variant": name, "skipped": engine.accelerator_note})
            continue
        start = time.perf_counter()
        engine.warmup()
        print(f"{name}: warm-up (compile/capture) {time.perf_counter() - start:.1f} s", flush=True)
        for steps in step_counts:
            for batch in batches:
                items = [
                    GenerationItem(prompt=PROMPT, seed=i, num_inference_steps=steps, height=size, width=size)
                    for i in range(batch)
                ]
                seconds, peak, _ = timed(lambda it=items, e=engine: e.generate(it), device, args.repeats)
                images, _flags = engine.generate_float(items)
                base_seconds, base_images = baseline[(batch, steps)]
                mad = float(np.abs(images.permute(0, 2, 3, 1).numpy() - base_images).mean())
                results.append(
                    row(
                        name,
                        batch,
                        steps,
                        seconds,
                        peak,
                        flops_per_image(components.architecture, steps, size, checker),
                        base_seconds,
                        mad,
                    )
                )
                print(
                    f"{name:<10} b={batch:<3} steps={steps:<3} {seconds / batch:.4f} s/img "
                    f"x{base_seconds / seconds:.2f} vs diffusers, mean |diff| {mad:.5f}",
                    flush=True,
                )
        engine.close()
    write_report(args, device, dtype, size, results)
    return 0


def write_report(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    size: int,
    results: list[dict[str, Any]],
) -> None:
    import diffusers
    import transformers

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/engine.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "size": size,
        "model": args.model,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"engine-{args.model.replace(':', '-').replace('/', '-')}-{device.type}{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [
        f"# Engine benchmark: {args.model} on {meta['device']}",
        "",
        f"{meta['date']}, {meta['dtype']}, {size}x{size}, `{meta['command']}`, versions {meta['versions']}",
        "",
        "| variant | batch | steps | s/image | images/s | peak GiB | MFU | x diffusers | mean abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        fmt = lambda v, f: "-" if v is None or v != v else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['variant']} | {r['batch_size']} | {r['steps']} | {r['seconds_per_image']:.4f} | "
            f"{r['images_per_s']:.2f} | {fmt(r['peak_gib'], '.1f')} | {fmt(r['mfu'], '.1%')} | "
            f"{fmt(r['speedup_vs_diffusers'], '.2f')} | {fmt(r['mean_abs_diff_vs_diffusers'], '.5f')} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    sys.exit(main())
