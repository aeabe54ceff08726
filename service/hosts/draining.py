"""uvicorn's server, except that the first SIGTERM or SIGINT drains before exiting.

uvicorn exits at the first signal and re-raises it afterwards (so the exit status says "killed").
Here the first signal turns readiness off and waits for requests in flight (Lifecycle.drain), then
exits normally with status 0. A second signal ends the process at once, with status 1: whoever
sends it wants no more waiting (not for connections, nor for the engine).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from types import FrameType
from typing import NoReturn

import uvicorn

from service.runtime.lifecycle import Lifecycle, Phase

log = logging.getLogger(__name__)

FORCED_EXIT_STATUS = 1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.load_failed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain: asyncio.Task[None] | None = None  # held so that the task is not collected

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self.should_exit:
            exit_now(FORCED_EXIT_STATUS, f"signal {sig} again: exiting now")
        if self._loop is None:
            super().handle_exit(sig, frame)
            return
        # Runs in the signal handler: hand the work to the event loop.
        log.info("signal %d: draining before exit", sig)
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.lifecycle.drain()
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        # A model that cannot load ends the process (status 1), so the orchestrator notices.
        if self.lifecycle.phase is Phase.FAILED:
            self.load_failed = True
            return True
        return await super().on_tick(counter)


def exit_now(code: int, reason: str) -> NoReturn:
    """End the process at once, without joining threads (logs flushed first)."""
    import logging
    import os

    logging.getLogger(__name__).warning("%s (exit %d)", reason, code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
