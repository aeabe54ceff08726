"""The front door of a real `sd-endpoint serve` process against callers without a key: request heads
too large, clients that never read, clients that leave mid-body, costly bodies, long paths,
WebSocket upgrades and HTTP/0.9. Each is refused, counted and logged in one line, and the server
keeps answering its health probe."""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import threading
import time

import httpx
import pytest

from tests.helpers.processes import Server, server_fixture
from tests.helpers.servers import metric_value, request_body
from tests.helpers.sockets import connect, exchange

MAX_CONNECTIONS = 12  # room for the flood of eight costly bodies and the probe
SEND_TIMEOUT_S = 2
MAX_HEADER_COUNT = 50
MAX_HEADER_BYTES = 8192


server = server_fixture(
    "front-door",
    SD_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    SD_SEND_TIMEOUT_S=str(SEND_TIMEOUT_S),
    SD_MAX_HEADER_COUNT=str(MAX_HEADER_COUNT),
    SD_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
)


def metrics(server: Server) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=30).text


def requests_with(server: Server, status: int) -> float:
    text = metrics(server)
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("sd_requests_total{") and f'status="{status}"' in line
    )


def log_text(server: Server) -> str:
    return server.log_path.read_text(errors="replace")


def assert_no_error_logged(server: Server) -> None:
    text = log_text(server)
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]


HEAD = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n"


# -- 1. request heads over the limits: 431 before the app, counted ------------------------------------
@pytest.mark.parametrize(
    "pieces",
    [
        [HEAD + b"a:b\r\n" * 4_000 + b"\r\n"],  # many tiny headers
        [HEAD + b"a:b\r\n" * MAX_HEADER_COUNT + b"\r\n"],  # Host and these: one over the count
        [HEAD + b"x-big: " + b"v" * 20_000 + b"\r\n\r\n"],  # one huge value
        [b"GET /" + b"p" * 20_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"],  # a huge target
        [HEAD] + [b"a:b\r\n"] * 200,  # headers in separate sends, never ended
        [HEAD + b"a:b\n" * 4_000 + b"\n"],  # bare LF line ends
        [b"\r\n\r\n" + HEAD + b"a:b\r\n" * 4_000 + b"\r\n"],  # a blank line first, as if the head had ended
    ],
    ids=["count", "count+1", "value", "target", "split", "bare-lf", "leading-blank"],
)
def test_a_head_over_the_limits_is_431_and_closed_before_the_app(server: Server, pieces: list[bytes]) -> None:
    before = requests_with(server, 431)
    answer = exchange(server.url, pieces)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"header_fields_too_large" in answer and b"SD_MAX_HEADER_COUNT" in answer
    assert requests_with(server, 431) == before + 1
    assert metric_value(metrics(server), "sd_connections_closed_total", 'reason="header_limit"') >= 1
    assert httpx.get(f"{server.url}/health/live").status_code == 200


def test_heads_within_the_limits_are_served_whole_and_pipelined(server: Server) -> None:
    exactly = HEAD + b"a:b\r\n" * (MAX_HEADER_COUNT - 2) + b"Connection: close\r\n\r\n"  # with Host
    assert exchange(server.url, exactly).startswith(b"HTTP/1.1 200 ")
    # Pipelined requests whose heads and bodies together exceed the byte limit are each within it.
    body = json.dumps(request_body(["p" * 1500] * 3, num_inference_steps=1)).encode()
    one = (
        b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    answer = exchange(server.url, [one * 3 + HEAD + b"Connection: close\r\n\r\n"], read_s=120)
    assert answer.count(b"HTTP/1.1 200 ") == 4, answer[:300]


# -- 2. clients that never read: closed after SD_SEND_TIMEOUT_S, slots freed; the 503 counted -------
def test_clients_that_never_read_are_closed_and_their_slots_freed(server: Server) -> None:
    before_503 = requests_with(server, 503)
    held = []
    for _ in range(MAX_CONNECTIONS):  # one after another, each within the limit, so each is answered
        sock = connect(server.url)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.send(b"GET /ui HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 400)
        held.append(sock)
        time.sleep(0.1)
    try:
        # The readers that read nothing are closed SD_SEND_TIMEOUT_S after their buffers filled.
        deadline = time.monotonic() + SEND_TIMEOUT_S + 30
        closed = 0.0
        while closed < MAX_CONNECTIONS // 2:  # some readers may have been refused at the limit instead
            assert time.monotonic() < deadline, f"only {closed} of the readers were closed"
            time.sleep(0.5)
            with contextlib.suppress(httpx.HTTPError):  # the scrape itself may be refused meanwhile
                closed = metric_value(metrics(server), "sd_connections_closed_total", 'reason="send_timeout"')
        assert httpx.get(f"{server.url}/health/live", timeout=10).status_code == 200
    finally:
        for sock in held:
            sock.close()
    assert requests_with(server, 503) >= before_503
    assert "closed a connection whose client read none of its answer" in log_text(server)
    assert_no_error_logged(server)


def test_beyond_the_limit_new_requests_are_a_counted_json_503(server: Server) -> None:
    before_503 = requests_with(server, 503)
    held = [connect(server.url) for _ in range(MAX_CONNECTIONS)]
    try:
        answers = [exchange(server.url, HEAD + b"\r\n") for _ in range(3)]
    finally:
        for sock in held:
            sock.close()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"too_many_connections" in answer and b"retry-after: " in answer.lower()
        assert b"connection: close" in answer.lower()
    deadline = time.monotonic() + 10
    while requests_with(server, 503) < before_503 + 3:
        assert time.monotonic() < deadline, "the connection-limit 503s were not counted"
        time.sleep(0.2)
    assert "GET /health/live 503" in log_text(server)


# -- 3. a client that leaves before its body arrived: 499, INFO, never 500 ---------------------------
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"input',
        b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\n\r\n" + b" " * 2000,
        b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n10\r\n{"input_data":',
        b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n4\r\n{"in\r\nzz\r\n',
    ],
    ids=["score-short", "openai-short", "chunked-cut", "bad-chunk-size"],
)
def test_a_client_that_leaves_mid_body_is_a_499_not_a_500(server: Server, request_bytes: bytes) -> None:
    before_500, before_499 = requests_with(server, 500), requests_with(server, 499)
    with connect(server.url) as sock:
        sock.sendall(request_bytes)
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while requests_with(server, 499) == before_499:
        assert time.monotonic() < deadline, "the disconnect was not counted as 499"
        time.sleep(0.1)
    assert requests_with(server, 500) == before_500
    assert "client disconnected before its request was read" in log_text(server)
    assert_no_error_logged(server)


# -- 4. costly bodies: refused without stalling the health probe ---------------------------------------
def costly_bodies() -> list[bytes]:
    """Just under the 1 MiB body limit: 75,000 unknown keys (at the top, or in parameters), and
    300,000 rows that are not prompts."""
    keys = {f"k{i:05d}": 1 for i in range(75_000)}
    top = {"input_data": {"columns": ["prompt"], "data": ["a"]}, **keys}
    nested = {"input_data": {"columns": ["prompt"], "data": ["a"], "parameters": keys}}
    rows = {"input_data": {"columns": ["prompt"], "data": [1] * 300_000}}
    bodies = [json.dumps(body).encode() for body in (top, nested, rows)]
    assert all(900_000 < len(body) < 1_048_576 for body in bodies), [len(body) for body in bodies]
    return bodies


def test_costly_bodies_are_refused_while_health_keeps_answering(server: Server) -> None:
    bodies = costly_bodies()
    answers: list[httpx.Response] = []

    def post(body: bytes) -> None:
        headers = {"content-type": "application/json"}
        answers.append(httpx.post(f"{server.url}/score", content=body, headers=headers, timeout=120))

    flood = [threading.Thread(target=post, args=(bodies[i % 3],)) for i in range(8)]
    latencies = []
    for thread in flood:
        thread.start()
    while any(thread.is_alive() for thread in flood):
        started = time.perf_counter()
        assert httpx.get(f"{server.url}/health/live", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.02)
    for thread in flood:
        thread.join()
    assert [a.status_code for a in answers] == [422] * 8, [a.text[:200] for a in answers]
    assert "more than any valid request" in answers[0].json()["error"]["message"]
    # Before, the refusals ran on the event loop and the probe waited for seconds; a generous bound
    # for a shared 2-core machine, far from both the fix's few ms and those seconds.
    assert max(latencies) < 1.0, (statistics.median(latencies), max(latencies))


# -- 7. long request fields are cut in the log ----------------------------------------------------------
def test_a_long_path_is_cut_in_the_log_and_says_so(server: Server) -> None:
    before = server.log_path.stat().st_size
    with httpx.Client(timeout=30) as client:
        for length in (1_000, 4_000, 7_500):  # the head limit of this server is 8 KiB
            assert client.get(f"{server.url}/{'p' * length}").status_code == 404
    time.sleep(0.3)
    with server.log_path.open("rb") as log:
        log.seek(before)
        added = log.read().decode(errors="replace")
    lines = [line for line in added.splitlines() if "/ppp" in line]
    assert len(lines) == 3, lines
    assert all(len(line) < 600 and "more chars cut]" in line for line in lines), [len(x) for x in lines]
    assert len(added) < 3000


# -- 9. WebSocket upgrades and HTTP/0.9 ------------------------------------------------------------
@pytest.mark.parametrize("path", ["/ws", "/health/live", "/score"])
def test_a_websocket_upgrade_is_refused_logged_and_counted(server: Server, path: str) -> None:
    before = metric_value(metrics(server), "sd_requests_total", 'route="other",status="403"')
    handshake = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    answer = exchange(server.url, handshake)
    assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]
    assert metric_value(metrics(server), "sd_requests_total", 'route="other",status="403"') == before + 1
    assert f"GET {path} 403: WebSocket upgrade refused" in log_text(server)


@pytest.mark.parametrize("request_bytes", [b"GET /\r\n", b"GET /health/live\r\n\r\n", b"GET /metrics\n\n"])
def test_http_0_9_is_refused(server: Server, request_bytes: bytes) -> None:
    answer = exchange(server.url, request_bytes, read_s=5)
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"Healthy" not in answer and b"sd_requests_total" not in answer
