"""Server benchmark: what the HTTP server adds on top of the engine, measured side by side in one run.

    python benchmarks/server.py                                   # fake engine + random:tiny, 1/8/32 clients
    python benchmarks/server.py --engines fake --clients 1,8 --rounds 6

For each engine and each number of concurrent clients it times (a) the engine called directly with
batches of min(clients, max batch) back to back, the best a client could get with the engine to
itself, and (b) the same number of closed-loop HTTP clients posting one-prompt requests to a real
server process (`service.hosts.server`'s code path, default settings). It prints images/s, median latency,
the server's added latency and their ratios; then the PNG + base64 encoding time of a 512x512 image.

Engines: `fake` sleeps a fixed time per batch and returns 512x512 images (a GPU-like engine whose
time does not depend on the CPU the server needs); `tiny` is random:tiny on this machine's CPU, which
the server, the clients and the engine share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.types import DEFAULT_SCHEDULER, GenerationItem, GenerationResult, ModelInfo  # noqa: E402
from service.runtime.images import encode_png_base64  # noqa: E402

MAX_BATCH = 8  # the server's default SD_MAX_BATCH_SIZE
FAKE_SIZE = 512


def smooth_image(size: int, seed: int = 0) -> np.ndarray:
    """A stand-in for a diffusion image: smooth gradients plus mild noise (noise alone is a worst case)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(4 * (x + y))], axis=-1)
    pixels = (base + 1) * 110 + rng.normal(0, 4, (size, size, 3))
    return pixels.clip(0, 255).astype(np.uint8)


class FixedDelayEngine:
    """Sleeps ``delay_s`` per batch (whatever its size, as a GPU at small batches nearly does)."""

    def __init__(self, delay_s: float, size: int = FAKE_SIZE) -> None:
        self.delay_s = delay_s
        self.image = smooth_image(size)
        self.info = ModelInfo(
            "fake", "fake", size, size, (DEFAULT_SCHEDULER,), DEFAULT_SCHEDULER, True, "cpu", "fp32", True
        )

    def validate(self, items: Sequence[GenerationItem]) -> None:
        pass

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        time.sleep(self.delay_s)
        return [GenerationResult(self.image, False, item.seed) for item in items]

    def warmup(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_engine(name: str, delay_s: float) -> Any:
    if name == "fake":
        return FixedDelayEngine(delay_s, int(os.environ.get("FAKE_IMAGE_SIZE", FAKE_SIZE)))
    import model

    return model.load("random:tiny")


def direct(engine: Any, batch: int, steps: int, rounds: int) -> tuple[float, float]:
    """(images/s, seconds per batch) calling the engine directly, batches back to back."""
    native = engine.info.native_height
    items = [
        GenerationItem(prompt=f"prompt {i}", seed=i, num_inference_steps=steps, height=native, width=native)
        for i in range(batch)
    ]
    engine.generate(items)  # warm
    started = time.perf_counter()
    for _ in range(rounds):
        engine.generate(items)
    seconds = (time.perf_counter() - started) / rounds
    return batch / seconds, seconds


async def through_server(url: str, clients: int, steps: int, rounds: int) -> tuple[float, float]:
    """(images/s, median latency) of ``clients`` closed-loop clients, ``rounds`` requests each."""
    body = {
        "input_data": {
            "columns": ["prompt"],
            "data": ["a prompt"],
            "parameters": {"num_inference_steps": steps},
        }
    }
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one_client() -> None:
            for _ in range(rounds):
                started = time.perf_counter()
                response = await client.post("/score", json=body)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise RuntimeError(f"server answered {response.status_code}: {response.text[:200]}")

        await asyncio.gather(*(one_client() for _ in range(clients)))  # warm the connections
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return clients * rounds / elapsed, statistics.median(latencies)


def start_server(engine_name: str, delay_s: float, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SD_PORT": str(port), "SD_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, __file__, "--serve", engine_name, "--delay-ms", str(delay_s * 1000)]
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become ready")


def serve(engine_name: str, delay_s: float) -> int:
    from service.hosts.server import serve as run_server
    from service.logs import configure_logging
    from service.settings import Settings
    from service.web.app import create_app

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return run_server(create_app(settings, engine=make_engine(engine_name, delay_s)), settings)


def encoding_ms(repeats: int = 30) -> dict[str, float]:
    results = {}
    for name, image in (
        ("smooth", smooth_image(512)),
        ("noise", np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)),
    ):
        encode_png_base64(image)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            encode_png_base64(image)
            times.append(time.perf_counter() - started)
        results[name] = statistics.median(times) * 1000
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="fake,tiny")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client (after one warm-up each)")
    parser.add_argument("--delay-ms", type=float, default=1000, help="the fake engine's time per batch")
    parser.add_argument("--steps", type=int, default=10, help="steps per image (random:tiny)")
    parser.add_argument("--port", type=int, default=5099)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    delay_s = args.delay_ms / 1000
    if args.serve:
        return serve(args.serve, delay_s)

    print(f"# server benchmark, {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    rows: list[dict[str, Any]] = []
    for engine_name in args.engines.split(","):
        engine = make_engine(engine_name, delay_s)
        process = start_server(engine_name, delay_s, args.port)
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                batch = min(clients, MAX_BATCH)
                direct_rate, batch_s = direct(engine, batch, args.steps, max(args.rounds, 3))
                server_rate, latency = asyncio.run(
                    through_server(f"http://127.0.0.1:{args.port}", clients, args.steps, args.rounds)
                )
                waits = -(-clients // MAX_BATCH)  # batches a request waits for, its own included
                added = latency - waits * batch_s
                rows.append(
                    {
                        "engine": engine_name,
                        "clients": clients,
                        "direct_images_per_s": direct_rate,
                        "server_images_per_s": server_rate,
                        "throughput_ratio": server_rate / direct_rate,
                        "engine_batch_s": batch_s,
                        "server_median_latency_s": latency,
                        "added_latency_ms": added * 1000,
                        "added_latency_pct": 100 * added / (waits * batch_s),
                    }
                )
        finally:
            process.terminate()
            process.wait()
    print(
        "| engine | clients | direct img/s | server img/s | ratio | engine s/batch | server p50 s "
        "| added ms | added % |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['clients']} | {r['direct_images_per_s']:.2f} "
            f"| {r['server_images_per_s']:.2f} "
            f"| {r['throughput_ratio']:.3f} | {r['engine_batch_s']:.3f} | {r['server_median_latency_s']:.3f} "
            f"| {r['added_latency_ms']:.1f} | {r['added_latency_pct']:.1f} |"
        )
    encoding = encoding_ms()
    print(
        f"\nPNG + base64 of a 512x512 image: {encoding['smooth']:.1f} ms (smooth), "
        f"{encoding['noise']:.1f} ms (pure noise, worst case)"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "encoding_ms": encoding}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
