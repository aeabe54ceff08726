"""Hugging Face's text-to-image task on POST /, driven by the real `huggingface_hub.InferenceClient`
against a real `sd-endpoint serve` process with an API key."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from tests.helpers.processes import Server, serving
from tests.helpers.servers import decode_png, metric_value, request_body

pytestmark = pytest.mark.slow
KEY = "hf-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("hf") / "server.log", SD_API_KEYS=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> InferenceClient:
    return InferenceClient(base_url=server.url, api_key=KEY)


def score_image(server: Server, seed: int, **parameters: object) -> np.ndarray:
    body = request_body(["a red fox"], seed=seed, **parameters)
    answer = httpx.post(
        f"{server.url}/score", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    )
    assert answer.status_code == 200, answer.text
    return decode_png(answer.json()[0]["generated_image"])


def test_text_to_image_equals_score_for_the_same_seed(server: Server, client: InferenceClient) -> None:
    image = client.text_to_image(
        "a red fox",
        num_inference_steps=2,
        guidance_scale=7.5,
        seed=11,
        negative_prompt="blur",
        scheduler="EulerDiscreteScheduler",
    )
    expected = score_image(server, 11, negative_prompt="blur", scheduler="euler")
    assert np.array_equal(np.asarray(image.convert("RGB")), expected)
    other = client.text_to_image("a red fox", num_inference_steps=2, seed=12)
    assert not np.array_equal(np.asarray(other.convert("RGB")), expected)


def test_size_and_png_bytes(server: Server) -> None:
    answer = httpx.post(
        server.url,
        json={
            "inputs": "a cat",
            "parameters": {"num_inference_steps": 1, "width": 192, "height": 128, "seed": 3},
        },
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(answer.content)).size == (192, 128)


def test_get_root_stays_the_open_probe_and_post_needs_the_key(server: Server) -> None:
    assert httpx.get(server.url).text == "Healthy"
    refused = httpx.post(server.url, json={"inputs": "a cat"})
    assert refused.status_code == 401
    basic = base64.b64encode(f"user:{KEY}".encode()).decode()
    fine = httpx.post(
        server.url, json={"inputs": "a cat", "parameters": {"num_inference_steps": 1}},
        headers={"Authorization": f"Basic {basic}"}, timeout=120,
    )  # fmt: skip
    assert fine.status_code == 200


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"inputs": 5}, "inputs"),
        ({"prompt": "x"}, "prompt"),
        ({"inputs": "x", "parameters": {"seed": -1}}, "seed"),
        ({"inputs": "x", "parameters": {"seed": 2**64}}, "seed"),
        ({"inputs": "x", "parameters": {"width": 100}}, "width"),
        ({"inputs": "x", "parameters": {"num_inference_steps": 0}}, "num_inference_steps"),
        ({"inputs": "x", "parameters": {"guidance_scale": "high"}}, "guidance_scale"),
        ({"inputs": "x", "parameters": {"scheduler": "KarrasScheduler"}}, "scheduler"),
        ({"inputs": "x", "parameters": {"strength": 0.5}}, "strength"),
        ({"inputs": "x" * 5000}, "inputs"),
        ({"inputs": "\ud800"}, "inputs"),
        (["x"], "body"),
    ],
)
def test_hostile_bodies_are_one_line_errors_naming_the_field(
    server: Server, body: object, where: str
) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    answer = httpx.post(server.url, content=json.dumps(body), headers=headers, timeout=30)
    assert answer.status_code == 422, answer.text
    error = answer.json()
    assert where in error["error"] and error["error_type"] == "invalid_request"
    assert "\n" not in error["error"]


@pytest.mark.parametrize(
    ("headers", "content", "status", "code"),
    [
        ({}, b'{"inputs": "x"}', 401, "unauthorized"),
        ({"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"}, b'{"inputs": "x"}', 415,
         "unsupported_media_type"),
        ({"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, b"x" * (21 << 20), 413,
         "body_too_large"),
        ({"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
          "Sec-Fetch-Site": "cross-site"}, b'{"inputs": "x"}', 403, "cross_origin_request"),
    ],
)  # fmt: skip
def test_the_middlewares_refusals_are_in_hugging_faces_shape_too(
    server: Server, headers: dict[str, str], content: bytes, status: int, code: str
) -> None:
    # Refused before the route runs (keys, media type, size): still {"error": message, "error_type"}.
    answer = httpx.post(server.url, content=content, headers=headers, timeout=30)
    assert answer.status_code == status, answer.text[:300]
    error = answer.json()
    assert isinstance(error["error"], str) and error["error_type"] == code, error
    probe = httpx.get(server.url, headers={"Authorization": "Bearer wrong"})  # GET / is open: our shape
    assert probe.status_code == 200


def test_the_client_raises_the_servers_message(client: InferenceClient) -> None:
    with pytest.raises(HfHubHTTPError, match="width"):
        client.text_to_image("a cat", width=100)


def test_generations_have_their_own_metrics_label_apart_from_the_probe(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"inputs": "a cat", "parameters": {"num_inference_steps": 1}}
    assert httpx.post(server.url, json=body, headers=headers, timeout=120).status_code == 200
    assert httpx.post(server.url, json={"inputs": 1}, headers=headers).status_code == 422
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "sd_requests_total", 'route="POST /",status="200"') >= 1
    assert metric_value(text, "sd_requests_total", 'route="POST /",status="422"') >= 1
    assert metric_value(text, "sd_requests_total", 'route="/",status="200"') >= 1  # the probes
