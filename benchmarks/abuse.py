"""Floods without a key against a real `sd-endpoint serve` process: the server's memory and the
latency of GET /health/live while each flood runs.

    python benchmarks/abuse.py                      # this checkout
    python benchmarks/abuse.py --repo ../other      # another checkout (its code, this script)

Floods (each against a fresh server on random:tiny, SD_MAX_CONNECTIONS=8):
- headers: 4 connections, each one request of 4,000,000 tiny headers (``a:b``, 20 MB);
- readers: 12 connections pipelining ``GET /ui`` 400 times and never reading;
- bodies: 8 concurrent 0.98 MB /score bodies of 90,000 unknown keys;
- paths: 200 requests for ``/`` + a 60 KB path (log bytes written).
It prints one line per flood: RSS before and at peak (MB), /health/live p50 and max (ms) and how many
health checks failed (a 503 or no answer), and the log's growth.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

ROOT = common.ROOT


@contextlib.contextmanager
def server(repo: Path, log: Path) -> Iterator[tuple[str, int]]:
    """`sd-endpoint serve` of ``repo`` on random:tiny with at most 8 connections, its log in ``log``."""
    env = {"SD_MODEL": "random:tiny", "SD_MAX_CONNECTIONS": "8", "SD_LOG_LEVEL": "INFO"}
    with common.serving(env, cwd=repo, log=log) as (url, process):
        yield url, process.pid


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(url: str, pid: int, flood: Callable[[], None], seconds: float) -> dict[str, float]:
    """Run ``flood`` in threads while sampling RSS and timing /health/live for ``seconds``."""
    before = rss_mb(pid)
    peak = before
    latencies: list[float] = []
    failed = 0
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, rss_mb(pid))
        started = time.perf_counter()
        try:
            ok = httpx.get(f"{url}/health/live", timeout=30).status_code == 200
        except httpx.TransportError:
            ok = False
        latencies.append((time.perf_counter() - started) * 1000)
        failed += not ok
        time.sleep(0.05)
    return {
        "rss_before_mb": before,
        "rss_peak_mb": peak,
        "health_p50_ms": statistics.median(latencies),
        "health_max_ms": max(latencies),
        "health_failed": failed,
        "health_checks": len(latencies),
    }


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)


def headers_flood(url: str) -> None:
    line = b"a:b\r\n" * 4_000_000

    def one() -> None:
        with contextlib.suppress(OSError), connect(url) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line + b"\r\n")
            sock.recv(100)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def readers_flood(url: str, hold: list[socket.socket]) -> None:
    request = b"GET /ui HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 400
    for _ in range(12):
        with contextlib.suppress(OSError):
            sock = connect(url)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.send(request)
            hold.append(sock)


def bodies_flood(url: str) -> None:
    keys = {f"k{i:05d}": 1 for i in range(90_000)}
    body = json.dumps({"input_data": {"columns": ["prompt"], "data": ["a"]}, **keys}).encode()[:1_000_000]
    body = body[: body.rfind(b",")] + b"}"

    def one() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/score", content=body, headers={"content-type": "application/json"}, timeout=60)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def paths_flood(url: str) -> None:
    with httpx.Client(timeout=30) as client:
        for _ in range(200):
            with contextlib.suppress(httpx.HTTPError):
                client.get(f"{url}/{'p' * 60_000}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    log = Path("/tmp") / f"abuse-{args.repo.resolve().name}.log"
    held: list[socket.socket] = []
    floods: dict[str, Callable[[str], None]] = {
        "headers": headers_flood,
        "readers": lambda url: readers_flood(url, held),
        "bodies": bodies_flood,
        "paths": paths_flood,
    }
    for name, flood in floods.items():
        with server(args.repo, log) as (url, pid):
            log_before = log.stat().st_size
            result = measure(url, pid, functools.partial(flood, url), args.seconds)
            result["log_growth_kb"] = (log.stat().st_size - log_before) / 1024
            for sock in held:
                sock.close()
            held.clear()
        print(f"{name:8s} " + " ".join(f"{key}={value:.0f}" for key, value in result.items()), flush=True)
        results[name] = result
    if args.json:
        report = {"repo": str(args.repo.resolve()), "seconds": args.seconds, "floods": results}
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
