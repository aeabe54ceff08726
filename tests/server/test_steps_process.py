"""The step loop in a real `sd-endpoint serve` process on random:tiny, with the real per-step
engine: a short request overtakes a long one and both images are stock diffusers', a client that
leaves stops using the engine at once, and SIGTERM lets images mid-flight finish."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import model
from model.schedulers import make_scheduler
from tests.helpers.processes import Server, serving, start_server, stop_server
from tests.helpers.servers import decode_png, metric_value

SIZE = 128  # random:tiny's native size


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("steps") / "server.log", SD_MAX_BATCH_SIZE="4") as running:
        yield running


def body(prompt: str, seed: int, steps: int, **parameters: Any) -> dict[str, Any]:
    return {
        "input_data": {
            "columns": ["prompt"],
            "data": [prompt],
            "parameters": {"num_inference_steps": steps, "seed": seed, **parameters},
        }
    }


def post(pool: ThreadPoolExecutor, url: str, request: dict[str, Any]) -> Future[tuple[httpx.Response, float]]:
    def timed() -> tuple[httpx.Response, float]:
        response = httpx.post(f"{url}/score", json=request, timeout=300)
        return response, time.monotonic()

    return pool.submit(timed)


def wait_running(url: str, count: int, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while metric_value(httpx.get(f"{url}/metrics").text, "sd_running_images") != count:
        assert time.monotonic() < deadline, f"sd_running_images never reached {count}"
        time.sleep(0.01)


def stock_image(prompt: str, seed: int, steps: int, scheduler: str) -> np.ndarray:
    """What diffusers' own pipeline draws for this request, from the same random:tiny weights."""
    c = model.load("random:tiny", device="cpu").components
    pipe = StableDiffusionPipeline(**c.modules(), requires_safety_checker=False)
    pipe.scheduler = make_scheduler(c.scheduler, scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt, num_inference_steps=steps, guidance_scale=7.5, height=SIZE, width=SIZE,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    )  # fmt: skip
    image: np.ndarray = out.images[0]
    return image


def test_a_short_request_sent_while_a_long_one_runs_returns_first_and_both_are_stock_images(
    server: Server,
) -> None:
    with ThreadPoolExecutor(2) as pool:
        long = post(pool, server.url, body("a long request", 5, 40))
        wait_running(server.url, 1)  # the long one is running
        short = post(pool, server.url, body("a short request", 6, 8, scheduler="ddim"))
        (short_answer, short_done), (long_answer, long_done) = short.result(), long.result()
    assert short_answer.status_code == long_answer.status_code == 200
    assert short_done < long_done  # it joined the running batch and left first
    for answer, prompt, seed, steps, scheduler in (
        (short_answer, "a short request", 6, 8, "ddim"),
        (long_answer, "a long request", 5, 40, "default"),
    ):
        ours = decode_png(answer.json()[0]["generated_image"]).astype(np.float64) / 255
        assert np.abs(ours - stock_image(prompt, seed, steps, scheduler)).max() <= 1 / 255 + 1e-3


def test_a_client_that_leaves_stops_using_the_engine_at_once(server: Server) -> None:
    with ThreadPoolExecutor(1) as pool:
        abandoned = pool.submit(
            httpx.post, f"{server.url}/score", json=body("abandoned", 1, 150), timeout=1.5
        )
        wait_running(server.url, 1)
        with pytest.raises(httpx.TimeoutException):
            abandoned.result()  # the client gives up and closes its connection
    left = time.monotonic()
    wait_running(server.url, 0, limit_s=5)  # at the next step, not after its 150 steps
    assert time.monotonic() - left < 5
    started = time.monotonic()
    alone = httpx.post(f"{server.url}/score", json=body("after", 2, 8), timeout=60)
    assert alone.status_code == 200
    assert time.monotonic() - started < 10


def test_sigterm_lets_the_images_in_flight_finish_then_exits_0(tmp_path: Path) -> None:
    running = start_server(tmp_path / "server.log", SD_MAX_BATCH_SIZE="4")
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [post(pool, running.url, body(f"in flight {n}", n, 30)) for n in range(2)]
            wait_running(running.url, 2)
            running.process.send_signal(signal.SIGTERM)
            answers = [f.result()[0] for f in futures]
        assert [a.status_code for a in answers] == [200, 200]
        assert running.process.wait(timeout=60) == 0
    finally:
        stop_server(running)
