"""Several models on one device (model/library/models.py's ``ModelSet``): what a switch costs the
first image after it, and what interleaving 1, 2 or 4 models costs throughput, side by side in one run.

    python benchmarks/models.py                         # random tiny models on this machine's CPU
    python benchmarks/models.py --device cuda           # random sd-v1-4 models, fp16, 512x512
    python benchmarks/models.py --device cuda --models a=/models/v1-5,b=/models/dreamshaper

1) Time to the first image after a switch, the ``ModelSet`` at cap 1 and its synchronous path
   (``generate``: the other model onto the device, then one image): ``cold``, the model read from
   its folder on disk (no host cache: the model it replaces is dropped), ``warm``, the model copied
   back from host memory (a host cache big enough for it: the model it replaces goes there), and
   ``resident``, the same image with no switch. Seconds and the ratio to ``resident``; the load
   alone, as the set's ``events`` report it ("load_disk" / "load_host" seconds), and the bytes the
   evicted model freed. The random models are drawn and saved first (diffusers' save_pretrained,
   as tests/helpers/weights.py does) into a temporary folder; a freshly written folder is in the
   OS page cache, so ``cold`` is a read of files without the disk's own latency.
2) Throughput: ``--images`` images spread round-robin over 1, 2 and 4 models, all of them on the
   device (cap 4), run through the step API (``admit_all``, ``step`` until each is done, each
   retired as it finishes: one UNet call per model and step); images/s and the ratio to one model
   alone. Then the same images through the server's step loop (``StepLoop``) around the same set.

Different seeds make every component differ, so nothing is shared between the random models: a
switch moves the whole model. Warm-up is untimed (one run of each case); every case gets one timed
run before any gets a second (images_in.Runner), and each figure is the median of the timed runs.
benchmarks/gpu_stages.py's ``models`` stage runs the same on the GPU suite's model.
Writes benchmarks/results/models-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import numpy as np
import torch
from images_in import Runner

import model
from model.library.models import ModelSet
from model.library.shared import SHAREABLE
from model.types import GenerationItem

MODEL_COUNTS = (1, 2, 4)
SWITCHES = ("cold", "warm", "resident")
HOST_CACHE_BYTES = 1 << 40  # the warm case: every evicted model stays in host memory
SWITCH_COLUMNS = (  # the markdown tables: header, row key, format
    ("case", "case", ""),
    ("model from", "source", ""),
    ("s to first image", "seconds", ".3f"),
    ("x resident", "vs_resident", ".2f"),
    ("load s", "load_s", ".3f"),
    ("moved MiB", "moved_mib", ".1f"),
    ("runs", "timed_runs", ""),
)
THROUGHPUT_COLUMNS = (
    ("models", "models", ""),
    ("run", "runner", ""),
    ("images", "images", ""),
    ("steps", "steps", ""),
    ("s", "seconds", ".3f"),
    ("images/s", "images_per_s", ".2f"),
    ("x 1 model", "vs_one_model", ".2f"),
    ("runs", "timed_runs", ""),
)


# ------------------------------------------------------------------------------------ the models


def save_random(out: Path, arch: str, seed: int, dtype: torch.dtype, device: str) -> Path:
    """random:<arch>:<seed>'s components saved by diffusers' ``save_pretrained`` in ``dtype`` (as
    tests/helpers/weights.py's save_with_diffusers, but drawn on ``device``: seconds, not a CPU init
    of an sd-v1-4, on a GPU)."""
    from diffusers import StableDiffusionPipeline

    from model.architectures import build_components

    with torch.device(device) if device != "cpu" else contextlib.nullcontext():
        parts = build_components(arch, seed)
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=parts["safety_checker"] is not None)
    pipe.to("cpu", dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def shared_parts(device: str) -> tuple[str, ...]:
    """What the server lets two models share (service/runtime/engines.py's _shareable, eager, no
    adapters): the VAE only on the CPU, where no optimisation rewrites it in place."""
    return SHAREABLE if device == "cpu" else ("text_encoder", "safety_checker")


class Events:
    """A ModelSet's ``events``: every (kind, model, value), and the last of each kind."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, float]] = []

    def __call__(self, kind: str, name: str, value: float) -> None:
        self.seen.append((kind, name, value))

    def last(self, *kinds: str) -> tuple[str, str, float] | None:
        return next((e for e in reversed(self.seen) if e[0] in kinds), None)


def model_set(
    specs: dict[str, str], device: str, dtype: torch.dtype, cap: int, host_bytes: int, events: Events | None
) -> ModelSet:
    """A set of ``specs`` (name -> spec) on ``device``, the first one loaded, the rest on demand."""

    def loader(spec: str) -> Callable[[Any], Any]:
        def load(share: Any) -> Any:
            drawn_there = device != "cpu" and spec.startswith("random:")  # random weights: on the device
            with torch.device(device) if drawn_there else contextlib.nullcontext():
                return model.load(spec, device, dtype, share=share)

        return load

    loaders = {name: loader(spec) for name, spec in specs.items()}
    default = next(iter(specs))
    first = loaders[default](None)
    return ModelSet(
        default, loaders, first, cap=cap, host_cache_bytes=host_bytes, share_parts=shared_parts(device),
        events=events,
    )  # fmt: skip


def item(name: str, seed: int, steps: int, size: int) -> GenerationItem:
    return GenerationItem(
        common.PROMPT, seed=seed, num_inference_steps=steps, height=size, width=size, model=name
    )


# ----------------------------------------------------------------------------- 1) the switches


def switch_cases(
    runner: Runner,
    folders: dict[str, str],
    device: str,
    dtype: torch.dtype,
    steps: int,
    size: int,
    rows: list[dict[str, Any]],
) -> list[ModelSet]:
    """Cold, warm and resident, each one image of ``steps`` at ``size`` (two models of ``folders``
    take turns); the sets made, for the caller to close."""
    names = list(folders)[:2]
    pair = {name: folders[name] for name in names}
    cold_events, warm_events = Events(), Events()
    cold = model_set(pair, device, dtype, 1, 0, cold_events)
    warm = model_set(pair, device, dtype, 1, HOST_CACHE_BYTES, warm_events)
    seeds = iter(range(10**6))

    def other(models: ModelSet) -> str:
        return next(name for name in names if name not in models.resident)

    def on_device(models: ModelSet) -> str:
        return next(iter(models.resident))

    def image(models: ModelSet, pick: Callable[[ModelSet], str]) -> np.ndarray:
        return models.generate([item(pick(models), next(seeds), steps, size)])[0].image

    cases = {
        "cold": (cold, other, cold_events, "disk (folder)"),
        "warm": (warm, other, warm_events, "host memory"),
        "resident": (warm, on_device, None, "on the device"),
    }
    for case, (models, pick, events, source) in cases.items():
        row: dict[str, Any] = {"case": case, "source": source, "steps": steps, "size": size}
        row["load_runs"], row["moved_bytes_runs"] = [], []

        def update(timing: common.Timing, row: dict[str, Any] = row, events: Events | None = events) -> None:
            row.update(seconds=timing.seconds, timed_runs=len(timing.runs))
            row["run_seconds"] = [round(r, 4) for r in timing.runs]
            if events is not None:  # the timed run's load and eviction: the last of each
                load, evict = events.last("load_disk", "load_host"), events.last("evict")
                row["load_runs"].append(None if load is None else load[2])
                row["moved_bytes_runs"].append(None if evict is None else evict[2])
                row["load_kind"] = None if load is None else load[0]
                loads = [s for s in row["load_runs"] if s is not None]
                row["load_s"] = statistics.median(loads) if loads else None
                moved = [b for b in row["moved_bytes_runs"] if b is not None]
                row["moved_mib"] = statistics.median(moved) / 2**20 if moved else None
            base = next((r for r in rows if r["case"] == "resident" and "seconds" in r), None)
            for r in rows:
                if base is not None and "seconds" in r:
                    r["vs_resident"] = r["seconds"] / base["seconds"]

        rows.append(row)
        run = functools.partial(image, models, pick)
        if runner.first(f"switch {case}", run, run, update) is None:
            rows.remove(row)
            continue
        load = f", load {row['load_s']:.3f} s ({row['load_kind']})" if row.get("load_s") is not None else ""
        print(f"switch {case}: {row['seconds']:.3f} s to the first image{load}", flush=True)
    return [cold, warm]


# ---------------------------------------------------------------------------- 2) the throughput


def step_api(models: ModelSet, items: Sequence[GenerationItem]) -> list[np.ndarray]:
    """``items`` admitted together and stepped together until done (one UNet call per model and
    step), each retired as it finishes; the images in the items' order."""
    handles = models.admit_all(items)
    images: dict[int, np.ndarray] = {}
    while len(images) < len(handles):
        done = models.step()
        if done:
            for handle, result in zip(done, models.retire(done), strict=True):
                images[handle] = result.image
    return [images[handle] for handle in handles]


def step_loop(models: ModelSet, items: Sequence[GenerationItem], threads: int | None) -> list[np.ndarray]:
    """``items`` submitted at once to the server's step loop around ``models``, awaited, closed."""
    from service.runtime.batching.steploop import StepLoop
    from service.runtime.engines import engine_thread
    from service.runtime.metrics import Metrics

    async def run() -> list[np.ndarray]:
        thread = engine_thread(0, threads)
        steps = StepLoop(
            [models], max_batch_size=len(items), max_queue_items=4 * len(items), metrics=Metrics(),
            threads=[thread], max_groups=max(MODEL_COUNTS),
        )  # fmt: skip
        steps.start()
        try:
            results = await asyncio.gather(*steps.submit(items))
        finally:
            await steps.close()
        return [result.image for result in results]

    return asyncio.run(run())


def throughput_cases(
    runner: Runner,
    models: ModelSet,
    images: int,
    steps: int,
    size: int,
    threads: int | None,
    rows: list[dict[str, Any]],
    loop: bool = True,
) -> None:
    """``images`` images round-robin over the first 1, 2, 4 models of ``models`` (all resident)."""
    names = list(models.names)
    for runner_name in ("step API", "step loop") if loop else ("step API",):
        for count in (k for k in MODEL_COUNTS if k <= len(names)):
            batch = [item(names[i % count], i, steps, size) for i in range(images)]
            warm = [item(names[i % count], i, 1, size) for i in range(max(count, 2))]
            if runner_name == "step API":
                run, warm_run = (
                    functools.partial(step_api, models, batch),
                    functools.partial(step_api, models, warm),
                )
            else:
                run = functools.partial(step_loop, models, batch, threads)
                warm_run = functools.partial(step_loop, models, warm, threads)
            row: dict[str, Any] = {"models": count, "runner": runner_name, "images": images, "steps": steps}
            row["size"] = size

            def update(timing: common.Timing, row: dict[str, Any] = row) -> None:
                row.update(seconds=timing.seconds, **timing.figures(images))
                for r in rows:
                    base = next(
                        (
                            b
                            for b in rows
                            if b["runner"] == r["runner"] and b["models"] == 1 and "seconds" in b
                        ),
                        None,
                    )
                    if base is not None and "seconds" in r:
                        r["vs_one_model"] = r["images_per_s"] / base["images_per_s"]

            rows.append(row)
            label = f"{count} model(s), {runner_name}"
            if runner.first(label, run, warm_run, update) is None:
                rows.remove(row)
                continue
            print(f"{label}: {row['images_per_s']:.3f} images/s", flush=True)


# ------------------------------------------------------------------------------------ the script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp16 (GPU default), bf16, fp32 (CPU default)")
    p.add_argument("--arch", default=None, help="random models' architecture (tiny on CPU, else sd-v1-4)")
    p.add_argument("--models", default="", help="real folders instead: NAME=PATH,NAME=PATH[,...] (2 to 4)")
    p.add_argument("--size", type=int, default=None, help="image side (default: 64 on CPU, 512 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="steps of the switch's image (CPU 20, GPU 50)")
    p.add_argument("--images", type=int, default=8, help="images of each throughput run")
    p.add_argument("--throughput-steps", type=int, default=None, help="their steps (CPU 10, GPU 20)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (after an untimed warm-up)")
    p.add_argument("--no-step-loop", action="store_true", help="leave out the step loop's rows")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="report stem (default results/models-<device>)")
    return p.parse_args(argv)


def random_models(
    arch: str, folder: Path, dtype: torch.dtype, device: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(the switch's two folders, the throughput's four specs): random:<arch>:1 and :2 saved into
    ``folder`` as a and b, and random:<arch>:1 to :4 as m1 to m4."""
    folders = {
        name: str(save_random(folder / name, arch, seed, dtype, device))
        for seed, name in ((1, "a"), (2, "b"))
    }
    return folders, {f"m{k}": f"random:{arch}:{k}" for k in range(1, max(MODEL_COUNTS) + 1)}


def measure(
    runner: Runner,
    folders: dict[str, str],
    specs: dict[str, str],
    device: str,
    dtype: torch.dtype,
    size: int,
    steps: tuple[int, int],
    images: int,
    threads: int | None,
    rows: tuple[list[dict[str, Any]], list[dict[str, Any]]],
    loop: bool = True,
) -> None:
    """Parts 1 and 2 (``steps``: the switch's image, the throughput's images) into ``rows`` (switch,
    throughput), then more timed runs of every case while the runner's time allows."""
    sets = switch_cases(runner, folders, device, dtype, steps[0], size, rows[0])
    several = model_set(specs, device, dtype, len(specs), 0, None)
    try:
        several.ensure(specs)  # every model on the device at once
        throughput_cases(runner, several, images, steps[1], size, threads, rows[1], loop)
        runner.more()
    finally:
        for models in [*sets, several]:
            models.close()


def main(argv: list[str] | None = None) -> int:
    """Steps: 1) models saved, 2) the switches and the throughput, 3) the report."""
    from model.options import resolve_device, resolve_dtype

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device != "cpu"
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    arch = args.arch or ("sd-v1-4" if gpu else "tiny")
    size = args.size or (512 if gpu else 64)
    steps = (args.steps or (50 if gpu else 20), args.throughput_steps or (20 if gpu else 10))
    load_before = os.getloadavg()[0]  # a shared host: how busy it was around the run
    runner = Runner(torch.device(args.device), args.repeats)
    switch: list[dict[str, Any]] = []
    throughput: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sd-models-") as tmp:
        # 1)
        if args.models:
            folders = dict(entry.split("=", 1) for entry in args.models.split(","))
            if not 2 <= len(folders) <= max(MODEL_COUNTS):
                raise SystemExit("--models takes 2 to 4 NAME=PATH entries")
            specs, switch_models = folders, folders
        else:
            folders, specs = random_models(arch, Path(tmp), dtype, args.device)
            switch_models = {"a": f"random:{arch}:1", "b": f"random:{arch}:2"}
        # 2)
        measure(runner, folders, specs, args.device, dtype, size, steps, args.images,
                args.threads or None, (switch, throughput), not args.no_step_loop)  # fmt: skip
    # 3)
    head = common.header("models.py", argv)
    where = f"cpu ({head['machine']}, {torch.get_num_threads()} threads)"
    meta = head | {"device": torch.cuda.get_device_name() if gpu else where}
    meta |= {"switch_models": switch_models, "throughput_models": specs}
    meta |= {"dtype": str(dtype).replace("torch.", ""), "size": size, "steps": steps[0]}
    meta |= {"throughput_steps": steps[1], "images": args.images, "repeats": args.repeats}
    meta |= {"share_parts": list(shared_parts(args.device))}
    meta["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    lines = report_lines(meta, switch, throughput)
    print("\n".join(lines))
    stem = args.out or common.RESULTS / f"models-{'gpu' if gpu else 'cpu'}"
    common.write(stem, {"meta": meta, "switch": switch, "throughput": throughput}, lines)
    print(f"wrote {stem}.json and .md")
    return 0


def report_lines(
    meta: dict[str, Any], switch: list[dict[str, Any]], throughput: list[dict[str, Any]]
) -> list[str]:
    size = meta["size"]
    lines = [f"# Several models on one device: {meta['device']}", ""]
    lines += [
        f"{meta['date']}, {meta['dtype']}, {size}x{size}, `{meta['command']}`, versions {meta['versions']}"
    ]
    if "load_average_1min" in meta:
        before, after = meta["load_average_1min"]
        lines[-1] += f", host load average (1 min) {before} before and {after} after"
    lines += ["", f"## Time to the first image after a switch (cap 1, `generate`, one image of "
              f"{meta['steps']} steps)", ""]  # fmt: skip
    lines += common.columns(SWITCH_COLUMNS, switch)
    lines += ["", "`cold`: the other model read from its folder (written just before, so from the OS "
              "page cache, not the disk itself), the one it replaces dropped; `warm`: copied back from "
              "host memory, the one it replaces moved there; `resident`: no switch. `load s`: the "
              "set's own load event; `moved MiB`: what the evicted model freed on the device. Models: "
              f"{meta['switch_models']}; shareable parts {meta['share_parts']} (random seeds differ "
              "in every part, so nothing is shared)."]  # fmt: skip
    lines += ["", f"## Throughput: {meta['images']} images round-robin over 1, 2 and 4 resident models "
              f"({meta['throughput_steps']} steps)", ""]  # fmt: skip
    lines += common.columns(THROUGHPUT_COLUMNS, throughput)
    lines += ["", "`step API`: `admit_all`, `step` until done, `retire` (one UNet call per model and step); "
              "`step loop`: the server's `StepLoop` around the same set, all images submitted at once. "
              f"Models: {meta['throughput_models']}. Median of the timed runs after an untimed "
              "warm-up."]  # fmt: skip
    return lines


if __name__ == "__main__":
    sys.exit(main())
