"""The step loop through a real server against whole batches back to back, side by side in one run.

    python benchmarks/steps.py                                  # fake step engine + random:tiny
    python benchmarks/steps.py --engines fake --clients 1,8,32 --seconds 6

For each engine a server process runs `sd-endpoint serve`'s code path (the step loop) around it;
closed-loop HTTP clients each post a one-image /score request, wait for the answer (PNG encoding
included), and post the next. Two workloads: every request 20 steps ("uniform"), and half 20,
half 50 steps ("mix"). The yardstick, timed in the same run, is a full batch of the server's
largest batch size generated back to back with nothing in between:

- ``fake``: a step costs ``a + b x rows`` seconds (guided images take two UNet rows), slept so the
  CPU stays free; its whole-batch generation costs steps x (a + b x 2n). Images are 512x512
  gradients, so PNG encoding costs what it costs for real images.
- ``tiny``: random:tiny on this machine's CPU, the real per-step engine; the yardstick is stock
  diffusers' StableDiffusionPipeline at the same batch on the same components.

Throughput is reported as a fraction of the yardstick (in image-steps per second for the mix),
with p50 and p95 latency per step count.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from model.types import DEFAULT_SCHEDULER, GenerationItem, GenerationResult, ModelInfo

MAX_BATCH = 8
WARMUP_FRACTION = 0.25  # the first quarter of each case is not counted
WORKLOADS = {"uniform": (20,), "mix": (20, 50)}  # the step counts the clients take turns at
# per engine: the client counts and the seconds of load per case (random:tiny is slow on a CPU)
ENGINES = {"fake": ("clients", "seconds"), "tiny": ("tiny_clients", "tiny_seconds")}


class FakeStepEngine:
    """Per-step and whole-batch costs from one formula: a + b x rows per step."""

    def __init__(self, a_s: float, b_s: float) -> None:
        self.a_s, self.b_s = a_s, b_s
        self.image = common.smooth_image(512)
        self.info = ModelInfo(
            "fake", "fake", 512, 512, (DEFAULT_SCHEDULER,), DEFAULT_SCHEDULER, False, "cpu", "fp32", True
        )
        self._running: dict[int, list[Any]] = {}
        self._next = 0

    def validate(self, items: Sequence[GenerationItem]) -> None:
        pass

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        for _ in range(max(item.num_inference_steps for item in items)):  # one sleep per step, as above
            time.sleep(self.a_s + self.b_s * 2 * len(items))
        return [GenerationResult(self.image, None, item.seed) for item in items]

    def admit(self, item: GenerationItem) -> int:
        self._next += 1
        self._running[self._next] = [item, 0]
        return self._next

    def step(self) -> list[int]:
        time.sleep(self.a_s + self.b_s * 2 * len(self._running))
        for entry in self._running.values():
            entry[1] += 1
        return [handle for handle, (item, done) in self._running.items() if done >= item.num_inference_steps]

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
                body = {
                    "input_data": {
                        "columns": ["prompt"],
                        "data": [f"client {number}"],
                        "parameters": {"num_inference_steps": step_count, "seed": n},
                    }
                }
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


def yardstick(engine_name: str, engine: Any) -> dict[str, float]:
    """Whole batches at 20 steps, back to back: images/s and image-steps/s; one image alone."""
    if engine_name == "fake":

        def batch(n: int) -> None:
            engine.generate([GenerationItem(prompt="full", seed=i, num_inference_steps=20) for i in range(n)])
    else:
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**engine.components.modules(), requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        size = engine.info.native_height

        def batch(n: int) -> None:
            with torch.inference_mode():
                pipe(
                    [f"stock {i}" for i in range(n)],
                    num_inference_steps=20,
                    height=size,
                    width=size,
                    output_type="np",
                )

    full = common.timed(functools.partial(batch, MAX_BATCH)).seconds
    alone = common.timed(functools.partial(batch, 1)).seconds
    return {
        "images_per_s": MAX_BATCH / full,
        "image_steps_per_s": 20 * MAX_BATCH / full,
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
    parser.add_argument("--out", type=Path, default=common.RESULTS / "steps-cpu")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    a_s, b_s = args.step_a_ms / 1000, args.step_b_ms / 1000
    if args.serve:
        sys.exit(serve(args.serve, a_s, b_s))

    report: dict[str, Any] = {**common.header("steps.py"), "max_batch": MAX_BATCH, "cases": []}
    for engine_name in args.engines.split(","):
        clients_arg, seconds_arg = ENGINES[engine_name]
        base = report[f"yardstick_{engine_name}"] = yardstick(engine_name, make_engine(engine_name, a_s, b_s))
        env = {"SD_MAX_BATCH_SIZE": str(MAX_BATCH), "SD_MAX_QUEUE_ITEMS": "256"}
        command = [
            sys.executable,
            __file__,
            "--serve",
            engine_name,
            "--step-a-ms",
            str(args.step_a_ms),
            "--step-b-ms",
            str(args.step_b_ms),
        ]
        with common.serving(env, command) as (url, _):
            for workload, steps in WORKLOADS.items():
                for clients in (int(c) for c in getattr(args, clients_arg).split(",")):
                    done, elapsed, lat = asyncio.run(
                        closed_loop(url, clients, steps, getattr(args, seconds_arg))
                    )
                    unit = "image_steps" if workload == "mix" else "images"
                    case = {
                        "engine": engine_name,
                        "workload": workload,
                        "clients": clients,
                        "images_per_s": round(done["images"] / elapsed, 3),
                        "fraction_of_yardstick": round(done[unit] / elapsed / base[f"{unit}_per_s"], 3),
                    }
                    for s, values in lat.items():
                        case[f"p50_{s}_s"] = float(np.percentile(values, 50)) if values else None
                        case[f"p95_{s}_s"] = float(np.percentile(values, 95)) if values else None
                    report["cases"].append(case)
                    print(case, flush=True)
    lines = [f"# Step loop vs whole batches back to back\n\n`{report['command']}` on {report['machine']}.\n"]
    lines += [
        "Fraction: the step loop's throughput through the server over the yardstick's (whole batches of "
        f"{MAX_BATCH} back to back; stock diffusers' for tiny), in images/s (image-steps/s for the mix).\n"
    ]
    spec = [
        ("engine", "engine", ""),
        ("workload", "workload", ""),
        ("clients", "clients", ""),
        ("images/s", "images_per_s", ".2f"),
        ("of the yardstick", "fraction_of_yardstick", ".2f"),
        ("p50 20-step s", "p50_20_s", ".3f"),
        ("p95 20-step s", "p95_20_s", ".3f"),
    ]
    lines += common.columns(spec, report["cases"])
    for name in ENGINES:
        if measured := report.get(f"yardstick_{name}"):
            full = f"full batch of {MAX_BATCH} at 20 steps {measured['images_per_s']:.2f} images/s"
            lines.append(f"\n{name}: {full}; one image alone {measured['one_image_s']:.3f} s.")
    common.write(args.out, report, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
