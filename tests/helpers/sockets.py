"""Raw sockets to a server under test, for what HTTP clients will not send: split, oversized or
pipelined request heads, and connections that are held open or never read."""

from __future__ import annotations

import contextlib
import socket


def connect(url: str, timeout: float = 30) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def exchange(url: str, data: bytes | list[bytes], read_s: float = 10) -> bytes:
    """Send ``data`` (pieces in turn), then read until the server closes or ``read_s`` pass."""
    answer = b""
    with connect(url) as sock:
        with contextlib.suppress(OSError):  # the server may close before everything was sent
            for piece in [data] if isinstance(data, bytes) else data:
                sock.sendall(piece)
        sock.settimeout(read_s)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer
