"""POST /requests/{id}/cancel under request-level batching (SD_BATCHING=request), where no step
loop follows the images: the request still answers 499 cancelled at once, its batch held."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.settings import Settings
from tests.helpers.servers import GatedEngine, ThreadServer, held, request_body, tiny_engine


@pytest.fixture(scope="module")
def engine() -> GatedEngine:
    return GatedEngine(tiny_engine())


@pytest.fixture(scope="module")
def server(engine: GatedEngine) -> Iterator[ThreadServer]:
    settings = Settings(model="random:tiny", batching="request", max_batch_wait_ms=0)
    with ThreadServer(settings, engine) as running:
        yield running


def test_a_held_batch_is_cancelled_by_its_request_id(
    server: ThreadServer, engine: GatedEngine, pool: ThreadPoolExecutor
) -> None:
    with held(engine):
        headers = {"x-request-id": "batch-cancel-1"}
        answer = pool.submit(
            httpx.post, f"{server.url}/score", json=request_body(["a cat"]), headers=headers, timeout=60
        )
        engine.wait_until_held()
        assert httpx.post(f"{server.url}/requests/batch-cancel-2/cancel").status_code == 404
        cancelled = httpx.post(f"{server.url}/requests/batch-cancel-1/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["cancelled"] == 1
        result = answer.result(timeout=30)
    assert result.status_code == 499 and result.json()["error"]["code"] == "cancelled"
