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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def start_to_ready(model: str, env: dict[str, str], timeout_s: float) -> float:
    """Seconds from starting `sd-endpoint serve` to its first 200 on GET /."""
    started = time.perf_counter()
    with common.serving({"SD_MODEL": model, **env}, timeout_s=timeout_s):
        return time.perf_counter() - started


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
