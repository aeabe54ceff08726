"""OpenAI's streamed image generation (stream: true, partial_images), read by the official `openai`
SDK's ``images.generate(stream=True)`` from a real `sd-endpoint serve` process on random:tiny."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.helpers.processes import Server, serving
from tests.helpers.servers import metric_value

pytestmark = pytest.mark.slow
KEY = "stream-key"
WAIT_S = 60
# 150 steps of a 256x256 image take tens of seconds on the CPU: long enough to stop one.
LONG: dict[str, Any] = {"num_inference_steps": 150, "seed": 4, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("stream") / "server.log", SD_API_KEYS=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def pixels(b64_json: str) -> np.ndarray:
    raw = base64.b64decode(b64_json, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def running_images(server: Server) -> float:
    return metric_value(httpx.get(f"{server.url}/metrics").text, "sd_running_images")


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened")
        time.sleep(0.05)


def test_partial_images_then_the_completed_one_equal_to_the_unstreamed_image(client: openai.OpenAI) -> None:
    extra = {"seed": 21, "num_inference_steps": 6}
    events = list(
        client.images.generate(
            prompt="a red fox", size="192x128", stream=True, partial_images=2, extra_body=extra
        )
    )
    assert [event.type for event in events] == [
        "image_generation.partial_image", "image_generation.partial_image", "image_generation.completed",
    ]  # fmt: skip
    assert [event.partial_image_index for event in events[:2]] == [0, 1]  # type: ignore[union-attr]
    for event in events:
        assert pixels(event.b64_json).shape == (128, 192, 3) and event.size == "192x128"
    plain = client.images.generate(prompt="a red fox", size="192x128", extra_body=extra)
    assert plain.data is not None and plain.data[0].b64_json is not None
    assert np.array_equal(pixels(events[-1].b64_json), pixels(plain.data[0].b64_json))
    assert not np.array_equal(pixels(events[0].b64_json), pixels(events[-1].b64_json))


def test_without_partial_images_each_image_completes_in_order(client: openai.OpenAI) -> None:
    stream = client.images.generate(
        prompt="a cat", n=2, stream=True, extra_body={"seed": 8, "num_inference_steps": 2}
    )
    events = list(stream)
    assert [event.type for event in events] == ["image_generation.completed"] * 2
    assert [event.model_extra["seed"] for event in events] == [8, 9]  # type: ignore[index]


@pytest.mark.parametrize(
    ("changes", "param"),
    [({"partial_images": 4}, "partial_images"), ({"partial_images": -1}, "partial_images"),
     ({"partial_images": "2"}, "partial_images"), ({"stream": "yes"}, "stream"),
     ({"size": "100x100"}, "size")],
)  # fmt: skip
def test_bad_requests_are_refused_before_the_stream(
    server: Server, changes: dict[str, Any], param: str
) -> None:
    body = {"prompt": "a cat", "stream": True, **changes}
    answer = httpx.post(
        f"{server.url}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    refused = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a cat", "stream": True})
    assert refused.status_code == 401


def test_an_error_after_the_stream_started_is_an_error_event_the_sdk_raises(
    server: Server, client: openai.OpenAI
) -> None:
    def read() -> list[Any]:
        return list(client.images.generate(
            prompt="a long one", size="256x256", stream=True, partial_images=1, extra_body=LONG,
            extra_headers={"x-request-id": "stream-1"},
        ))  # fmt: skip

    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read)
        wait_until(lambda: running_images(server) == 1, "the image running")
        cancel = httpx.post(
            f"{server.url}/requests/stream-1/cancel", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert cancel.status_code == 200
        with pytest.raises(openai.APIError, match="cancelled"):
            reading.result(timeout=WAIT_S)
    wait_until(lambda: running_images(server) == 0, "the engine freed")


def test_closing_the_stream_frees_the_engine_at_the_next_step(server: Server) -> None:
    body = {"prompt": "a long one", "size": "256x256", "stream": True, **LONG}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/images/generations", json=body, headers=headers, timeout=WAIT_S
    ) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        wait_until(lambda: running_images(server) == 1, "the image running")
        started = time.monotonic()
    wait_until(lambda: running_images(server) == 0, "the engine freed")
    assert time.monotonic() - started < 10  # its 150 steps would take far longer


def test_a_client_that_leaves_at_once_leaves_no_request_behind(tmp_path: Any) -> None:
    """Whether the client leaves before the first event or after, the server lets go of the request
    (its job, its images, its hold on the drain): nothing is left in flight."""
    import json as jsonlib
    import socket

    from service.settings import Settings
    from tests.helpers.servers import GatedEngine, ThreadServer, tiny_engine

    settings = Settings(model="random:tiny")
    with ThreadServer(settings, GatedEngine(tiny_engine())) as running:
        host, port = running.url.removeprefix("http://").split(":")
        body = jsonlib.dumps({"prompt": "x", "stream": True, **LONG, "size": "256x256"}).encode()
        for _ in range(3):
            with socket.create_connection((host, int(port))) as connection:
                connection.sendall(
                    b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )  # and closed at once
        jobs = running.app.state.jobs
        wait_until(
            lambda: not list(jobs) and running.app.state.lifecycle._active == 0, "every request let go"
        )
