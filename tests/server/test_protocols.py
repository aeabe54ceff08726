"""The connection guards on both HTTP implementations uvicorn may pick (httptools when installed, else
h11), each serving the real app on a real socket: request heads over the limits are 431 before the
app, heads and bodies within them are served (pipelined too), and the send deadline closes a client
that reads nothing while sparing one that reads slowly."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings
from tests.helpers.servers import GatedEngine, ThreadServer, metric_value, request_body, tiny_engine
from tests.helpers.sockets import connect, exchange

MAX_HEADER_COUNT = 30
MAX_HEADER_BYTES = 4096
SEND_TIMEOUT_S = 1


@pytest.fixture(scope="module", params=[HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[ThreadServer]:
    settings = Settings(
        max_header_count=MAX_HEADER_COUNT, max_header_bytes=MAX_HEADER_BYTES, send_timeout_s=SEND_TIMEOUT_S
    )
    with ThreadServer(settings, GatedEngine(tiny_engine()), guarded=request.param) as running:
        yield running


HEAD = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.mark.parametrize(
    "pieces",
    [
        [HEAD + b"a:b\r\n" * 100_000 + b"\r\n"],
        [HEAD + b"a:b\r\n" * MAX_HEADER_COUNT + b"\r\n"],
        [HEAD + b"x-big: " + b"v" * 1_000_000 + b"\r\n\r\n"],
        [b"GET /" + b"p" * 10_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"],
        [HEAD] + [b"a:" + b"b" * 100 + b"\r\n"] * 100,
        [b"\r\n" * 10 + HEAD + b"a:b\r\n" * 1000 + b"\r\n"],
    ],
    ids=["100k-headers", "count+1", "1mb-value", "long-target", "split", "leading-blank-lines"],
)
def test_a_head_over_the_limits_is_431_before_the_app(server: ThreadServer, pieces: list[bytes]) -> None:
    before = metric_value(httpx.get(f"{server.url}/metrics").text, "sd_requests_total", 'status="431"')
    answer = exchange(server.url, pieces)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"header_fields_too_large"' in answer
    after = metric_value(httpx.get(f"{server.url}/metrics").text, "sd_requests_total", 'status="431"')
    assert after == before + 1


def test_heads_and_bodies_within_the_limits_are_served_pipelined(server: ThreadServer) -> None:
    # Each body is larger than the head limit; pipelined, the bytes after one head are body, then head.
    body = json.dumps(request_body(["b" * 1800] * 3, num_inference_steps=1)).encode()
    assert len(body) > MAX_HEADER_BYTES
    post = (
        b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n" % len(body)
        + b"a:b\r\n" * (MAX_HEADER_COUNT - 4)
        + b"\r\n"
        + body
    )
    last = HEAD + b"Connection: close\r\n\r\n"
    answer = exchange(server.url, [post * 3 + last], read_s=120)
    assert answer.count(b"HTTP/1.1 200 ") == 4, answer[:400]
    # The same with the end of the head split across three reads.
    end = post.index(b"\r\n\r\n")
    pieces = [post[: end + 1], post[end + 1 : end + 3], post[end + 3 :], last]
    assert exchange(server.url, pieces, read_s=120).count(b"HTTP/1.1 200 ") == 2


def test_a_client_that_reads_nothing_is_cut_off_and_one_that_reads_slowly_is_not(
    server: ThreadServer,
) -> None:
    before = metric_value(
        httpx.get(f"{server.url}/metrics").text, "sd_connections_closed_total", 'reason="send_timeout"'
    )
    size = len(httpx.get(f"{server.url}/docs/assets/swagger-ui-bundle.js").content)
    asset = b"GET /docs/assets/swagger-ui-bundle.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    # 1. Reads nothing: closed within a few send deadlines, the answers it did not read dropped.
    unread = 0
    with connect(server.url) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(asset * 20)
        time.sleep(SEND_TIMEOUT_S * 5)
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                unread += len(chunk)
    assert unread < 20 * size
    after = metric_value(
        httpx.get(f"{server.url}/metrics").text, "sd_connections_closed_total", 'reason="send_timeout"'
    )
    assert after == before + 1
    # 2. Reads a little at a time, for longer than the deadline: served whole.
    received = 0
    with connect(server.url) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.sendall(asset * 2 + asset[:-2] + b"Connection: close\r\n\r\n")
        started = time.monotonic()
        while chunk := sock.recv(32 * 1024):
            received += len(chunk)
            time.sleep(0.02)
    assert received > 3 * size and time.monotonic() - started > SEND_TIMEOUT_S * 1.5


def test_an_error_answers_status_line_says_what_to_change(server: ThreadServer) -> None:
    """Both implementations write the app's reason phrase (service/web/errors.py REASON_HEADER) into
    the status line and drop the header; answers without one keep the standard phrase."""
    body = json.dumps(request_body(["x"], num_inference_steps=0)).encode()
    post = (
        b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )
    answer = exchange(server.url, [post], read_s=30)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(
        b"HTTP/1.1 422 Unprocessable Entity: input_data.parameters.num_inference_steps"
    )
    assert b"x-sd-reason" not in rest.split(b"\r\n\r\n", 1)[0]
    assert exchange(server.url, [HEAD + b"Connection: close\r\n\r\n"]).startswith(b"HTTP/1.1 200 OK\r\n")
