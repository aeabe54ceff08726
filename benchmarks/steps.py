"""The step loop against the engine's own full batches, measured in one run, through a real server.

    python benchmarks/steps.py                                  # fake step engine + random:tiny
    python benchmarks/steps.py --engines fake --clients 1,8,32 --seconds 6

For each engine a server process runs
`sd-endpoint serve`'s code path around that engine; closed-loop HTTP clients each post a
one-image /score request, wait for the answer (PNG encoding included), and post the next. Two
workloads: every request 20 steps ("uniform"), and half 20, half 50 steps ("mix").

Engines:
- ``fake``: a step costs ``a + b x rows`` seconds (guided images take two UNet rows), slept so the
  CPU stays free; a whole batch of n images costs steps x (a + b x 2n); images are
  512x512 gradients, so PNG encoding costs what it costs for real images. Its capacity, the
  throughput of full batches back to back, is the yardstick.
- ``tiny``: random:tiny on this machine's CPU, the real per-step engine. The yardstick is stock
  diffusers' StableDiffusionPipeline at batch 8 on the same components, timed in the same run.

Throughput is reported as a fraction of the yardstick (in image-steps per second for the mix),
with p50 and p95 latency per step count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.types import DEFAULT_SCHEDULER, GenerationItem, GenerationResult, ModelInfo  # noqa: E402

MAX_BATCH = 8
FAKE_SIZE = 512
WARMUP_FRACTION = 0.25  # the first quarter of each case is not counted
WORKLOADS = {"uniform": (20,), "mix": (20, 50)}


def smooth_image(size: int) -> np.ndarray:
    """A stand-in for a diffusion image: smooth gradients plus mild noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(4 * (x + y))], axis=-1)
    return ((base + 1) * 110 + rng.normal(0, 4, (size, size, 3))).clip(0, 255).astype(np.uint8)


class FakeStepEngine:
    """Per-step and whole-batch costs from one formula: a + b x rows per step."""

    def __init__(self, a_s: float, b_s: float) -> None:
        self.a_s, self.b_s = a_s, b_s
        self.image = smooth_image(FAKE_SIZE)
        self.info = ModelInfo(
            "fake",
            "fake",
            FAKE_SIZE,
            FAKE_SIZE,
            (DEFAULT_SCHEDULER,),
            DEFAULT_SCHEDULER,
            False,
            "cpu",
            "fp32",
            True,
        )
        self._running: dict[int, list[Any]] = {}
        self._next = 0

    def step_cost(self, rows: int) -> float:
        return self.a_s + self.b_s * rows

    def validate(self, items: Sequence[GenerationItem]) -> None:
        pass

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        for _ in range(max(item.num_inference_steps for item in items)):  # one sleep per step, as above
            time.sleep(self.step_cost(2 * len(items)))
        return [GenerationResult(self.image, None, item.seed) for item in items]

    def admit(self, item: GenerationItem) -> int:
        self._next += 1
        self._running[self._next] = [item, 0]
        return self._next

    def step(self) -> list[int]:
        time.sleep(self.step_cost(2 * len(self._running)))
        done = []
        for handle, entry in self._running.items():
            entry[1] += 1
            if entry[1] >= entry[0].num_inference_steps:
                done.append(handle)
        return done

    def retire(self, handles: Sequence[int]) -> list[GenerationResult]:
        return [GenerationResult(self.image, None, self._running.pop(h)[0].seed) for h in handles]

    def cancel(self, handle: int) -> None:
        self._running.pop(handle, None)

    def warmup(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_engine(name: str, a_s: float, b_s: float) -> Any:
    if name == "fake":
        return FakeStepEngine(a_s, b_s)
    import model

    return model.load("random:tiny", device="cpu")


def serve(name: str, a_s: float, b_s: float) -> int:
    """The server process: `sd-endpoint serve`'s code path around the named engine."""
    from service.hosts.server import serve as run_server
    from service.logs import configure_logging
    from service.settings import Settings
    from service.web.app import create_app

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return run_server(create_app(settings, engine=make_engine(name, a_s, b_s)), settings)


@contextlib.contextmanager
def server(name: str, args: argparse.Namespace) -> Iterator[str]:
    env = {
        **os.environ, "SD_PORT": str(args.port), "SD_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT),
        "SD_MAX_BATCH_SIZE": str(MAX_BATCH), "SD_MAX_QUEUE_ITEMS": "256",
    }  # fmt: skip
    command = [sys.executable, __file__, "--serve", name, "--step-a-ms", str(args.step_a_ms),
               "--step-b-ms", str(args.step_b_ms)]  # fmt: skip
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=120)


async def closed_loop(
    url: str, clients: int, steps: Sequence[int], seconds: float
) -> tuple[dict[str, int], float, dict[int, list[float]]]:
    """Images done, image-steps done, and latencies by step count, over ``seconds`` of load."""
    latencies: dict[int, list[float]] = {s: [] for s in steps}
    finished: list[tuple[float, int]] = []  # (when, steps) of every image
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.monotonic()
        stop_at = started + seconds

        async def client(number: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                step_count = steps[(number + n) % len(steps)]
                body = {"input_data": {"columns": ["prompt"], "data": [f"client {number}"],
                        "parameters": {"num_inference_steps": step_count, "seed": n}}}  # fmt: skip
                sent = time.monotonic()
                response = await http.post("/score", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"server answered {response.status_code}: {response.text[:200]}")
                now = time.monotonic()
                finished.append((now, step_count))
                if sent >= started + WARMUP_FRACTION * seconds:
                    latencies[step_count].append(now - sent)
                n += 1

        await asyncio.gather(*(client(c) for c in range(clients)))
    # Steady state: what finished in the window after the warm-up (the ends of a closed loop
    # even out there), not counting the images still running when the load stopped.
    window_start = started + WARMUP_FRACTION * seconds
    in_window = [s for when, s in finished if window_start <= when <= stop_at]
    return {"images": len(in_window), "image_steps": sum(in_window)}, stop_at - window_start, latencies


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _timed(fn: Any, *args: Any) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def yardstick(engine_name: str, engine: Any, size: int, repeats: int) -> dict[str, float]:
    """Full-batch throughput at 20 steps: images/s and image-steps/s."""
    if engine_name == "fake":
        items = [GenerationItem(prompt="full", seed=i, num_inference_steps=20) for i in range(MAX_BATCH)]
        one = [GenerationItem(prompt="alone", seed=0, num_inference_steps=20)]
        best = min(_timed(engine.generate, items) for _ in range(repeats))
        alone = min(_timed(engine.generate, one) for _ in range(repeats))
        return {
            "images_per_s": MAX_BATCH / best,
            "image_steps_per_s": 20 * MAX_BATCH / best,
            "one_image_s": alone,
        }
    import torch
    from diffusers import StableDiffusionPipeline

    c = engine.components
    pipe = StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=c.scheduler, safety_checker=c.safety_checker, feature_extractor=c.feature_extractor,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"stock {i}" for i in range(MAX_BATCH)]

    def stock(batch: list[str]) -> None:
        with torch.inference_mode():
            pipe(batch, num_inference_steps=20, height=size, width=size, output_type="np")

    best = min(_timed(stock, prompts) for _ in range(repeats))
    alone = min(_timed(stock, prompts[:1]) for _ in range(repeats))
    return {
        "images_per_s": MAX_BATCH / best,
        "image_steps_per_s": 20 * MAX_BATCH / best,
        "one_image_s": alone,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="fake,tiny")
    parser.add_argument("--clients", default="1,4,8,16,32")
    parser.add_argument("--tiny-clients", default="1,8", help="client counts for random:tiny (slow on CPU)")
    parser.add_argument("--seconds", type=float, default=6.0, help="load per case (fake)")
    parser.add_argument("--tiny-seconds", type=float, default=20.0, help="load per case (tiny)")
    parser.add_argument("--step-a-ms", type=float, default=20.0)
    parser.add_argument("--step-b-ms", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "steps-cpu")
    parser.add_argument("--port", type=int, default=5098)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        sys.exit(serve(args.serve, args.step_a_ms / 1000, args.step_b_ms / 1000))

    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/steps.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()} ({os.cpu_count()} CPUs), python {platform.python_version()}",
        "max_batch": MAX_BATCH,
        "cases": [],
    }
    for engine_name in args.engines.split(","):
        engine = make_engine(engine_name, args.step_a_ms / 1000, args.step_b_ms / 1000)
        size = engine.info.native_height
        seconds = args.seconds if engine_name == "fake" else args.tiny_seconds
        clients_list = [
            int(c) for c in (args.clients if engine_name == "fake" else args.tiny_clients).split(",")
        ]
        base = yardstick(engine_name, engine, size, repeats=3)
        report[f"yardstick_{engine_name}"] = base
        del engine  # the server process has its own
        with server(engine_name, args) as url:
            for workload, steps in WORKLOADS.items():
                for clients in clients_list:
                    done, elapsed, lat = asyncio.run(closed_loop(url, clients, steps, seconds))
                    unit = "image_steps" if workload == "mix" else "images"
                    step = {
                        "images_per_s": round(done["images"] / elapsed, 3),
                        "fraction_of_capacity": round(done[unit] / elapsed / base[f"{unit}_per_s"], 3),
                        **{f"p50_{s}_s": percentile(v, 50) for s, v in lat.items()},
                        **{f"p95_{s}_s": percentile(v, 95) for s, v in lat.items()},
                    }
                    print(engine_name, workload, clients, step)
                    report["cases"].append(
                        {"engine": engine_name, "workload": workload, "clients": clients, "step": step}
                    )
    write(report, args.out)


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Step loop against full batches\n\n`{report['command']}` on {report['machine']}.\n",
        "Fraction: throughput over the engine's own full-batch throughput (images/s; image-steps/s "
        "for the 20/50 mix; random:tiny's yardstick is stock diffusers' pipeline at a full batch). "
        "p50: median latency of the 20-step requests.\n",
        "| engine | workload | clients | fraction of full batches | p50 20-step |",
        "|---|---|---|---|---|",
    ]
    for row in report["cases"]:
        step = row["step"]
        lines.append(
            f"| {row['engine']} | {row['workload']} | {row['clients']} "
            f"| {step['fraction_of_capacity']:.2f} | {_seconds(step.get('p50_20_s'))} |"
        )
    for name in ("fake", "tiny"):
        base = report.get(f"yardstick_{name}")
        if base:
            lines.append(
                f"\n{name}: full batch of {report['max_batch']} at 20 steps {base['images_per_s']:.2f} "
                f"images/s; one image alone {base['one_image_s']:.3f} s."
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


if __name__ == "__main__":
    main()
