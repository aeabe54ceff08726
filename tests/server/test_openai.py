"""OpenAI's Images API (/v1/images/generations, /v1/models), driven by the official `openai` SDK against
real `sd-endpoint serve` processes on random:tiny: one with an API key for most tests, and one whose
engine is held at a gate with a one-image queue for 429 and Retry-After."""

from __future__ import annotations

import base64
import io
import itertools
import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from schemas.openai import ImageGenerationRequest
from schemas.score import ScoreLimits, ScoreRequest
from tests.helpers.processes import Server, start_server, stop_server
from tests.helpers.servers import (
    decode_png,
    gated_server,
    metric_value,
    request_body,
    wait_for_metric,
    wait_held,
)

pytestmark = pytest.mark.slow
KEY = "openai-test-key"
SERVED = "random:tiny"
ALIAS = (
    "dall-e-3"  # SD_SERVED_MODEL_NAMES of the main server: what clients that always send a model name send
)
FAST = {"num_inference_steps": 1}  # one step: the images are noise either way, and it is quick
SECRET_USER = "user-7f3a-never-logged"
SECRET_PROMPT = "a prompt that must never reach the log 52c1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("openai") / "server.log"
    running = start_server(
        log_path, SD_API_KEYS=KEY, SD_LOG_FORMAT="json", SD_MAX_BATCH_WAIT_MS="0",
        SD_SERVED_MODEL_NAMES=f"{SERVED}, {ALIAS}",
    )  # fmt: skip
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def pixels(b64_json: str | None) -> np.ndarray:
    """An image's b64_json -> HxWx3 uint8; fails unless it is a plain base64 PNG."""
    assert b64_json is not None
    raw = base64.b64decode(b64_json, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a rounding step in a few pixels: engine batches of other sizes add up in another
    order. Images of different seeds differ by about 40 levels on average."""
    difference = np.abs(a.astype(int) - b)
    return bool(difference.max() <= 1 and difference.mean() < 0.01)


def extras(image: Any) -> dict[str, Any]:
    """The server's extensions to an image entry (the SDK keeps unknown fields)."""
    return {name: getattr(image, name) for name in ("seed", "nsfw_content_detected")}


def test_generate_gives_n_pngs_of_the_requested_size_with_seeds_and_flags(client: openai.OpenAI) -> None:
    before = time.time()
    answer = client.images.generate(
        prompt=SECRET_PROMPT,
        n=2,
        size="160x128",  # WIDTHxHEIGHT
        response_format="b64_json",
        model=SERVED,
        user=SECRET_USER,
        extra_body={"seed": 7, "negative_prompt": "blurry", **FAST},
    )
    assert before - 5 <= answer.created <= time.time() + 5
    assert len(answer.data) == 2
    for image in answer.data:
        assert pixels(image.b64_json).shape == (128, 160, 3)
        assert image.revised_prompt is None and image.url is None
    assert [extras(image) for image in answer.data] == [
        {"seed": 7, "nsfw_content_detected": False},
        {"seed": 8, "nsfw_content_detected": False},
    ]


def test_the_same_seed_gives_the_same_images_and_score_draws_them_the_same(
    client: openai.OpenAI, server: Server
) -> None:
    def draw(seed: int) -> list[np.ndarray]:
        answer = client.images.generate(prompt="a red cube", n=2, extra_body={"seed": seed, **FAST})
        return [pixels(image.b64_json) for image in answer.data]

    first, again, other = draw(11), draw(11), draw(13)
    assert all(same_image(a, b) for a, b in zip(first, again, strict=True))
    assert not same_image(first[0], first[1])  # seeds 11 and 12
    assert not same_image(first[0], other[0]) and not same_image(first[1], other[0])
    [alone] = client.images.generate(prompt="a red cube", n=1, extra_body={"seed": 12, **FAST}).data
    assert same_image(pixels(alone.b64_json), first[1])  # an entry's seed, sent back with n 1
    # /score with the same prompt, seed and parameters: the same images, because it is the same path.
    records = httpx.post(
        f"{server.url}/score",
        json=request_body(["a red cube"], seed=11, num_images_per_prompt=2, **FAST),
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    ).json()
    assert [r["seed"] for r in records] == [11, 12]
    assert all(
        same_image(decode_png(r["generated_image"]), image) for r, image in zip(records, first, strict=True)
    )


@pytest.mark.parametrize(
    ("arguments", "param", "says"),
    [
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"n": 5}, "n", "less than or equal to 4"),
        ({"size": "100x100"}, "size", "multiple of 8 from 128 to 1024"),
        ({"size": "2048x2048"}, "size", "multiple of 8 from 128 to 1024"),
        ({"size": "512"}, "size", "WIDTHxHEIGHT"),
        ({"response_format": "png"}, "response_format", '"b64_json" or "url"'),
        ({"quality": "ultra"}, "quality", "must be one of: auto, standard, hd"),
        ({"style": "baroque"}, "style", "must be one of: vivid, natural"),
        ({"moderation": "none"}, "moderation", "must be one of: auto, low"),
        ({"background": "transparent"}, "background", "draws opaque images"),
        ({"output_format": "webp"}, "output_format", "must be one of: png (images come back as PNG"),
        ({"output_compression": 50}, "output_compression", "not permitted"),
        ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps", "greater than or equal to 1"),
        ({"extra_body": {"guidance_scale": 31}}, "guidance_scale", "less than or equal to 30"),
        ({"extra_body": {"scheduler": "no-such"}}, "scheduler", "must be one of"),
        ({"extra_body": {"seed": -1}}, "seed", "greater than or equal to 0"),
    ],
)
def test_bad_parameters_raise_bad_request_naming_the_field(
    client: openai.OpenAI, arguments: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(prompt="a blue sphere", **arguments)
    error = raised.value
    assert error.status_code == 400
    assert error.body == {"message": error.body["message"], "type": "invalid_request_error",
                          "param": param, "code": "invalid_request"}  # fmt: skip
    assert says in error.body["message"]


def test_a_body_that_is_not_json_is_a_400_in_openais_shape(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/v1/images/generations",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_json"
    assert "images request" in response.json()["error"]["message"]


def test_a_wrong_or_missing_key_raises_authentication_error(server: Server) -> None:
    for key in ("wrong-key", KEY + "x"):
        stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as raised:
            stranger.images.generate(prompt="anything", extra_body=FAST)
        assert raised.value.body["type"] == "authentication_error"  # type: ignore[index]
        assert "Bearer" in raised.value.body["message"]  # type: ignore[index]
        assert raised.value.response.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    bare = httpx.get(f"{server.url}/v1/models")
    assert bare.status_code == 401 and set(bare.json()["error"]) == {"message", "type", "param", "code"}


def test_openais_own_options_with_values_this_server_gives_anyway_are_accepted(client: openai.OpenAI) -> None:
    # What dall-e-3 and gpt-image-1 clients send by habit; none of it changes the image.
    answer = client.images.generate(
        prompt="a green cone", quality="hd", style="natural", background="opaque", output_format="png",
        moderation="low", extra_body={"seed": 5, **FAST},
    )  # fmt: skip
    [plain] = client.images.generate(prompt="a green cone", extra_body={"seed": 5, **FAST}).data
    assert same_image(pixels(answer.data[0].b64_json), pixels(plain.b64_json))


def test_models_lists_and_retrieves_the_served_names_and_only_those(client: openai.OpenAI) -> None:
    assert [(model.id, model.object, model.owned_by) for model in client.models.list()] == [
        (SERVED, "model", "sd-endpoint"), (ALIAS, "model", "sd-endpoint"),
    ]  # fmt: skip
    assert client.models.retrieve(SERVED).id == SERVED and client.models.retrieve(ALIAS).id == ALIAS
    # A client that always sends "dall-e-3" works unchanged once the operator names it.
    [image] = client.images.generate(prompt="x", model=ALIAS, extra_body={"seed": 3, **FAST}).data
    [same] = client.images.generate(prompt="x", model=SERVED, extra_body={"seed": 3, **FAST}).data
    assert same_image(pixels(image.b64_json), pixels(same.b64_json))
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-image-1")
    assert raised.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as raised:
        client.images.generate(prompt="x", model="gpt-image-1", extra_body=FAST)
    assert raised.value.body["param"] == "model"  # type: ignore[index]
    assert SERVED in raised.value.body["message"] and ALIAS in raised.value.body["message"]  # type: ignore[index]


def test_without_served_names_only_the_model_itself_is_listed_and_openais_ids_name_it(
    full_queue: str,
) -> None:
    client = openai.OpenAI(base_url=f"{full_queue}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == [SERVED]
    for openai_id in ("dall-e-2", "dall-e-3", "gpt-image-1"):
        assert "OpenAI's id" in client.models.retrieve(openai_id).owned_by
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-4")


def test_score_keeps_its_own_shapes_beside_the_openai_api(server: Server) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    [record] = httpx.post(
        f"{server.url}/score", json=request_body(["x"], **FAST), headers=auth, timeout=120
    ).json()
    assert set(record) == {"prompt", "generated_image", "nsfw_content_detected", "seed"}
    refused = httpx.post(f"{server.url}/score", json=request_body(["x"], num_inference_steps=0), headers=auth)
    assert refused.status_code == 422
    assert set(refused.json()["error"]) == {"code", "message", "status"}
    unauthorized = httpx.post(f"{server.url}/score", json=request_body(["x"]))
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["status"] == 401
    not_found = httpx.get(f"{server.url}/v1/nothing-here", headers=auth)
    assert not_found.status_code == 404 and not_found.json()["error"]["type"] == "invalid_request_error"


def test_routes_are_in_metrics_openapi_and_the_log_without_user_or_prompt(server: Server) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"prompt": SECRET_PROMPT, "user": SECRET_USER, **FAST},
        headers={**auth, "x-request-id": "openai-route-1"},
        timeout=120,
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "openai-route-1"
    assert response.json()["data"][0]["b64_json"]
    metrics = httpx.get(f"{server.url}/metrics").text
    for status in ("200", "400", "401"):
        labels = f'route="/v1/images/generations",status="{status}"'
        assert metric_value(metrics, "sd_requests_total", labels) >= 1, status
    assert metric_value(metrics, "sd_requests_total", 'route="/v1/models/{model_id}",status="404"') >= 1
    spec = httpx.get(f"{server.url}/swagger.json", headers=auth).json()
    paths = spec["paths"]
    assert {"/v1/images/generations", "/v1/models", "/v1/models/{model_id}"} <= set(paths)
    body_schema = paths["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]
    assert body_schema["schema"] == {"$ref": "#/components/schemas/ImageGenerationRequest"}
    properties = spec["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert {"prompt", "n", "size", "seed", "num_inference_steps"} <= set(properties)
    # The log: the request under its id, never the user field or the prompt.
    log_text = server.log_path.read_text()
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    assert any(
        line["request_id"] == "openai-route-1" and "/v1/images/generations" in line["message"]
        for line in lines
    )
    assert SECRET_USER not in log_text and SECRET_PROMPT not in log_text


def test_the_parameters_take_the_same_values_as_score() -> None:
    """/v1's extensions reuse /score's definitions and limits: a value is taken by both or by neither."""
    limits = ScoreLimits(max_prompts=4, max_prompt_chars=20, max_steps=40)
    cases: list[tuple[str, Any]] = [
        ("num_inference_steps", 1), ("num_inference_steps", 40), ("num_inference_steps", 41),
        ("num_inference_steps", 0), ("num_inference_steps", 2.0), ("num_inference_steps", True),
        ("guidance_scale", 0), ("guidance_scale", 30), ("guidance_scale", 30.5), ("guidance_scale", "7"),
        ("seed", 0), ("seed", 2**63 - 1), ("seed", 2**63), ("seed", -1), ("seed", "1"),
        ("negative_prompt", "x" * 20), ("negative_prompt", "\ud800"),
        ("scheduler", "euler"), ("scheduler", "x" * 65), ("scheduler", 3),
    ]  # fmt: skip

    def accepts(model: type[Any], document: dict[str, Any]) -> bool:
        try:
            model.model_validate(document, context={"limits": limits})
        except ValueError:
            return False
        return True

    for name, value in cases:
        on_score = accepts(ScoreRequest, {"input_data": {"columns": ["prompt"], "data": ["x"],
                                                         "parameters": {name: value}}})  # fmt: skip
        on_openai = accepts(ImageGenerationRequest, {"prompt": "x", name: value})
        assert on_score == on_openai, (name, value)
    steps = ImageGenerationRequest.model_validate({"prompt": "x"}, context={"limits": limits})
    assert steps.num_inference_steps == limits.default_steps  # defaults stay inside the server's limits
    for text in ("prompt", "negative_prompt"):  # SD_MAX_PROMPT_CHARS, as for /score's rows
        assert not accepts(ImageGenerationRequest, {"prompt": "x", text: "x" * 21}), text


# ----------------------------------------------------------------------- a full queue: 429, Retry-After
@pytest.fixture(scope="module")
def full_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server whose engine holds its first batch at a gate, with one more image queued behind it:
    the queue (SD_MAX_QUEUE_ITEMS=1) is full until the gate opens. Yields the base URL; afterwards
    opens the gate and checks that the two held requests were answered."""
    folder = tmp_path_factory.mktemp("gate")
    with gated_server(folder, SD_MODEL=SERVED, SD_MAX_QUEUE_ITEMS="1") as (url, process):
        held = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        try:
            with ThreadPoolExecutor(2) as pool:
                running: Future[Any] = pool.submit(held.images.generate, prompt="runs", extra_body=FAST)
                wait_held(folder, process, running)
                queued: Future[Any] = pool.submit(held.images.generate, prompt="waits", extra_body=FAST)
                wait_for_metric(url, "sd_queue_depth", 1)
                yield url
                (folder / "release").touch()
                assert len(running.result(timeout=120).data) == 1
                assert len(queued.result(timeout=120).data) == 1
        finally:
            (folder / "release").touch()
            stop_server(Server(url, process, folder / "server.log"))


def test_a_full_queue_raises_rate_limit_error_with_retry_after(full_queue: str) -> None:
    client = openai.OpenAI(base_url=f"{full_queue}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError) as raised:
        client.images.generate(prompt="one too many", extra_body=FAST)
    assert int(raised.value.response.headers["retry-after"]) >= 1
    assert raised.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert raised.value.body["code"] == "too_many_requests"  # type: ignore[index]


def test_the_sdk_waits_the_retry_after_before_retrying(full_queue: str) -> None:
    sent: list[float] = []
    answers: list[Any] = []  # the SDK's responses (httpx2)
    http_client = openai.DefaultHttpxClient(
        event_hooks={"request": [lambda _: sent.append(time.monotonic())],
                     "response": [answers.append]}
    )  # fmt: skip
    client = openai.OpenAI(
        base_url=f"{full_queue}/v1", api_key="unused", max_retries=2, http_client=http_client
    )
    with pytest.raises(openai.RateLimitError):
        client.images.generate(prompt="one too many", extra_body=FAST)
    assert [answer.status_code for answer in answers] == [429, 429, 429]
    retry_after = [float(answer.headers["retry-after"]) for answer in answers]
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    # Without Retry-After the SDK would wait 0.375-0.5 s, then 0.75-1 s; it waits what the server said.
    assert all(gap >= wait for gap, wait in zip(gaps, retry_after[:2], strict=True)), (gaps, retry_after)
    assert metric_value(httpx.get(f"{full_queue}/metrics").text, "sd_rejections_total") >= 3
