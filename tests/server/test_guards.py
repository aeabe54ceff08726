"""API keys (401), body size (413), content encoding (415) and request-id length (431), against a
real server."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from service.settings import Settings
from tests.helpers.servers import GatedEngine, ThreadServer, request_body, tiny_engine

KEYS = ("primary-key-1", "secondary-key-2")
MAX_BODY = 4096


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    settings = Settings(api_keys=",".join(KEYS), max_body_bytes=MAX_BODY)  # type: ignore[arg-type]
    with ThreadServer(settings, GatedEngine(tiny_engine())) as running:
        yield running


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def test_score_and_info_need_a_configured_key(server: ThreadServer) -> None:
    body = request_body(["a key test"])
    for headers in ({}, bearer("wrong"), {"Authorization": KEYS[0]}, bearer(KEYS[0] + "x")):
        response = httpx.post(f"{server.url}/score", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert "Bearer" in response.json()["error"]["message"]
        assert response.headers["www-authenticate"] == "Bearer"
        assert KEYS[0] not in response.text
    assert httpx.get(f"{server.url}/info").status_code == 401
    for key in KEYS:  # either key works, so they can be rotated one at a time
        assert (
            httpx.post(f"{server.url}/score", json=body, headers=bearer(key), timeout=60).status_code == 200
        )
    assert httpx.get(f"{server.url}/info", headers=bearer(KEYS[1])).status_code == 200


def test_health_and_metrics_need_no_key(server: ThreadServer) -> None:
    for path in ("/", "/health/live", "/health/ready", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path


def test_the_key_is_checked_before_the_body_is_read(server: ThreadServer) -> None:
    response = httpx.post(f"{server.url}/score", content=b"x" * (MAX_BODY * 2))
    assert response.status_code == 401  # not 413: the oversized body was never looked at


def test_a_body_over_the_limit_is_413_before_parsing(server: ThreadServer) -> None:
    too_big = json.dumps(request_body(["x" * MAX_BODY])).encode()
    response = httpx.post(f"{server.url}/score", content=too_big, headers=bearer(KEYS[0]))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert str(MAX_BODY) in response.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_is_413(server: ThreadServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"input_data": {"columns": ["prompt"], "data": ["'
        for _ in range(MAX_BODY // 512 + 2):
            yield b"y" * 512
        yield b'"]}}'

    response = httpx.post(f"{server.url}/score", content=chunks(), headers=bearer(KEYS[0]))
    assert "content-length" not in response.request.headers  # it really was sent chunked
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    fine = httpx.post(
        f"{server.url}/score", json=request_body(["after"]), headers=bearer(KEYS[0]), timeout=60
    )
    assert fine.status_code == 200


def test_a_body_over_the_limit_on_the_openai_route_is_413_in_openai_shape(server: ThreadServer) -> None:
    too_big = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    response = httpx.post(f"{server.url}/v1/images/generations", content=too_big, headers=bearer(KEYS[0]))
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("body_too_large", "invalid_request_error")


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip", "x-made-up"])
@pytest.mark.parametrize("path", ["/score", "/v1/images/generations"])
def test_a_compressed_body_is_415_not_parsed_as_plain(server: ThreadServer, encoding: str, path: str) -> None:
    # A plain body labelled gzip would otherwise be served, and a really compressed one be a 400
    # malformed_json that does not say why.
    body = request_body(["labelled"]) if path == "/score" else {"prompt": "labelled", "n": 1}
    headers = {**bearer(KEYS[0]), "Content-Encoding": encoding}
    response = httpx.post(f"{server.url}{path}", json=body, headers=headers)
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_content_encoding"
    assert "uncompressed" in error["message"] and encoding.split(",")[-1].strip() in error["message"]
    assert ("type" in error) == path.startswith("/v1/")  # OpenAI's shape on its route
    # identity is no encoding at all, and a request without a body has nothing to decode.
    plain = httpx.post(
        f"{server.url}/score", json=request_body(["plain"]), timeout=60,
        headers={**bearer(KEYS[0]), "Content-Encoding": "identity"},
    )  # fmt: skip
    assert plain.status_code == 200
    assert httpx.get(f"{server.url}/health/live", headers={"Content-Encoding": "gzip"}).status_code == 200


@pytest.mark.parametrize("header", ["x-request-id", "x-ms-request-id", "x-ms-client-request-id"])
def test_a_request_id_over_100_characters_is_431(server: ThreadServer, header: str) -> None:
    response = httpx.get(f"{server.url}/", headers={header: "i" * 101})
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "header_too_long"
    assert "i" * 101 not in str(response.headers)
    accepted = httpx.get(f"{server.url}/", headers={header: "i" * 100})
    assert accepted.status_code == 200 and accepted.headers[header] == "i" * 100


def test_head_is_get_without_the_body(server: ThreadServer) -> None:
    for path in ("/", "/health/live", "/health/ready", "/metrics", "/ui"):
        got, head = httpx.get(f"{server.url}{path}"), httpx.head(f"{server.url}{path}")
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-type"] == got.headers["content-type"], path
    assert httpx.head(f"{server.url}/nowhere", headers=bearer(KEYS[0])).status_code == 404
    not_allowed = httpx.head(f"{server.url}/score", headers=bearer(KEYS[0]))
    assert (not_allowed.status_code, not_allowed.headers["allow"]) == (405, "POST")
    assert httpx.head(f"{server.url}/info").status_code == 401  # the key is still checked
    assert httpx.head(f"{server.url}/info", headers=bearer(KEYS[0])).status_code == 200
