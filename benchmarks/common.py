"""What every benchmark shares: one timer, the device's clock and memory, a report's header and
files, markdown tables, and a real `sd-endpoint serve` process to measure through.

Scripts run as ``python benchmarks/NAME.py``, so this module is importable by name (``import
common``) and puts the project's root on the path for them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from tests.helpers import stop_process  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
PEAK_TFLOPS = 790.0  # the H200's measured dense bf16/fp16 matmul rate
MAX_MEAN_ABS_DIFF = 0.01  # images of this engine and of stock diffusers, same seeds, in [0,1] units

# --------------------------------------------------------------------------------------- the timer


def _cuda(device: Any) -> bool:
    return str(device).startswith("cuda")


def sync(device: Any) -> None:
    """Wait for the device's queued work: a GPU clock reads nothing until its kernels have run."""
    if _cuda(device):
        import torch

        torch.cuda.synchronize()


@dataclass
class Timing:
    """Timed runs of one call: seconds of each, the peak GPU memory over them, the last output."""

    runs: list[float]
    peak_gib: float | None
    output: Any

    @property
    def seconds(self) -> float:
        return float(statistics.median(self.runs))

    def figures(self, images: int) -> dict[str, Any]:
        """What the benchmarks report of these runs, each of ``images`` images, in one spelling."""
        seconds = self.seconds
        return {
            "seconds_per_image": seconds / images,
            "images_per_s": images / seconds,
            "timed_runs": len(self.runs),
            "run_seconds": [round(r, 4) for r in self.runs],
            "peak_gib": self.peak_gib,
        }

    def add(self, other: Timing) -> None:
        """Another run's time and output; the peak is the larger."""
        self.runs += other.runs
        self.output = other.output
        if other.peak_gib is not None:
            self.peak_gib = max(other.peak_gib, self.peak_gib or 0.0)


def time_once(fn: Callable[[], Any], device: Any = "cpu") -> Timing:
    """One run of ``fn``, from an idle device to an idle device, and the GPU memory it peaked at."""
    if _cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    output = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = None
    if _cuda(device):
        import torch

        peak = float(torch.cuda.max_memory_allocated() / 2**30)
    return Timing([seconds], peak, output)


def timed(fn: Callable[[], Any], device: Any = "cpu", repeats: int = 3, warmup: int = 1) -> Timing:
    """``repeats`` timed runs after ``warmup`` untimed ones; ``.seconds`` is their median."""
    for _ in range(warmup):
        fn()
    result = Timing([], None, None)
    for _ in range(repeats):
        result.add(time_once(fn, device))
    return result


def step_times(
    engine: Any, handles: Sequence[int], steps: int, after: Callable[[], Any] | None = None
) -> list[float]:
    """Seconds of each of ``steps`` engine steps over admitted ``handles`` (``after`` each step
    counted in it), then the handles cancelled: admission and decoding are left out."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        if after is not None:
            after()
        sync(getattr(engine, "device", "cpu"))
        times.append(time.perf_counter() - start)
    for handle in handles:
        engine.cancel(handle)
    return times


# ---------------------------------------------------------------------------------------- images


def to_uint8(images: np.ndarray) -> np.ndarray:
    """B x H x W x 3 in [0,1] (diffusers' np output) -> uint8, rounded as its PIL conversion is."""
    if images.dtype == np.uint8:
        return images
    return np.asarray((images * 255).round().clip(0, 255), dtype=np.uint8)


def mean_abs_diff(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute difference of two image batches as 8-bit images, in [0,1] units."""
    a, b = to_uint8(images).astype(np.int16), to_uint8(reference).astype(np.int16)
    return float(np.abs(a - b).mean() / 255)


def smooth_image(size: int) -> np.ndarray:
    """A stand-in for a diffusion image (smooth gradients, mild noise): PNG costs what it costs."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(4 * (x + y))], axis=-1)
    return ((base + 1) * 110 + rng.normal(0, 4, (size, size, 3))).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------- reports


def header(script: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Date, command, machine and versions: what every report names."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "versions": versions,
    }


def table(head: Sequence[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]


def columns(spec: Sequence[tuple[str, str, str]], rows: Iterable[dict[str, Any]]) -> list[str]:
    """A markdown table of ``rows`` by ``spec``: (header, key, format) for each column."""
    return table(
        [head for head, _, _ in spec], ([fmt(r.get(key), how) for _, key, how in spec] for r in rows)
    )


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted, or "-" for None and NaN."""
    return "-" if value is None or value != value else format(value, spec)


def write(stem: Path, report: dict[str, Any], lines: Sequence[str] | None = None) -> None:
    """``stem``.json (the report) and, given its lines, ``stem``.md."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if lines is not None:
        stem.with_name(stem.name + ".md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(
    env: dict[str, str],
    command: Sequence[str] = (sys.executable, "-m", "service.cli.main", "serve"),
    cwd: Path = ROOT,
    ready: str = "/",
    log: Path | None = None,
    timeout_s: float = 300,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A server process (``command`` in ``cwd``, whose code it runs) on a free port with ``env``
    (SD_* of the caller's environment dropped), its URL yielded once ``ready`` answers 200;
    terminated afterwards."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SD_")}
    environment |= {"SD_PORT": str(port), "SD_LOG_LEVEL": "WARNING", "PYTHONPATH": str(cwd)} | env
    with open(log or os.devnull, "wb") as out:
        process = subprocess.Popen(list(command), env=environment, cwd=cwd, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        started = time.monotonic()
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + ready, timeout=5).status_code == 200:
                    break
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the server was not ready after {timeout_s:.0f} s")
            time.sleep(0.2)
        yield url, process
    finally:
        stop_process(process, grace_s=60)
