"""Connection guards for `sd-endpoint serve`: uvicorn's HTTP protocol (httptools or h11, whichever
uvicorn would choose), with limits that hold before the app, and so before the key check.

- A request's headers must be complete within ``SD_HEADER_TIMEOUT_S`` of the connection opening
  (or of its previous answer), or the connection is closed: a flood of connections that send
  nothing, or a byte at a time, would otherwise hold every slot.
- A request's head (its line and headers) may hold at most ``SD_MAX_HEADER_COUNT`` lines and
  ``SD_MAX_HEADER_BYTES`` bytes: beyond either, 431 and the connection closed, counted, before the
  parser has kept what it read (httptools keeps every header it is sent, without limit).
- An answer the client does not read (its socket buffer full) for ``SD_SEND_TIMEOUT_S`` closes the
  connection, which frees its slot: clients that pipeline requests and never read would hold
  their slots forever.
- Beyond ``SD_MAX_CONNECTIONS`` open connections (or requests in progress), a request is answered
  503 by the app's own middleware (service/web/middleware.py), so that it is logged and counted like
  any other answer; uvicorn's own 503 is neither.

The body has its own deadline in the web layer (service/web/middleware.py, SD_BODY_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from service.runtime.metrics import Metrics
from service.settings import Settings
from service.web.errors import REASON_HEADER
from service.web.middleware import OVER_CAPACITY

log = logging.getLogger("service.access")

# The end of a request's head. llhttp and h11 also take bare LF line ends; either marker ends it.
_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")


def _base_protocol() -> type[Any]:
    """uvicorn's own choice for ``http="auto"``: httptools when installed, else h11."""
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    return H11Protocol


def refusal(status: int, phrase: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer in the app's error shape that closes the connection."""
    body = json.dumps({"error": {"code": code, "message": message, "status": status}}).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


_REASON_LINE = b"\r\n" + REASON_HEADER.encode() + b": "


def with_reason(data: bytes) -> bytes:
    """An answer's head with the reason phrase the app gave in ``REASON_HEADER`` (service/web/
    errors.py) as its status line's phrase, and without that header; anything else as it is.
    httptools' and h11's protocols both write a head (status line and headers) in one write."""
    start = data.find(_REASON_LINE) if data.startswith(b"HTTP/1.1 ") else -1
    head_end = data.find(b"\r\n\r\n")
    if start < 0 or start > head_end:
        return data
    end = data.index(b"\r\n", start + 2)
    phrase = data[start + len(_REASON_LINE) : end]
    status_end = data.index(b"\r\n")
    status = data[: len(b"HTTP/1.1 200")]
    return status + b" " + phrase + data[status_end:start] + data[end:]


class ReasonTransport:
    """The connection's transport, writing heads through ``with_reason``; the rest passes through."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        self._transport.write(with_reason(bytes(data)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def guarded_protocol(settings: Settings, metrics: Metrics, base: type[Any] | None = None) -> type[Any]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``; ``base`` picks the implementation
    (default: uvicorn's choice)."""
    base = base or _base_protocol()
    header_timeout_s = settings.header_timeout_s
    send_timeout_s = settings.send_timeout_s
    max_lines, max_bytes = settings.max_header_count, settings.max_header_bytes
    limit = settings.max_connections
    too_large = refusal(
        431, "Request Header Fields Too Large", "header_fields_too_large",
        f"the request's headers exceed {max_lines} lines or {max_bytes} bytes "
        "(SD_MAX_HEADER_COUNT, SD_MAX_HEADER_BYTES); send fewer or shorter headers",
    )  # fmt: skip

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _send_timer: asyncio.TimerHandle | None = None
        _send_pending = 0  # bytes buffered for the client when the send deadline was set
        _awaited: object = None  # the cycle in progress when the next head began to be awaited
        _head_bytes = 0
        _head_lines = 0
        _head_tail = b""  # the last bytes of the head so far: an end marker may span two reads
        _head_started = False  # whether the head has begun (blank lines before it do not count)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # uvicorn's own limit answers a bare, unlogged 503; the app answers ours (see module doc).
            self.limit_concurrency = None
            self.app: Any = self._within_limit(self.app)

        def _within_limit(self, app: Any) -> Any:
            connections, tasks = self.server_state.connections, self.server_state.tasks

            async def limited(scope: Any, receive: Any, send: Any) -> None:
                # This request's task is in ``tasks`` already; its connection in ``connections``.
                if len(connections) > limit or len(tasks) > limit:
                    scope[OVER_CAPACITY] = True
                await app(scope, receive, send)

            return limited

        # Every request cycle uvicorn creates passes here: with pipelining, httptools keeps only the
        # newest in ``cycle``, and a disconnect marks only that one, so the one still answering would
        # write on a closed transport (under uvloop: an ERROR traceback per request).
        _cycle: Any = None
        _live: tuple[Any, ...] = ()

        @property
        def cycle(self) -> Any:
            return self._cycle

        @cycle.setter
        def cycle(self, value: Any) -> None:
            self._cycle = value
            if value is not None:
                self._live = (*(c for c in self._live if not c.response_complete), value)

        def _disconnect_all(self) -> None:
            for cycle in self._live:
                if not cycle.response_complete:
                    cycle.disconnected = True
                    cycle.message_event.set()
            self._live = ()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(ReasonTransport(transport))
            self._arm()

        def data_received(self, data: bytes) -> None:
            # 1. Count the head of the next request, up to its end, before the parser keeps it. While
            # a request's body is arriving the bytes are body (a chunk that ends a body and begins
            # the next head is not counted: at most one read, bounded by the transport).
            before = self.cycle
            awaiting = before is None or not before.more_body
            end = self._head_end(data) if awaiting else -1
            if awaiting and not self._count(data if end < 0 else data[:end]):
                return
            super().data_received(data)
            # 2. A new request cycle exists once its headers are complete: the deadline is met, and
            # the next head is counted afresh.
            if self._header_timer is not None and self.cycle is not self._awaited:
                self._disarm()
            if self.cycle is not before:
                self._head_bytes = self._head_lines = 0
                self._head_tail = b""
                self._head_started = False

        def _head_end(self, data: bytes) -> int:
            """Where in ``data`` the awaited head ends (-1: not in it)."""
            if self._head_started:
                window, shift = self._head_tail + data, -len(self._head_tail)
            else:  # parsers skip blank lines before the request line: those end nothing
                lead = len(data) - len(data.lstrip(b"\r\n"))
                window, shift = data[lead:], lead
            found = [i for i in (window.find(marker) for marker in _HEAD_ENDS) if i >= 0]
            return max(min(found) + shift, 0) if found else -1

        def _count(self, part: bytes) -> bool:
            """Add ``part`` of the head; False (and the connection answered 431 and closed) beyond a limit."""
            self._head_bytes += len(part)
            self._head_lines += part.count(b"\n")
            self._head_tail = (self._head_tail + part)[-3:]
            self._head_started = self._head_started or bool(part.strip(b"\r\n"))
            if self._head_bytes <= max_bytes and self._head_lines <= max_lines:
                return True
            if not self.transport.is_closing():
                metrics.requests.labels(route="other", status="431").inc()
                metrics.connections_closed.labels(reason="header_limit").inc()
                log.info(
                    "431: a request's head over %d lines or %d bytes; connection closed", max_lines, max_bytes
                )
                self.transport.write(too_large)
                self.transport.close()
            return False

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.get_write_buffer_size():
                self._watch_send()  # an answer still unsent, perhaps with the connection closing after it
            if not self.transport.is_closing():
                self._arm()  # the next request's headers get the same deadline

        def pause_writing(self) -> None:
            super().pause_writing()
            self._watch_send()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._cancel_send_timer()
            self._disconnect_all()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._awaited = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _cancel_send_timer(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            # A pipelined request parsed already and still being answered is no slow head: its own
            # answer re-arms the deadline (on_response_complete).
            answering = self.cycle is not None and not self.cycle.response_complete
            if self.cycle is self._awaited and not answering and not self.transport.is_closing():
                metrics.connections_closed.labels(reason="header_timeout").inc()
                self.transport.close()

        def _watch_send(self) -> None:
            """Check in SD_SEND_TIMEOUT_S that the client has read some of what is buffered for it."""
            if self._send_timer is None:
                self._send_pending = self.transport.get_write_buffer_size()
                self._send_timer = self.loop.call_later(send_timeout_s, self._send_expired)

        def _send_expired(self) -> None:
            self._send_timer = None
            pending = self.transport.get_write_buffer_size()
            if pending == 0 and not self.flow.write_paused:
                return  # all sent
            if pending < self._send_pending:
                self._watch_send()  # the client reads, slowly: another deadline
                return
            # It read nothing for the whole deadline: drop what is buffered and the connection (a
            # close() would wait for the buffer to drain, which never happens; abort() does not).
            metrics.connections_closed.labels(reason="send_timeout").inc()
            self._disconnect_all()  # before abort(): the answers in progress must not write again
            log.info("closed a connection whose client read none of its answer for %g s (SD_SEND_TIMEOUT_S)",
                     send_timeout_s)  # fmt: skip
            self.transport.abort()

    return GuardedProtocol
