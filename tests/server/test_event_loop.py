"""The event loop of a real `sd-endpoint serve` process: bodies of millions of tiny JSON values hold
it on no route (the budget scan and the off-loop parse come first everywhere), and a client that
leaves a stream leaves no task behind (asyncio's "Task was destroyed but it is pending!")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers.processes import Server, serving

pytestmark = pytest.mark.slow
MAX_BODY_BYTES = 8 << 20
# 4 MB of tiny values: json.loads of it holds the interpreter for a few hundred milliseconds (the
# whole of it, however early the budget would have stopped); the scan stops after a few hundred.
TINY_VALUES = b'{"prompt": "x", "inputs": "x", "user": [' + b"0," * 2_000_000 + b"0]}"
# Seen while the loop was free: a few tens of milliseconds on a busy two-core runner; a body
# parsed on the loop made it 0.3 to 0.7 s.
LIVE_WITHIN_S = 0.25


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("loop") / "server.log"
    with serving(log_path, SD_MAX_BODY_BYTES=str(MAX_BODY_BYTES)) as running:
        yield running


def flood(url: str, requests: int = 6) -> int:
    with httpx.Client(timeout=60) as client:
        statuses = {
            client.post(url, content=TINY_VALUES, headers={"content-type": "application/json"}).status_code
            for _ in range(requests)
        }
    return statuses.pop() if len(statuses) == 1 else -1


@pytest.mark.parametrize(
    "path", ["/v1/images/generations", "/sdapi/v1/options", "/sdapi/v1/txt2img", "/score", "/"]
)
def test_bodies_of_millions_of_values_never_hold_the_event_loop(server: Server, path: str) -> None:
    slowest = 0.0
    with ThreadPoolExecutor(3) as pool, httpx.Client(timeout=30) as client:
        floods = [pool.submit(flood, f"{server.url}{path}") for _ in range(3)]
        while not all(future.done() for future in floods):
            started = time.perf_counter()
            assert client.get(f"{server.url}/health/live").status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.005)
    assert {future.result() for future in floods} <= {400, 422}  # refused by the budget, per route's shape
    assert slowest < LIVE_WITHIN_S, f"/health/live took {slowest:.3f} s while {path} read large bodies"


def test_a_client_that_leaves_a_stream_leaves_no_task_pending(server: Server) -> None:
    body = {
        "prompt": "leave",
        "stream": True,
        "partial_images": 3,
        "num_inference_steps": 40,
        "size": "128x128",
    }
    for _ in range(12):
        with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=60) as answer:
            assert answer.status_code == 200
            for line in answer.iter_lines():
                if line.startswith("event: image_generation.partial_image"):
                    break  # and leave
    # Enough other requests for the collector to run (a left task is found with its cycle).
    for _ in range(2):
        assert httpx.post(
            f"{server.url}/v1/images/generations", json={"prompt": "after"}, timeout=60
        ).is_success
    with httpx.Client() as client:
        for _ in range(300):
            client.get(f"{server.url}/metrics")
    log = Path(server.log_path).read_text()
    assert "Task was destroyed but it is pending" not in log, log[-3000:]
