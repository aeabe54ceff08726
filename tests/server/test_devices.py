"""Two engines (SD_DEVICES=cpu,cpu) behind one queue in a real `sd-endpoint serve` process on
random:tiny: /info lists both, concurrent requests are served by both (the metrics' engine label),
every image is the one-engine server's image for the same seed, and SIGTERM drains both; a folder
saved by diffusers itself starts on two devices every time."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers.processes import Server, serving, start_server, stop_server
from tests.helpers.servers import decode_png, metric_value
from tests.helpers.weights import save_with_diffusers

REQUESTS = 6
FOLDER_STARTS = 3


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("two") / "server.log", SD_DEVICES="cpu,cpu") as running:
        yield running


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("one") / "server.log", SD_DEVICES="cpu") as running:
        yield running


def body(seed: int, steps: int) -> dict[str, Any]:
    parameters = {"num_inference_steps": steps, "seed": seed}
    return {"input_data": {"columns": ["prompt"], "data": [f"prompt {seed}"], "parameters": parameters}}


def scores(url: str, seeds: list[int], steps: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(seeds)) as pool:
        futures = [pool.submit(httpx.post, f"{url}/score", json=body(s, steps), timeout=300) for s in seeds]
        return [future.result() for future in futures]


def generated(url: str, engine: str) -> float:
    return metric_value(httpx.get(f"{url}/metrics").text, "sd_images_generated_total", f'engine="{engine}"')


def test_info_lists_both_engines(two: Server) -> None:
    engines = httpx.get(f"{two.url}/info").json()["engines"]
    listed = [(e["engine"], e["device"], e["serving"], e["running"]) for e in engines]
    assert listed == [("0", "cpu", True, 0), ("1", "cpu", True, 0)]


def test_concurrent_requests_are_served_by_both_engines_and_draw_the_one_engine_images(
    two: Server, one: Server
) -> None:
    seeds = list(range(100, 100 + REQUESTS))
    before = [generated(two.url, "0"), generated(two.url, "1")]
    answers = scores(two.url, seeds, 12)
    assert [a.status_code for a in answers] == [200] * REQUESTS
    served = [generated(two.url, "0") - before[0], generated(two.url, "1") - before[1]]
    assert served[0] >= 1 and served[1] >= 1 and sum(served) == REQUESTS
    alone = scores(one.url, seeds, 12)
    assert [a.status_code for a in alone] == [200] * REQUESTS
    for ours, reference in zip(answers, alone, strict=True):
        a = decode_png(ours.json()[0]["generated_image"]).astype(np.int16)
        b = decode_png(reference.json()[0]["generated_image"]).astype(np.int16)
        assert np.abs(a - b).max() <= 1  # the same image, up to one rounding step


def wait_running(url: str, engine: str, count: int, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while metric_value(httpx.get(f"{url}/metrics").text, "sd_running_images", f'engine="{engine}"') != count:
        assert time.monotonic() < deadline, f"engine {engine} never had {count} running images"
        time.sleep(0.01)


def test_sigterm_lets_the_images_on_both_engines_finish_then_exits_0(tmp_path: Path) -> None:
    running = start_server(tmp_path / "server.log", SD_DEVICES="cpu,cpu")
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{running.url}/score", json=body(1, 40), timeout=300)
            wait_running(running.url, "0", 1)
            second = pool.submit(httpx.post, f"{running.url}/score", json=body(2, 40), timeout=300)
            wait_running(running.url, "1", 1)  # one image on each engine
            running.process.send_signal(signal.SIGTERM)
            answers = [first.result(), second.result()]
        assert [a.status_code for a in answers] == [200, 200]
        assert running.process.wait(timeout=60) == 0
    finally:
        stop_server(running)


def test_a_diffusers_folder_starts_on_two_devices_every_time(tmp_path: Path) -> None:
    """Both engines read the folder at once; they raced in diffusers' loader (3 starts in 5 failed)."""
    folder = save_with_diffusers(tmp_path / "sd", seed=2)
    images = []
    for start in range(FOLDER_STARTS):
        running = start_server(tmp_path / f"server{start}.log", SD_DEVICES="cpu,cpu", SD_MODEL=str(folder))
        try:
            engines = httpx.get(f"{running.url}/info").json()["engines"]
            assert [(e["device"], e["serving"]) for e in engines] == [("cpu", True), ("cpu", True)]
            answers = scores(running.url, [5, 5], 2)
            assert [a.status_code for a in answers] == [200, 200]
            images += [decode_png(a.json()[0]["generated_image"]) for a in answers]
        finally:
            stop_server(running)
    assert all(np.array_equal(image, images[0]) for image in images)
