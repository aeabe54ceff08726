"""Dynamic batching: images of concurrent requests that share a batch key go to the engine together.

One bounded queue (counted in images), one worker per engine, one future per image. The worker
takes the oldest waiting image, waits up to ``max_wait_s`` (counted from when that image arrived)
for more images with its batch key, and runs up to ``max_batch_size`` of them in the engine's own
thread, so the event loop keeps serving. A request that gives up (timeout, disconnect) cancels its
futures, which takes its images out of the queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from model.types import BatchKey, GenerationItem, GenerationResult
from service.runtime.batching.oom import generate_isolating_failures
from service.runtime.batching.room import check_room
from service.runtime.engines import ServingEngine, engine_thread
from service.runtime.errors import ShuttingDownError
from service.runtime.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Waiting:
    item: GenerationItem
    future: asyncio.Future[GenerationResult]
    arrived: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> BatchKey:
        return self.item.batch_key


class Batcher:
    def __init__(
        self,
        engine: ServingEngine,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_items: int,
        metrics: Metrics,
        thread: ThreadPoolExecutor | None = None,
    ) -> None:
        self._engine = engine
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queue_items = max_queue_items
        self._metrics = metrics
        self._queue: deque[_Waiting] = deque()
        self._arrivals = asyncio.Event()
        # The engine's one thread (engines.engine_thread; given: the one it was loaded and warmed up
        # in, owned from now on): one batch at a time keeps the GPU saturated.
        self._engine_thread = thread or engine_thread(0)
        self._worker: asyncio.Task[None] | None = None
        self._running: list[_Waiting] = []  # the batch in the engine now
        self._closed = False

    @property
    def busy(self) -> bool:
        """True while the engine thread runs a batch (which may be abandoned already)."""
        return bool(self._running)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    def submit(self, items: Sequence[GenerationItem]) -> list[asyncio.Future[GenerationResult]]:
        """Queue ``items``; one future per item, in order. Raises QueueFullError when there is no room."""
        # 1. Refuse whole requests, never part of one, so the queue never holds half a request.
        check_room(
            closed=self._closed, waiting=len(self._queue), incoming=len(items),
            max_queue_items=self._max_queue_items, metrics=self._metrics,
        )  # fmt: skip
        # 2. Register each future before the item becomes visible to the worker.
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[GenerationResult]] = []
        for item in items:
            waiting = _Waiting(item, loop.create_future())
            waiting.future.add_done_callback(functools.partial(self._forget, waiting))
            self._queue.append(waiting)
            futures.append(waiting.future)
        self._metrics.queue_depth.set(len(self._queue))
        self._arrivals.set()
        return futures

    def _forget(self, waiting: _Waiting, _: object = None) -> None:
        """A future finished: if it was cancelled while still queued, free its place now."""
        if waiting.future.cancelled():
            try:
                self._queue.remove(waiting)
            except ValueError:
                return  # already taken into a batch
            self._metrics.queue_depth.set(len(self._queue))

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                self._fail(batch, ShuttingDownError("the server shut down before this image was done"))
                raise
            except Exception as error:  # the whole batch failed: every request in it gets the error
                self._fail(batch, error)

    async def _next_batch(self) -> list[_Waiting]:
        while True:
            # 1. Wait for any image.
            while not self._queue:
                self._arrivals.clear()
                await self._arrivals.wait()
            # 2. Wait for company for the oldest image, until the batch is full or its wait is over.
            head = self._queue[0]
            if head.future.done():  # cancelled an instant ago; its callback has not run yet
                self._queue.popleft()
                continue
            deadline = head.arrived + self._max_wait_s
            same_key = [w for w in self._queue if w.key == head.key and not w.future.done()]
            if len(same_key) >= self._max_batch_size or time.monotonic() >= deadline:
                break
            self._arrivals.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrivals.wait(), deadline - time.monotonic())
        # 3. Take the batch out of the queue, oldest first.
        batch = same_key[: self._max_batch_size]
        for waiting in batch:
            self._queue.remove(waiting)
        self._metrics.queue_depth.set(len(self._queue))
        now = time.monotonic()
        for waiting in batch:
            self._metrics.queue_wait.observe(now - waiting.arrived)
        return batch

    async def _run(self, batch: list[_Waiting]) -> None:
        items = [waiting.item for waiting in batch]
        self._metrics.batch_size.observe(len(items))
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        engine_call = loop.run_in_executor(
            self._engine_thread, generate_isolating_failures, self._engine, items
        )
        running = self._running = list(batch)
        engine_call.add_done_callback(lambda _: self._stopped_running(running))
        try:
            outcomes = await asyncio.shield(engine_call)  # cancelling the worker must not hide the call
        finally:
            self._metrics.engine_batch_seconds.observe(time.monotonic() - started)
        for waiting, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):  # this item failed alone: only its request fails
                self._fail([waiting], outcome)
                continue
            self._metrics.images_generated.inc()
            if outcome.nsfw_content_detected:
                self._metrics.images_flagged.inc()
            if not waiting.future.done():  # done when its request gave up meanwhile
                waiting.future.set_result(outcome)

    @staticmethod
    def _fail(batch: list[_Waiting], error: BaseException) -> None:
        for waiting in batch:
            if not waiting.future.done():
                waiting.future.set_exception(error)

    def _stopped_running(self, batch: list[_Waiting]) -> None:
        if self._running is batch:
            self._running = []

    def abandon(self, error: BaseException) -> None:
        """Fail every queued image and every image of the batch in the engine with ``error`` now
        (the drain ran out of time); the engine call itself runs on, and its results are dropped."""
        self._closed = True
        queued, self._queue = list(self._queue), deque()
        self._fail([*queued, *self._running], error)
        self._metrics.queue_depth.set(0)

    async def close(self) -> None:
        """Fail what is still queued and stop the worker. The engine call in progress, if any, is
        not waited for: nobody waits for its images (``busy`` tells whether one is left)."""
        self.abandon(ShuttingDownError("the server shut down before this image was done"))
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._engine_thread.shutdown(wait=False, cancel_futures=True)
