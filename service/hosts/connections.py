"""Connection guards for `sd-endpoint serve`: uvicorn's HTTP protocol, with a deadline for a
request's headers.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but gives a new connection,
or one sending its headers a byte at a time, all the time it likes; a flood of those would hold
every slot of ``limit_concurrency``. Here a connection must complete a request's headers within
``header_timeout_s`` of opening (or of its previous answer) or it is closed. The body has its own
deadline in the web layer (service/web/middleware.py, SD_BODY_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def _base_protocol() -> type[Any]:
    """uvicorn's own choice for ``http="auto"``: httptools when installed, else h11."""
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    return H11Protocol


def guarded_protocol(header_timeout_s: float) -> type[Any]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""
    base = _base_protocol()

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _awaited: object = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # A new request cycle exists once its headers are complete: the deadline is met.
            if self._header_timer is not None and self.cycle is not self._awaited:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers get the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._awaited = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self.cycle is self._awaited and not self.transport.is_closing():
                self.transport.close()

    return GuardedProtocol
