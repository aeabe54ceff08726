"""POST /score as Azure ML's clients call it, against a real server on random:tiny."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from schemas.score import SAMPLE_REQUEST
from service.settings import Settings
from tests.helpers.servers import (
    GatedEngine,
    ThreadServer,
    decode_png,
    metric_value,
    request_body,
    tiny_engine,
)


@pytest.fixture(scope="module")
def engine() -> GatedEngine:
    return GatedEngine(tiny_engine())


@pytest.fixture(scope="module")
def client(engine: GatedEngine) -> Iterator[httpx.Client]:
    settings = Settings(max_batch_wait_ms=0)
    with ThreadServer(settings, engine) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def score(client: httpx.Client, body: dict[str, object]) -> list[dict[str, object]]:
    response = client.post("/score", json=body)
    assert response.status_code == 200, response.text
    records: list[dict[str, object]] = response.json()
    return records


def test_the_sample_request_gives_one_png_per_prompt_in_order(client: httpx.Client) -> None:
    body = {"input_data": {**SAMPLE_REQUEST["input_data"], "parameters": {"num_inference_steps": 2}}}
    response = client.post("/score", json=body)
    assert response.status_code == 200, response.text
    records = response.json()
    assert [r["prompt"] for r in records] == SAMPLE_REQUEST["input_data"]["data"]
    for record in records:
        assert set(record) == {"prompt", "generated_image", "nsfw_content_detected", "seed"}
        assert decode_png(str(record["generated_image"])).shape == (128, 128, 3)  # tiny's native size
        assert record["nsfw_content_detected"] is False  # tiny has a checker; random weights never flag
        assert isinstance(record["seed"], int)
    assert uuid.UUID(response.headers["x-request-id"])


def test_records_style_rows_with_negative_prompts(client: httpx.Client, engine: GatedEngine) -> None:
    data = [
        {"prompt": "a red cube", "negative_prompt": "blurry"},
        {"prompt": "a blue sphere"},  # no negative of its own: the parameter's
    ]
    body = request_body(data, columns=["prompt", "negative_prompt"], negative_prompt="low quality")
    records = score(client, body)
    assert [r["prompt"] for r in records] == ["a red cube", "a blue sphere"]
    ran = {item.prompt: item.negative_prompt for batch in engine.batches for item in batch}
    assert ran["a red cube"] == "blurry"
    assert ran["a blue sphere"] == "low quality"


def test_a_returned_seed_reproduces_its_image(client: httpx.Client) -> None:
    first = score(client, request_body(["a lighthouse", "a lighthouse"]))  # random seeds
    assert first[0]["seed"] != first[1]["seed"]
    again = score(client, request_body(["a lighthouse"], seed=first[1]["seed"]))
    assert again[0]["seed"] == first[1]["seed"]
    # Batches of different sizes may round differently in the last bit: equal to within 1/255.
    reproduced = difference(again[0]["generated_image"], first[1]["generated_image"])
    other_seed = difference(first[0]["generated_image"], first[1]["generated_image"])
    assert reproduced.max() <= 1
    assert other_seed.mean() > 10 * max(reproduced.mean(), 0.1)


def difference(a: object, b: object) -> np.ndarray:
    diff: np.ndarray = np.abs(decode_png(str(a)).astype(int) - decode_png(str(b)).astype(int))
    return diff


def test_seed_parameter_counts_up_per_row_unless_a_row_has_its_own(client: httpx.Client) -> None:
    body = request_body([["a", None], ["b", 7], ["c", None]], columns=["prompt", "seed"], seed=100)
    assert [r["seed"] for r in score(client, body)] == [100, 7, 102]


def test_num_images_per_prompt_gives_that_many_records_per_prompt(client: httpx.Client) -> None:
    records = score(client, request_body(["a", "b"], num_images_per_prompt=2, seed=5))
    assert [r["prompt"] for r in records] == ["a", "a", "b", "b"]
    assert [r["seed"] for r in records] == [5, 6, 7, 8]
    assert difference(records[0]["generated_image"], records[1]["generated_image"]).mean() > 1


def test_size_and_scheduler_parameters_are_honoured(client: httpx.Client) -> None:
    records = score(client, request_body(["a"], height=136, width=144, scheduler="euler"))
    assert decode_png(str(records[0]["generated_image"])).shape == (136, 144, 3)


def test_request_ids_are_echoed(client: httpx.Client) -> None:
    ids = {"x-request-id": "req-1", "x-ms-request-id": "ms-2", "x-ms-client-request-id": "client-3"}
    response = client.get("/", headers=ids)
    assert response.status_code == 200 and response.text == "Healthy"
    assert {name: response.headers[name] for name in ids} == ids


def test_info_describes_the_model_and_limits(client: httpx.Client) -> None:
    info = client.get("/info").json()
    assert info["name"] == "random:tiny" and info["random_weights"] is True
    assert (info["native_height"], info["native_width"]) == (128, 128)
    assert "euler" in info["schedulers"] and info["safety_checker"] is True
    assert info["limits"]["max_prompts"] == Settings().max_prompts
    assert info["limits"]["max_size"] == 1024


def test_swagger_has_the_schemas_and_the_sample(client: httpx.Client) -> None:
    spec = client.get("/swagger.json").json()
    operation = spec["paths"]["/score"]["post"]
    request = operation["requestBody"]["content"]["application/json"]
    assert request["example"] == SAMPLE_REQUEST
    assert {"ScoreRequest", "InputData", "ScoreParameters", "ImageRecord", "ErrorResponse"} <= set(
        spec["components"]["schemas"]
    )
    assert operation["responses"]["200"]["content"]["application/json"]["example"][0]["prompt"]
    assert "swagger" in client.get("/docs").text.lower()


def references(node: Any) -> Iterator[str]:
    """Every ``$ref`` in a JSON document, depth first."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from references(value)
    elif isinstance(node, list):
        for value in node:
            yield from references(value)


def resolve(document: Any, reference: str) -> Any:
    """A local reference (``#/components/schemas/X``) as RFC 6901 reads it; KeyError if it dangles."""
    assert reference.startswith("#/"), f"{reference} is not a reference within the document"
    node = document
    for part in reference[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


@pytest.mark.parametrize("path", ["/swagger.json", "/openapi.json"])
def test_every_reference_of_the_openapi_document_resolves(client: httpx.Client, path: str) -> None:
    # What client generators and fuzzers do first: a dangling one (POST /'s #/$defs/...) stops them.
    spec = client.get(path).json()
    found = set(references(spec))
    dangling = []
    for reference in sorted(found):
        try:
            resolve(spec, reference)
        except (KeyError, AssertionError):
            dangling.append(reference)
    assert not dangling, f"{path}: {dangling}"
    for route, component in [("/", "TextToImageRequest"), ("/sdapi/v1/txt2img", "Txt2ImgRequest"),
                             ("/v1/images/generations", "ImageGenerationRequest")]:  # fmt: skip
        body = spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{component}"}, route
    assert "#/components/schemas/TextToImageParameters" in found


def test_health_and_metrics(client: httpx.Client) -> None:
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").text == "Healthy"
    text = client.get("/metrics").text
    assert metric_value(text, "sd_requests_total", 'route="/score",status="200"') >= 1
    assert metric_value(text, "sd_images_generated_total") >= 1
    assert metric_value(text, "sd_model_load_seconds") > 0
    for name in (
        "sd_request_duration_seconds_bucket",
        "sd_queue_wait_seconds_bucket",
        "sd_batch_size_bucket",
        "sd_engine_batch_seconds_bucket",
        "sd_queue_depth",
        "sd_images_flagged_total",
        "sd_rejections_total",
        "sd_timeouts_total",
    ):
        assert name in text
