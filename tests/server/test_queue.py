"""Backpressure (429), deadlines (504), disconnects and out-of-memory, observed through a real
server whose engine the test holds at a gate (each step) while requests pile up; test_steps.py
has the step loop's own behaviour (overtaking, shrinking and regrowing)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.helpers.servers import (
    GatedEngine,
    ThreadServer,
    held,
    metric_value,
    request_body,
    tiny_engine,
    wait_for_metric,
)

MAX_BATCH, MAX_QUEUE = 4, 6


@pytest.fixture(scope="module")
def engine() -> GatedEngine:
    return GatedEngine(tiny_engine())


@pytest.fixture(scope="module")
def server(engine: GatedEngine) -> Iterator[ThreadServer]:
    settings = Settings(max_batch_size=MAX_BATCH, max_queue_items=MAX_QUEUE)
    with ThreadServer(settings, engine) as running:
        yield running


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/score", json=body, timeout=120)


def send(pool: ThreadPoolExecutor, url: str, body: dict[str, Any]) -> Future[httpx.Response]:
    return pool.submit(post, url, body)


@contextmanager
def one_running(
    engine: GatedEngine, pool: ThreadPoolExecutor, url: str, prompt: str
) -> Iterator[Future[httpx.Response]]:
    """The engine held inside the step of one request's image (``prompt``): what is sent meanwhile
    piles up behind it. The request's response comes when the gate reopens."""
    with held(engine):
        running = send(pool, url, request_body([prompt]))
        engine.wait_until_held()
        yield running


def prompts_run(engine: GatedEngine) -> list[set[str]]:
    return [{item.prompt for item in batch} for batch in engine.batches]


def test_a_full_queue_answers_429_and_disturbs_nothing(
    server: ThreadServer, engine: GatedEngine, pool: ThreadPoolExecutor
) -> None:
    with one_running(engine, pool, server.url, "running") as running:
        queued = send(
            pool, server.url, request_body(["queued", "queued"], num_images_per_prompt=MAX_QUEUE // 2)
        )
        wait_for_metric(server.url, "sd_queue_depth", MAX_QUEUE)
        refused = post(server.url, request_body(["one too many"]))
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "too_many_requests"
    assert running.result().status_code == 200
    assert len(queued.result().json()) == MAX_QUEUE
    assert not any("one too many" in prompts for prompts in prompts_run(engine))
    assert metric_value(httpx.get(f"{server.url}/metrics").text, "sd_rejections_total") >= 1


def test_a_client_that_disconnects_frees_its_queued_images(
    server: ThreadServer, engine: GatedEngine, pool: ThreadPoolExecutor
) -> None:
    with one_running(engine, pool, server.url, "still wanted") as running:
        body = json.dumps(request_body(["abandoned"], num_images_per_prompt=3)).encode()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as connection:
            head = f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            connection.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for_metric(server.url, "sd_queue_depth", 3)
        wait_for_metric(server.url, "sd_queue_depth", 0)  # freed while the engine is still held
    assert running.result().status_code == 200
    assert post(server.url, request_body(["after"])).status_code == 200
    assert not any("abandoned" in prompts for prompts in prompts_run(engine))


def test_out_of_memory_retries_smaller_and_fails_only_the_affected_request(
    server: ThreadServer, engine: GatedEngine, pool: ThreadPoolExecutor
) -> None:
    engine.oom_prompts = {"too big"}
    try:
        with one_running(engine, pool, server.url, "occupies the engine") as warm:
            fine = send(pool, server.url, request_body(["fits"]))
            failing = send(pool, server.url, request_body(["too big"]))
            wait_for_metric(server.url, "sd_queue_depth", 2)
        assert warm.result().status_code == 200
        assert fine.result().status_code == 200  # its batch ran out of memory; alone it fits
        response = failing.result()
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "out_of_memory"
        assert int(response.headers["retry-after"]) >= 1
    finally:
        engine.oom_prompts = set()
    assert post(server.url, request_body(["after"])).status_code == 200


def test_an_unexpected_engine_error_is_a_plain_500_and_the_server_carries_on(
    server: ThreadServer, engine: GatedEngine
) -> None:
    engine.crash_prompts = {"crash"}
    try:
        response = post(server.url, request_body(["crash"]))
    finally:
        engine.crash_prompts = set()
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error" and "x-request-id" in error["message"]
    assert "DEADBEEF" not in response.text and "Traceback" not in response.text
    assert post(server.url, request_body(["after"])).status_code == 200


def test_the_deadline_answers_504_and_drops_queued_images(
    engine: GatedEngine, pool: ThreadPoolExecutor
) -> None:
    with ThreadServer(Settings(request_timeout_s=2), engine) as server:
        with one_running(engine, pool, server.url, "held in the engine") as running:
            queued = post(server.url, request_body(["waits in the queue"], num_images_per_prompt=2))
            assert queued.status_code == 504
            assert queued.json()["error"]["code"] == "timeout"
            assert running.result().status_code == 504
            wait_for_metric(server.url, "sd_queue_depth", 0)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric_value(metrics, "sd_timeouts_total") == 2
        assert metric_value(metrics, "sd_requests_total", 'route="/score",status="504"') == 2
        assert post(server.url, request_body(["after"])).status_code == 200
    assert not any("waits in the queue" in prompts for prompts in prompts_run(engine))
