"""Shutdown of a real `sd-endpoint serve` process (its code path around a gated random:tiny): a
drain that runs out of time answers 503 and exits without waiting for the engine; a second
signal exits at once."""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.helpers.servers import gated_server, request_body, wait_held


def hold_one_request(
    url: str, folder: Path, pool: ThreadPoolExecutor, process: subprocess.Popen[bytes]
) -> Future[httpx.Response]:
    future = pool.submit(httpx.post, f"{url}/score", json=request_body(["held"]), timeout=120)
    wait_held(folder, process, future)
    return future


def test_a_drain_that_runs_out_answers_503_and_exits_without_waiting_for_the_engine(tmp_path: Path) -> None:
    with gated_server(tmp_path, SD_DRAIN_TIMEOUT_S="1") as (url, process), ThreadPoolExecutor(2) as pool:
        held = hold_one_request(url, tmp_path, pool, process)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        answer = held.result(timeout=60)
        # The engine never finishes (the gate stays shut), yet the request is answered and the
        # process exits 0 soon after the 1 s drain, not when (if ever) the batch would end.
        assert process.wait(timeout=30) == 0, (tmp_path / "server.log").read_text()
        elapsed = time.monotonic() - signalled
    log = (tmp_path / "server.log").read_text()
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "shutting_down" and "retry-after" in answer.headers
    assert "Traceback" not in log, log
    assert elapsed < 20, f"exit took {elapsed:.1f} s"


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    with gated_server(tmp_path, SD_DRAIN_TIMEOUT_S="300") as (url, process), ThreadPoolExecutor(2) as pool:
        hold_one_request(url, tmp_path, pool, process)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)  # draining now: it would wait 300 s for the held request
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 1
    assert "exiting now" in (tmp_path / "server.log").read_text()
