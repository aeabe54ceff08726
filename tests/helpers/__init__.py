"""What several test tiers share: real servers in threads and processes, blob servers, ports, and
``until`` (a wait on what a server or process will do, polled rather than slept through).

``stop_process`` is here, importing nothing heavy, because the benchmarks (benchmarks/common.py)
stop their servers the same way on machines without the test dependencies."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def stop_process(process: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s`` (and reap it): a child that ignores or hangs on its
    shutdown must not outlive the test or benchmark that started it."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def until(condition: Callable[[], T], limit_s: float, what: str) -> T:
    """``condition()``'s first truthy value, polled every 50 ms; after ``limit_s`` seconds without one
    the test fails with "``what`` within ``limit_s`` s"."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what} within {limit_s} s")
