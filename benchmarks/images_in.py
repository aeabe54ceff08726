"""Images in: what image-to-image and inpainting cost against text-to-image of the same steps, and
the step loop with a mix of the three against stock diffusers' pipelines one request at a time.

    python benchmarks/images_in.py                              # random:tiny, 128x128, this CPU
    python benchmarks/images_in.py --steps 10 --batch 1,4 --requests 6 --repeats 2

1) Engine cost per image, batch by batch, every kind at the same step count: text-to-image,
   image-to-image at strength 0.5 and 1.0 (SDEdit: strength 0.5 starts half way down the
   schedule, so it runs half the UNet steps), inpainting with the model's own 4-channel UNet (the
   image's latents blended back after every step, as diffusers does) and with a 9-channel
   inpainting UNet (random:tiny-inpaint beside random:tiny; none where the model has no such
   sibling). Seconds per image and the ratio to text-to-image of the same batch in the same run.
2) The step loop with a mix: N requests, a third each text-to-image, image-to-image at strength
   0.6 and inpainting (4-channel UNet, strength 1.0), admitted together and stepped together until
   each is done, each retired as it finishes (the server's step loop), against stock diffusers'
   StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline on
   the same weights run one request at a time. Images/s of each, their ratio, and the largest
   8-bit difference between the two images of a request (they agree within 2/255 in
   tests/engine/test_images_in.py; reported here, not asserted).

Warm-up is untimed (a run of a few steps of each case); each figure is the median of the timed
runs. benchmarks/gpu_stages.py's ``images_in`` stage runs the same on the GPU suite's model.
Writes benchmarks/results/images-in-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import numpy as np
import torch

import model
from model.types import ARCHITECTURES, GenerationItem

MIX_KINDS = ("text-to-image", "image-to-image 0.6", "inpainting 4-ch")
GPU_MAX_BATCH = 8  # the GPU stage's largest batch: the suite's batch sizes, capped here

COST_COLUMNS = (  # the markdown tables: header, row key, format
    ("kind", "kind", ""),
    ("batch", "batch_size", ""),
    ("steps", "steps", ""),
    ("UNet steps", "unet_steps", ""),
    ("s/image", "seconds_per_image", ".4f"),
    ("images/s", "images_per_s", ".2f"),
    ("x text-to-image cost", "vs_text_to_image", ".2f"),
    ("runs", "timed_runs", ""),
)
MIX_COLUMNS = (
    ("run", "runner", ""),
    ("requests", "requests", ""),
    ("s", "seconds", ".3f"),
    ("images/s", "images_per_s", ".2f"),
    ("x diffusers", "vs_diffusers", ".2f"),
    ("max diff (8-bit)", "max_diff_8bit", ""),
    ("runs", "timed_runs", ""),
)


@dataclass(frozen=True)
class Kind:
    """One kind of request: its inputs, strength and whether it runs on the 9-channel model."""

    name: str
    image: bool = False
    mask: bool = False
    strength: float = 1.0
    inpainting_model: bool = False


KINDS = (
    Kind("text-to-image"),
    Kind("image-to-image 0.5", image=True, strength=0.5),
    Kind("image-to-image 1.0", image=True, strength=1.0),
    Kind("inpainting 4-ch", image=True, mask=True),
    Kind("inpainting 9-ch", image=True, mask=True, inpainting_model=True),
)
BY_NAME = {kind.name: kind for kind in KINDS} | {
    "image-to-image 0.6": Kind("image-to-image 0.6", image=True, strength=0.6)
}


def square_mask(size: int) -> np.ndarray:
    """Repaint the middle quarter of the image (255), keep the rest."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return mask


def item(kind: Kind, seed: int, steps: int, size: int) -> GenerationItem:
    return GenerationItem(
        common.PROMPT,
        seed=seed,
        num_inference_steps=steps,
        height=size,
        width=size,
        init_image=np.roll(common.smooth_image(size), seed * 7, axis=1) if kind.image else None,
        mask=square_mask(size) if kind.mask else None,
        strength=kind.strength,
    )


def unet_steps(engine: Any, it: GenerationItem) -> int:
    """The UNet calls an item makes: its scheduler's timesteps from where its strength starts it."""
    from model.schedulers import make_scheduler

    scheduler = make_scheduler(engine.components.scheduler, it.scheduler, it.seed)
    scheduler.set_timesteps(it.num_inference_steps)
    kept = min(int(it.num_inference_steps * it.strength), it.num_inference_steps)
    skipped = 0 if it.init_image is None else (it.num_inference_steps - kept) * scheduler.order
    return len(scheduler.timesteps) - skipped


def inpainting_sibling(spec: str) -> str | None:
    """random:ARCH's 9-channel sibling random:ARCH-inpaint, where there is one."""
    if not spec.startswith("random:"):
        return None
    arch, _, seed = spec.removeprefix("random:").partition(":")
    sibling = f"{arch}-inpaint"
    return f"random:{sibling}" + (f":{seed}" if seed else "") if sibling in ARCHITECTURES else None


def step_loop(engine: Any, items: Sequence[GenerationItem]) -> list[np.ndarray]:
    """``items`` admitted together and stepped together until done, each retired (decoded) as it
    finishes, as the server's step loop runs them; the images in the items' order."""
    handles = engine.admit_all(items)
    images: dict[int, np.ndarray] = {}
    while len(images) < len(handles):
        done = engine.step(only=handles)
        if done:
            for handle, result in zip(done, engine.retire(done), strict=True):
                images[handle] = result.image
    return [images[handle] for handle in handles]


class Stock:
    """Stock diffusers' three pipelines on one copy of the components, as loaded (no optimisation)."""

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import (
            StableDiffusionImg2ImgPipeline,
            StableDiffusionInpaintPipeline,
            StableDiffusionPipeline,
        )

        from model.loading import load_components

        components = load_components(spec, dtype)
        components.to(device)
        modules = components.modules()
        self.device = device
        self.text = StableDiffusionPipeline(**modules, requires_safety_checker=False)
        self.image = StableDiffusionImg2ImgPipeline(**modules, requires_safety_checker=False)
        self.inpaint = StableDiffusionInpaintPipeline(**modules, requires_safety_checker=False)
        for pipe in (self.text, self.image, self.inpaint):
            pipe.set_progress_bar_config(disable=True)

    def __call__(self, it: GenerationItem) -> np.ndarray:
        """One request through the pipeline a diffusers user would pick for it: HxWx3 uint8."""
        from PIL import Image

        args: dict[str, Any] = {
            "num_inference_steps": it.num_inference_steps,
            "guidance_scale": it.guidance_scale,
            "generator": torch.Generator(self.device).manual_seed(it.seed),
            "output_type": "np",
        }
        if it.init_image is None:
            out = self.text(it.prompt, height=it.height, width=it.width, **args)
        elif it.mask is None:
            out = self.image(it.prompt, image=Image.fromarray(it.init_image), strength=it.strength, **args)
        else:
            image, mask = Image.fromarray(it.init_image), Image.fromarray(it.mask, mode="L")
            size = {"height": it.height, "width": it.width}
            out = self.inpaint(it.prompt, image=image, mask_image=mask, strength=it.strength, **size, **args)
        result: np.ndarray = common.to_uint8(np.asarray(out.images))[0]
        return result

    def one_at_a_time(self, items: Sequence[GenerationItem]) -> list[np.ndarray]:
        return [self(it) for it in items]


class Runner:
    """Timed cases: an untimed warm-up, then one timed run of each case before any case gets a
    second, then rounds of one more of each, up to ``repeats``, while ``left()`` allows (the GPU
    stage's deadline); each row's figures from the median. ``changed`` after every update (the
    stage saves its record), ``skipped`` for what did not fit."""

    def __init__(
        self,
        device: torch.device,
        repeats: int,
        left: Callable[[], float] = lambda: math.inf,
        changed: Callable[[], None] = lambda: None,
        skipped: Callable[[str], None] = print,
    ) -> None:
        self.device, self.repeats, self.left = device, repeats, left
        self.changed, self.skipped = changed, skipped
        self.cases: list[tuple[str, Callable[[], Any], common.Timing, Callable[[common.Timing], None]]] = []

    def first(
        self,
        label: str,
        run: Callable[[], Any],
        warm: Callable[[], Any],
        update: Callable[[common.Timing], None],
    ) -> Any:
        """Warm up, time ``run`` once, ``update`` its row; its output, or None when time is short."""
        if self.left() < 5:
            self.skipped(f"{label}: not started, {self.left():.0f} s left")
            return None
        warm()
        timing = common.time_once(run, self.device)
        output, timing.output = timing.output, None
        self.cases.append((label, run, timing, update))
        update(timing)
        self.changed()
        return output

    def more(self) -> None:
        """Rounds of one more timed run of each case, so that a busy host slows every case alike."""
        waiting = list(self.cases)
        while waiting:
            for case in list(waiting):
                label, run, timing, update = case
                needed = 1.5 * max(timing.runs) + 2
                if len(timing.runs) >= self.repeats or self.left() < needed:
                    if len(timing.runs) < self.repeats:
                        self.skipped(
                            f"{label}: {len(timing.runs)} of {self.repeats} timed runs "
                            f"(another needs ~{needed:.0f} s, {self.left():.0f} s left)"
                        )
                    waiting.remove(case)
                    continue
                timing.add(common.time_once(run, self.device))
                timing.output = None
                update(timing)
                self.changed()


def figures(timing: common.Timing, images: int) -> dict[str, Any]:
    return {"seconds": timing.seconds, **timing.figures(images)}


def cost_cases(
    runner: Runner,
    engines: dict[bool, Any],
    batch: int,
    steps: int,
    size: int,
    warm_steps: int,
    rows: list[dict[str, Any]],
) -> None:
    """Part 1 at one batch size: each kind on its engine (the 9-channel one when it has one)."""
    for kind in KINDS:
        engine = engines.get(kind.inpainting_model)
        if engine is None:
            continue
        items = [item(kind, i, steps, size) for i in range(batch)]
        warm = [item(kind, i, warm_steps, size) for i in range(batch)]
        row: dict[str, Any] = {"kind": kind.name, "batch_size": batch, "steps": steps}
        row["strength"], row["unet_steps"] = kind.strength, unet_steps(engine, items[0])
        row["model"] = engine.info.name

        def update(timing: common.Timing, row: dict[str, Any] = row) -> None:
            row.update(figures(timing, batch))
            ratios(rows)

        rows.append(row)
        label = f"{kind.name}, batch {batch}"
        run = functools.partial(engine.generate, items)
        if runner.first(label, run, functools.partial(engine.generate, warm), update) is not None:
            print(
                f"{label}: {row['seconds_per_image']:.4f} s/image ({row['unet_steps']} UNet steps)",
                flush=True,
            )
        else:
            rows.remove(row)


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's cost per image over text-to-image's at the same batch."""
    base = {
        r["batch_size"]: r["seconds_per_image"]
        for r in rows
        if r["kind"] == "text-to-image" and "seconds" in r
    }
    for r in rows:
        if "seconds" in r and r["batch_size"] in base:
            r["vs_text_to_image"] = r["seconds_per_image"] / base[r["batch_size"]]


def mix_items(requests: int, steps: int, size: int) -> list[GenerationItem]:
    """A third each of text-to-image, image-to-image at 0.6 and inpainting, interleaved."""
    return [item(BY_NAME[MIX_KINDS[i % 3]], 100 + i, steps, size) for i in range(requests)]


def mix_cases(
    runner: Runner,
    engine: Any,
    stock: Stock,
    requests: int,
    steps: int,
    size: int,
    warm_steps: int,
    rows: list[dict[str, Any]],
) -> None:
    """Part 2: the engine's step loop over the mix, then stock diffusers one request at a time."""
    items, warm = mix_items(requests, steps, size), mix_items(min(requests, 3), warm_steps, size)
    outputs: dict[str, list[np.ndarray]] = {}
    runs = {
        "engine step loop, together": (lambda: step_loop(engine, items), lambda: step_loop(engine, warm)),
        "diffusers, one at a time": (lambda: stock.one_at_a_time(items), lambda: stock.one_at_a_time(warm)),
    }
    for name, (run, warm_run) in runs.items():
        row: dict[str, Any] = {"runner": name, "requests": requests, "steps": steps, "kinds": list(MIX_KINDS)}

        def update(timing: common.Timing, row: dict[str, Any] = row) -> None:
            row.update(figures(timing, requests))
            base = next((r for r in rows if r["runner"].startswith("diffusers") and "seconds" in r), None)
            for r in rows:
                if base is not None and "seconds" in r:
                    r["vs_diffusers"] = r["images_per_s"] / base["images_per_s"]

        rows.append(row)
        output = runner.first(f"mix of {requests}, {name}", run, warm_run, update)
        if output is None:
            rows.remove(row)
            continue
        outputs[name] = output
        print(f"mix of {requests}, {name}: {row['images_per_s']:.3f} images/s", flush=True)
    if len(outputs) == 2:
        ours, theirs = outputs.values()
        diffs = [
            int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
            for a, b in zip(ours, theirs, strict=True)
        ]
        by_kind = {
            k: max((d for i, d in enumerate(diffs) if MIX_KINDS[i % 3] == k), default=None) for k in MIX_KINDS
        }
        for row in rows:
            row["max_diff_8bit"], row["max_diff_8bit_by_kind"] = max(diffs), by_kind
        print(f"largest 8-bit difference, engine vs diffusers: {max(diffs)} ({by_kind})", flush=True)


# --------------------------------------------------------------------------------------- the script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:tiny")
    p.add_argument(
        "--inpaint-model", default=None, help="9-channel model (default: random:ARCH-inpaint; 'none')"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp16 (GPU default), bf16, fp32 (CPU default)")
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", default="1,4", help="batch sizes of part 1")
    p.add_argument("--requests", type=int, default=12, help="requests in part 2's mix")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (after an untimed warm-up)")
    p.add_argument("--warm-steps", type=int, default=2, help="steps of each case's warm-up run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="report stem (default results/images-in-<device>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Steps: 1) engines and stock pipelines, 2) part 1 at each batch size, 3) part 2, 4) the report."""
    from model.options import resolve_device, resolve_dtype

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    load_before = os.getloadavg()[0]  # a shared host: how busy it was around the run
    # 1)
    engine = model.load(args.model, device=str(device), dtype=dtype)
    sibling = inpainting_sibling(args.model) if args.inpaint_model is None else args.inpaint_model
    engines = {False: engine}
    if sibling and sibling != "none":
        engines[True] = model.load(sibling, device=str(device), dtype=dtype)
    stock = Stock(args.model, device, dtype)
    size = args.size or engine.native_size
    runner = Runner(device, args.repeats)
    # 2) + 3)
    cost: list[dict[str, Any]] = []
    for batch in (int(b) for b in args.batch.split(",")):
        cost_cases(runner, engines, batch, args.steps, size, args.warm_steps, cost)
    mix: list[dict[str, Any]] = []
    mix_cases(runner, engine, stock, args.requests, args.steps, size, args.warm_steps, mix)
    runner.more()
    # 4)
    head = common.header("images_in.py", argv)
    where = f"cpu ({head['machine']}, {torch.get_num_threads()} threads)"
    meta = head | {"device": torch.cuda.get_device_name() if device.type == "cuda" else where}
    meta |= {"model": args.model, "inpaint_model": sibling, "dtype": str(dtype).replace("torch.", "")}
    meta |= {"size": size, "steps": args.steps, "repeats": args.repeats, "warm_steps": args.warm_steps}
    meta["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    lines = report_lines(meta, cost, mix)
    print("\n".join(lines))
    stem = args.out or common.RESULTS / f"images-in-{device.type}"
    common.write(stem, {"meta": meta, "cost": cost, "mix": mix}, lines)
    print(f"wrote {stem}.json and .md")
    return 0


def report_lines(meta: dict[str, Any], cost: list[dict[str, Any]], mix: list[dict[str, Any]]) -> list[str]:
    size, steps = meta["size"], meta["steps"]
    lines = [f"# Images in: {meta['model']} on {meta['device']}", ""]
    lines += [f"{meta['date']}, {meta['dtype']}, {size}x{size}, {steps} steps, `{meta['command']}`, "
              f"versions {meta['versions']}"]  # fmt: skip
    if "load_average_1min" in meta:
        before, after = meta["load_average_1min"]
        lines[-1] += f", host load average (1 min) {before} before and {after} after"
    lines += ["", "## Cost per image against text-to-image (engine, same steps, same batch)", ""]
    lines += common.columns(COST_COLUMNS, cost)
    lines += ["", f"Image-to-image at strength 0.5 starts half way down the schedule: it runs half of "
              f"the {steps} steps (UNet steps: the scheduler's calls; PNDM makes one more than its "
              "steps), plus one VAE encode of its image. Inpainting at strength 1 runs every step, "
              "plus a VAE encode (the image at 4 channels, blended back after every step; the masked "
              "image at 9 channels, a UNet input); the 9-channel rows "
              f"are {meta.get('inpaint_model') or 'not measured (no 9-channel sibling)'}, their ratio "
              "against the 4-channel model's text-to-image. Median of the timed runs after a "
              f"{meta.get('warm_steps', '-')}-step warm-up."]  # fmt: skip
    requests = mix[0]["requests"] if mix else "-"
    lines += ["", f"## The step loop: {requests} requests mixed ({', '.join(MIX_KINDS)}) against stock "
              "diffusers one at a time", ""]  # fmt: skip
    lines += common.columns(MIX_COLUMNS, mix)
    if mix and "max_diff_8bit_by_kind" in mix[0]:
        by_kind = ", ".join(f"{k} {v}" for k, v in mix[0]["max_diff_8bit_by_kind"].items())
        lines += [
            "",
            f"Largest 8-bit difference of a request's two images, by kind: {by_kind} (expected <= 2).",
        ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
