"""What hostile testing found, each fixed and tested in process: bad items, pathological JSON,
defaults beyond limits, log forgery, HTTP details."""

from __future__ import annotations

import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from service.logs import JsonFormatter, RequestContextFilter, TextFormatter
from service.settings import Settings
from tests.helpers.servers import GatedEngine, ThreadServer, request_body

SETTINGS = Settings(model="random:tiny", max_batch_wait_ms=200, max_steps=4)


@pytest.fixture(scope="module")
def engine(tiny_engine: Any) -> GatedEngine:
    return GatedEngine(tiny_engine)


@pytest.fixture(scope="module")
def server(engine: GatedEngine) -> Any:
    with ThreadServer(SETTINGS, engine) as running:
        yield running


def post_raw(url: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/score", content=body, headers={"content-type": "application/json", **headers}, timeout=120
    )


# -- 1. a bad item never fails its neighbours -------------------------------------------------------
def test_a_lone_surrogate_is_refused_with_422_before_it_is_queued(server: Any, engine: GatedEngine) -> None:
    before = len(engine.batches)
    for body in (
        request_body(["\ud800"]),
        request_body(["ok"], negative_prompt="\udfff"),
        request_body([["fine", "\ud83d"]], columns=["prompt", "negative_prompt"]),
    ):
        # json.dumps writes the surrogate as the escape "\ud800", as a hostile client would.
        response = post_raw(server.url, json.dumps(body).encode())
        assert response.status_code == 422, response.text
        assert "lone surrogate" in response.json()["error"]["message"]
    assert len(engine.batches) == before


def test_an_item_that_breaks_the_engine_fails_only_its_own_request(server: Any, engine: GatedEngine) -> None:
    engine.crash_prompts.add("explode")
    try:
        with ThreadPoolExecutor(3) as pool:
            # Sent together, they share a batch (200 ms window); the batch fails, then each retries alone.
            futures = [
                pool.submit(httpx.post, f"{server.url}/score", json=request_body([prompt]), timeout=120)
                for prompt in ("neighbour one", "explode", "neighbour two")
            ]
            answers = [f.result() for f in futures]
    finally:
        engine.crash_prompts.clear()
    assert [a.status_code for a in answers] == [200, 500, 200], [a.text for a in answers]
    assert answers[1].json()["error"]["code"] == "internal_error"
    assert "0xDEADBEEF" not in answers[1].text  # the engine's text stays in the log


# -- 2. pathological JSON -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000 + b"]" * 200_000,
        b'{"input_data": ' * 50_000 + b"1" + b"}" * 50_000,
        b'{"input_data": {"columns": ["prompt"], "data": ["a"], "parameters": {"seed": '
        + b"9" * 5000
        + b"}}}",
        b'{"input_data": {"columns": ["prompt"], "data": [' + b"7" * 100_000 + b"]}}",
    ],
    ids=["deep-lists", "deep-objects", "huge-seed", "huge-int"],
)
def test_a_body_the_parser_cannot_take_is_a_400_with_the_error_body(server: Any, body: bytes) -> None:
    response = post_raw(server.url, body)
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["code"] == "malformed_json"


def test_deep_but_parsable_nesting_inside_data_is_a_422(server: Any) -> None:
    body = b'{"input_data": {"columns": ["prompt"], "data": [' + b"[" * 900 + b"]" * 900 + b"]}}"
    response = post_raw(server.url, body)
    assert response.status_code == 422, response.text[:300]


# -- 3. every default inside its limit ------------------------------------------------------------
def test_omitted_steps_default_to_the_server_maximum_when_it_is_below_50(
    server: Any, engine: GatedEngine
) -> None:
    for body in (
        {"input_data": {"columns": ["prompt"], "data": ["no parameters at all"]}},
        {"input_data": {"columns": ["prompt"], "data": ["empty parameters"], "parameters": {}}},
    ):
        response = httpx.post(f"{server.url}/score", json=body, timeout=120)
        assert response.status_code == 200, response.text
        ran = next(b for b in reversed(engine.batches) if b[0].prompt == body["input_data"]["data"][0])
        assert ran[0].num_inference_steps == SETTINGS.max_steps == 4


# -- 4. log forgery -------------------------------------------------------------------------------
@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_control_characters_in_any_logged_field_are_escaped(
    server: Any, formatter: logging.Formatter
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(formatter)
    access = logging.getLogger("service.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        forged = "/x%0a2026-12-01%2000:00:00,000%20INFO%20service.access%20[-]%20POST%20/score%20200%1b[31m"
        httpx.get(f"{server.url}{forged}", headers={"x-request-id": "id\twith-a-tab"})
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    # The line of an earlier test's request may land here too (it is logged after its answer).
    lines = stream.getvalue().splitlines()
    ours = [line for line in lines if "with-a-tab" in line]
    assert len(ours) == 1, lines  # one request, one line
    assert not any(line.startswith("2026-12-01 00:00:00,000") for line in lines), lines  # none forged
    if isinstance(formatter, JsonFormatter):
        assert all(isinstance(json.loads(line), dict) for line in lines)  # every line one whole record
    assert "\x1b" not in ours[0] and "\t" not in ours[0]
    text = ours[0] if isinstance(formatter, TextFormatter) else json.dumps(json.loads(ours[0]))
    assert "\\n2026-12-01" in text and "\\t" in text


# -- 6. HTTP details ------------------------------------------------------------------------------
def test_a_405_names_the_allowed_methods(server: Any) -> None:
    response = httpx.get(f"{server.url}/score")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_the_openapi_document_says_text_where_the_routes_send_text(server: Any) -> None:
    document = httpx.get(f"{server.url}/swagger.json").json()
    for path in ("/", "/health/ready", "/metrics"):
        content = document["paths"][path]["get"]["responses"]["200"]["content"]
        assert list(content) == ["text/plain"], (path, content)
        assert httpx.get(f"{server.url}{path}").headers["content-type"].startswith("text/plain")


def test_a_trailing_slash_redirects_relatively_whatever_the_host_header(server: Any) -> None:
    response = httpx.get(f"{server.url}/ui/?a=1", headers={"host": "localhost:1"})
    assert response.status_code == 307
    assert response.headers["location"] == "/ui?a=1"
    # A foreign host is not redirected at all on a loopback server (tests/server/test_cross_site.py).
    assert httpx.get(f"{server.url}/ui/?a=1", headers={"host": "evil.example"}).status_code == 400
    assert httpx.get(f"{server.url}/nope/").status_code == 404


def test_the_shared_negative_prompt_has_the_same_length_limit_as_the_rows(server: Any) -> None:
    long = "x" * (SETTINGS.max_prompt_chars + 1)
    response = httpx.post(f"{server.url}/score", json=request_body(["a"], negative_prompt=long), timeout=60)
    assert response.status_code == 422
    assert "parameters.negative_prompt is longer than" in response.json()["error"]["message"]
