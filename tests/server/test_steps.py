"""The step loop behind a real HTTP server (in process, the engine held at a gate per step):
short requests overtake long ones, leaving clients free their rows at the next step, out of memory
shrinks the running set, and the queue and deadline keep their contract."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from model.errors import EngineOutOfMemoryError
from service.settings import Settings
from tests.helpers.servers import GatedEngine, ThreadServer, held, metric_value, request_body, wait_for_metric

MAX_BATCH, MAX_QUEUE = 4, 6


class RowLimitedEngine(GatedEngine):
    """Runs out of memory in any step with more than ``max_running`` images."""

    max_running: int | None = None

    def step(self) -> list[int]:
        running = sum(1 for entry in self._admitted.values() if entry[2] is None)
        if self.max_running is not None and running > self.max_running:
            self.waiting.release()
            raise EngineOutOfMemoryError(f"{running} images do not fit")
        return super().step()


@pytest.fixture(scope="module")
def engine(tiny_engine: Any) -> RowLimitedEngine:
    return RowLimitedEngine(tiny_engine)


@pytest.fixture(scope="module")
def server(engine: RowLimitedEngine) -> Iterator[ThreadServer]:
    settings = Settings(max_batch_size=MAX_BATCH, max_queue_items=MAX_QUEUE)
    with ThreadServer(settings, engine) as running:
        yield running


def send(pool: ThreadPoolExecutor, url: str, body: dict[str, Any]) -> Future[httpx.Response]:
    return pool.submit(httpx.post, f"{url}/score", json=body, timeout=120)


def wait_for_all_in(url: str, images: int) -> None:
    """Until ``images`` are in the server, running or waiting (however their arrivals interleaved)."""
    deadline = time.monotonic() + 30
    while True:
        text = metrics(url)
        if metric_value(text, "sd_queue_depth") + metric_value(text, "sd_running_images") == images:
            return
        assert time.monotonic() < deadline, f"{images} images never arrived"
        time.sleep(0.02)


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def test_a_short_request_sent_while_a_long_one_runs_returns_first(
    server: ThreadServer, engine: RowLimitedEngine, pool: ThreadPoolExecutor
) -> None:
    with held(engine):
        long = send(pool, server.url, request_body(["forty steps"], num_inference_steps=40))
        engine.wait_until_held()  # the long one is in its first step
        short = send(pool, server.url, request_body(["eight steps"], num_inference_steps=8, scheduler="ddim"))
        wait_for_metric(server.url, "sd_queue_depth", 1)
    assert short.result().status_code == 200
    assert not long.done()  # the short one was answered while the long one still ran
    assert long.result().status_code == 200
    assert metric_value(metrics(server.url), "sd_batch_size_bucket", 'le="2.0"') >= 8  # they shared steps


def test_a_client_that_leaves_frees_its_rows_at_the_next_step(
    server: ThreadServer, engine: RowLimitedEngine
) -> None:
    body = json.dumps(request_body(["abandoned"], num_inference_steps=150)).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with held(engine), socket.create_connection((host, int(port))) as connection:
        head = f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        connection.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        engine.wait_until_held()
        wait_for_metric(server.url, "sd_running_images", 1)
    wait_for_metric(server.url, "sd_running_images", 0)  # gone long before its 150 steps
    assert not any(entry[0].prompt == "abandoned" for entry in engine._admitted.values())
    assert httpx.post(f"{server.url}/score", json=request_body(["after"]), timeout=60).status_code == 200


def test_out_of_memory_shrinks_the_running_set_then_it_grows_again(
    server: ThreadServer, engine: RowLimitedEngine, pool: ThreadPoolExecutor
) -> None:
    engine.max_running = 2
    try:
        with held(engine):
            futures = [send(pool, server.url, request_body([f"image {n}"], seed=n)) for n in range(4)]
            engine.wait_until_held()
            wait_for_all_in(server.url, 4)  # all join at the next step: 4 > 2 rows
        assert [f.result().status_code for f in futures] == [200] * 4
        assert [f.result().json()[0]["seed"] for f in futures] == [0, 1, 2, 3]
    finally:
        engine.max_running = None
    # Room again: four requests together share steps once more.
    with held(engine):
        futures = [
            send(pool, server.url, request_body([f"again {n}"], num_inference_steps=3)) for n in range(4)
        ]
        engine.wait_until_held()
        wait_for_all_in(server.url, 4)  # the first step holds; the rest join at the next
    assert all(f.result().status_code == 200 for f in futures)
    assert metric_value(metrics(server.url), "sd_running_images") == 0
    assert metric_value(metrics(server.url), "sd_batch_size_bucket", 'le="3.0"') < metric_value(
        metrics(server.url), "sd_batch_size_count"
    )  # some step ran four images


def test_an_image_that_does_not_fit_alone_gets_503_and_its_neighbours_finish(
    server: ThreadServer, engine: RowLimitedEngine, pool: ThreadPoolExecutor
) -> None:
    engine.oom_prompts = {"too big"}
    try:
        fine = send(pool, server.url, request_body(["fits"]))
        failing = send(pool, server.url, request_body(["too big"]))
        assert fine.result().status_code == 200
        response = failing.result()
    finally:
        engine.oom_prompts = set()
    assert response.status_code == 503 and response.json()["error"]["code"] == "out_of_memory"
    assert int(response.headers["retry-after"]) >= 1


def test_a_full_queue_answers_429_and_the_deadline_504(
    engine: RowLimitedEngine, pool: ThreadPoolExecutor
) -> None:
    settings = Settings(max_batch_size=1, max_queue_items=2, request_timeout_s=3)
    with ThreadServer(settings, engine) as server:
        with held(engine):
            running = send(pool, server.url, request_body(["running"]))
            engine.wait_until_held()
            queued = send(pool, server.url, request_body(["queued", "queued"]))
            wait_for_metric(server.url, "sd_queue_depth", 2)
            refused = httpx.post(f"{server.url}/score", json=request_body(["one too many"]))
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert queued.result().status_code == 504 and running.result().status_code == 504
            wait_for_metric(server.url, "sd_queue_depth", 0)
        wait_for_metric(server.url, "sd_running_images", 0)
        assert httpx.post(f"{server.url}/score", json=request_body(["after"]), timeout=60).status_code == 200
