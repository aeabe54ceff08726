"""Process start to ready, with and without a warm compile cache.

    python benchmarks/cold_start.py --model random:tiny                 # CPU
    python benchmarks/cold_start.py --model random:sd-v1-4 --cuda-graphs  # GPU

Starts the real `sd-endpoint serve` three times and times until `GET /` answers 200 (model loaded
and warm-up done): (1) without compilation, (2) compiled with an empty cache folder, (3) compiled
again with the cache that run (2) filled. Prints the seconds and the ratios in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_to_ready(model: str, env_extra: dict[str, str], timeout_s: float) -> float:
    port = free_port()
    env = {**os.environ, "SD_MODEL": model, "SD_PORT": str(port), **env_extra}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli.main", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - started < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"not ready after {timeout_s} s")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="SD_CUDA_GRAPHS=true for the compiled runs"
    )
    parser.add_argument("--max-batch-size", type=int, default=2, help="SD_MAX_BATCH_SIZE (warm-up buckets)")
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    base = {"SD_MAX_BATCH_SIZE": str(args.max_batch_size)}
    with tempfile.TemporaryDirectory() as cache:
        compiled = {**base, "SD_COMPILE": "true", "SD_COMPILE_CACHE_DIR": cache}
        if args.cuda_graphs:
            compiled["SD_CUDA_GRAPHS"] = "true"
        runs = {
            "eager": start_to_ready(args.model, base, args.timeout_s),
            "compiled, cold cache": start_to_ready(args.model, compiled, args.timeout_s),
            "compiled, warm cache": start_to_ready(args.model, compiled, args.timeout_s),
        }
    for name, seconds in runs.items():
        print(f"{name:<22} {seconds:8.1f} s to ready  ({seconds / runs['eager']:.2f}x eager)")
    saved = 1 - runs["compiled, warm cache"] / runs["compiled, cold cache"]
    print(f"warm cache saves {saved:.0%} of the compiled cold start")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"model": args.model, "seconds_to_ready": runs}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
