"""What a web page on another site can make its visitor's browser send to this server: bodies that are
not JSON (no CORS preflight needed), requests under a rebound host name, and framing. Also the
Retry-After of a full queue, estimated from the queue and the recent throughput."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.settings import Settings
from tests.helpers.servers import (
    GatedEngine,
    ThreadServer,
    held,
    request_body,
    tiny_engine,
    wait_for_metric,
)

MAX_QUEUE = 6


@pytest.fixture(scope="module")
def engine() -> GatedEngine:
    return GatedEngine(tiny_engine())


@pytest.fixture(scope="module")
def server(engine: GatedEngine) -> Iterator[ThreadServer]:
    # The default host, 127.0.0.1: the loopback names only.
    settings = Settings(max_queue_items=MAX_QUEUE, max_batch_size=1, max_batch_wait_ms=0)
    with ThreadServer(settings, engine) as running:
        yield running


def score_body() -> bytes:
    return json.dumps(request_body(["cross-site"], num_inference_steps=1)).encode()


# -- JSON routes take JSON only ---------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/score", "/v1/images/generations"])
@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
     "multipart/form-data; boundary=x", "text/json", "application/jsonx", "application/json-patch+json"],
)  # fmt: skip
def test_a_json_route_refuses_any_other_media_type_with_415(
    server: ThreadServer, engine: GatedEngine, path: str, content_type: str | None
) -> None:
    before = len(engine.batches)
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{server.url}{path}", content=score_body(), headers=headers, timeout=60)
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert "application/json" in response.json()["error"]["message"]
    assert len(engine.batches) == before  # nothing ran


@pytest.mark.parametrize(
    "content_type", ["application/json", "Application/JSON", "application/json; charset=utf-8"]
)
def test_json_in_any_spelling_is_served(server: ThreadServer, content_type: str) -> None:
    response = httpx.post(
        f"{server.url}/score", content=score_body(), headers={"content-type": content_type}, timeout=60
    )
    assert response.status_code == 200, response.text


# -- the Host header --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "host",
    ["attacker.example", "127.0.0.1.attacker.example", "localhost.evil", "evil:5001", "[::2]:80", "10.0.0.1",
     "", "localhost@evil"],
)  # fmt: skip
@pytest.mark.parametrize("path", ["/score", "/info", "/ui", "/docs", "/swagger.json"])
def test_a_foreign_host_is_refused_on_a_loopback_server(server: ThreadServer, host: str, path: str) -> None:
    method = "POST" if path == "/score" else "GET"
    headers = {"host": host, "content-type": "application/json", "origin": "http://attacker.example"}
    response = httpx.request(method, f"{server.url}{path}", content=score_body(), headers=headers, timeout=60)
    assert response.status_code == 400, response.text[:200]
    assert response.json()["error"]["code"] == "host_not_allowed"
    assert "SD_ALLOWED_HOSTS" in response.json()["error"]["message"]


@pytest.mark.parametrize("host", ["localhost", "localhost:5001", "127.0.0.1:80", "[::1]:5001", "LOCALHOST"])
def test_the_loopback_names_are_served(server: ThreadServer, host: str) -> None:
    assert httpx.get(f"{server.url}/info", headers={"host": host}).status_code == 200


def test_probes_answer_whatever_the_host(server: ThreadServer) -> None:
    for path in ("/", "/health/live", "/health/ready", "/metrics"):
        assert httpx.get(f"{server.url}{path}", headers={"host": "10.1.2.3:5001"}).status_code == 200, path
        assert httpx.head(f"{server.url}{path}", headers={"host": "10.1.2.3:5001"}).status_code == 200, path


def hugging_face_post(url: str, host: str) -> httpx.Response:
    body = {"inputs": "rebound", "parameters": {"num_inference_steps": 1}}
    return httpx.post(f"{url}/", json=body, headers={"host": host}, timeout=60)


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:5001", "10.1.2.3"])
def test_post_root_generates_for_the_allowed_hosts_only_though_get_root_is_a_probe(
    server: ThreadServer, engine: GatedEngine, host: str
) -> None:
    # A DNS-rebinding page posts to / under its own name and reads the PNG: the probe's exemption
    # is for GET and HEAD.
    before = len(engine.batches)
    refused = hugging_face_post(server.url, host)
    assert refused.status_code == 400, refused.text[:200]
    assert "host_not_allowed" in refused.text and "SD_ALLOWED_HOSTS" in refused.text
    assert len(engine.batches) == before  # nothing ran
    assert hugging_face_post(server.url, "localhost:5001").status_code == 200


def test_the_allowed_hosts_are_configurable_and_any_host_when_listening_beyond_loopback(
    engine: GatedEngine,
) -> None:
    listed = Settings(allowed_hosts="api.example.com, *.svc.local")  # type: ignore[call-arg]
    with ThreadServer(listed, engine) as server:
        for host, status in [("api.example.com", 200), ("API.example.com:443", 200), ("a.b.svc.local", 200),
                             ("svc.local", 400), ("x.api.example.com", 400), ("localhost", 400)]:  # fmt: skip
            assert httpx.get(f"{server.url}/info", headers={"host": host}).status_code == status, host
        assert hugging_face_post(server.url, "attacker.example").status_code == 400
        assert hugging_face_post(server.url, "api.example.com").status_code == 200
    # In a container (SD_HOST=0.0.0.0) the names clients use are unknown: any host, unless listed.
    with ThreadServer(Settings(host="0.0.0.0"), engine) as server:
        assert httpx.get(f"{server.url}/info", headers={"host": "my-service.default.svc"}).status_code == 200


# -- security headers -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/ui", "/docs", "/redoc", "/info", "/nowhere"])
def test_every_answer_forbids_framing_and_sniffing(server: ThreadServer, path: str) -> None:
    response = httpx.get(f"{server.url}{path}")
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    assert "unsafe-eval" not in policy and "http" not in policy  # nothing from another origin


def test_the_pages_load_their_assets_from_this_server_only(server: ThreadServer) -> None:
    for path in ("/docs", "/redoc"):
        page = httpx.get(f"{server.url}{path}").text
        assert "http://" not in page and "https://" not in page, path
    for name, media_type in [("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css"),
                             ("redoc.standalone.js", "text/javascript")]:  # fmt: skip
        asset = httpx.get(f"{server.url}/docs/assets/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
        assert len(asset.content) > 100_000
    assert httpx.get(f"{server.url}/docs/assets/__init__.py").status_code == 404


# -- Retry-After from the queue and the throughput ----------------------------------------------------
def test_a_full_queue_says_when_to_retry_from_its_length_and_the_recent_rate(
    server: ThreadServer, engine: GatedEngine, pool: ThreadPoolExecutor
) -> None:
    one = request_body(["warm"], num_inference_steps=1)
    for _ in range(2):  # a recent rate: about two images in a second or more
        assert httpx.post(f"{server.url}/score", json=one, timeout=60).status_code == 200
    with held(engine):
        running = pool.submit(httpx.post, f"{server.url}/score", json=one, timeout=120)
        engine.wait_until_held()
        waiting = request_body(["queued"] * 2, num_inference_steps=1, num_images_per_prompt=MAX_QUEUE // 2)
        queued = pool.submit(httpx.post, f"{server.url}/score", json=waiting, timeout=120)
        wait_for_metric(server.url, "sd_queue_depth", MAX_QUEUE)
        refused = httpx.post(f"{server.url}/score", json=one, timeout=60)
        openai = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x"}, timeout=60)
    assert running.result().status_code == 200 and queued.result().status_code == 200
    assert refused.status_code == openai.status_code == 429
    # Six images ahead at no more than two a second: at least three seconds, never the old 1.
    for answer in (refused, openai):
        assert 3 <= int(answer.headers["retry-after"]) <= 600, answer.headers["retry-after"]
