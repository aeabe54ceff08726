"""What several test tiers share: real servers in threads and processes, blob servers, ports.

``stop_process`` is here, importing nothing heavy, because the benchmarks (benchmarks/common.py)
stop their servers the same way on machines without the test dependencies."""

from __future__ import annotations

import subprocess
from typing import Any


def stop_process(process: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s`` (and reap it): a child that ignores or hangs on its
    shutdown must not outlive the test or benchmark that started it."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
