"""Connection limits of a real `sd-endpoint serve` process: idle and slow clients cannot hold
the server, and beyond SD_MAX_CONNECTIONS new work is refused with 503 at once."""

from __future__ import annotations

import contextlib
import socket
import time

import httpx

from tests.helpers.processes import Server, server_fixture
from tests.helpers.servers import request_body
from tests.helpers.sockets import connect

MAX_CONNECTIONS = 210
IDLE = 200
HEADER_TIMEOUT_S = 2


server = server_fixture(
    "connections",
    SD_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    SD_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
    SD_BODY_TIMEOUT_S="1",
)


def open_idle(url: str, count: int) -> list[socket.socket]:
    return [connect(url, timeout=10) for _ in range(count)]


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


def score(url: str) -> httpx.Response:
    return httpx.post(f"{url}/score", json=request_body(["still served"], num_inference_steps=1), timeout=60)


def test_idle_connections_neither_stop_real_requests_nor_stay_open(server: Server) -> None:
    idle = open_idle(server.url, IDLE)
    try:
        assert score(server.url).status_code == 200
        time.sleep(HEADER_TIMEOUT_S + 1)
        assert all(closed_by_server(sock) for sock in idle), "idle connections were left open"
        assert score(server.url).status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_beyond_max_connections_new_work_gets_503_until_the_idle_ones_are_dropped(server: Server) -> None:
    idle = open_idle(server.url, MAX_CONNECTIONS)
    try:
        refused = score(server.url)
        assert refused.status_code == 503
        time.sleep(HEADER_TIMEOUT_S + 1)  # the idle ones never sent headers: they are closed
        assert score(server.url).status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_a_body_sent_a_byte_at_a_time_is_cut_off_with_408(server: Server) -> None:
    (sock,) = open_idle(server.url, 1)
    with contextlib.closing(sock):
        sock.sendall(
            b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        started = time.monotonic()
        answer = b""
        sock.settimeout(0.3)
        while time.monotonic() - started < 10 and b"\r\n\r\n" not in answer:
            with contextlib.suppress(OSError):
                sock.sendall(b" ")
            with contextlib.suppress(TimeoutError):
                answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 5
    assert b"body_timeout" in answer or b"content-length" in answer.lower()
