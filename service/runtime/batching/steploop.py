"""Step-level continuous batching: images join and leave the running set between denoising steps.

One bounded queue (counted in images), one loop per engine, one future per image. Each iteration
of the loop, in the engine's own thread: cancel what left (a request that timed out or whose
client went away), admit waiting images oldest first while the running set has room
(``max_batch_size`` images), advance every running image one step (one UNet call per image size,
whatever each image's steps, scheduler or position), and retire the finished ones into a batched
decode. An image arriving at an idle engine starts at once; nothing waits for company.

Admission is FIFO by image: a request's images are queued together and admitted one by one, in
order, as room frees, so a 4-image request is never overtaken by later single images (they queue
behind its last image) and, when the set is nearly full, its first images already start.

Failures stay with their image:
- a failed ``admit`` (the engine refuses the item) fails that image only;
- out of memory in a step shrinks the set: the most recently admitted images go back to the
  front of the queue (they restart from step 0 when readmitted; their seeds make the same
  image) and the room grows again by one image per image retired; an image that does not fit
  alone fails with EngineOutOfMemoryError (503);
- any other failure in a step restarts every running image under suspicion: each then runs
  alone, so only the image that fails alone fails (500).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from model.errors import EngineOutOfMemoryError
from model.types import GenerationItem, GenerationResult
from service.runtime.engines import ServingEngine
from service.runtime.errors import ContractError, QueueFullError, ShuttingDownError
from service.runtime.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Image:
    item: GenerationItem
    future: asyncio.Future[GenerationResult]
    arrived: float = field(default_factory=time.monotonic)
    handle: int | None = None  # set while the engine holds it
    suspect: bool = False  # was running when a step failed: runs alone from now on
    first_step: bool = True


@dataclass
class _Outcome:
    """What one iteration in the engine thread did."""

    admitted: list[tuple[_Image, int]] = field(default_factory=list)
    refused: list[tuple[_Image, Exception]] = field(default_factory=list)
    results: list[tuple[int, GenerationResult | Exception]] = field(default_factory=list)
    step_error: Exception | None = None
    stepped: int = 0
    seconds: float = 0.0


class StepLoop:
    def __init__(
        self,
        engine: ServingEngine,
        *,
        max_batch_size: int,
        max_queue_items: int,
        metrics: Metrics,
    ) -> None:
        self._engine = engine
        self._max_batch_size = max_batch_size
        self._max_queue_items = max_queue_items
        self._metrics = metrics
        self._waiting: deque[_Image] = deque()
        self._running: dict[int, _Image] = {}
        self._leaving: set[int] = set()  # handles whose futures are done: cancel at the next step
        self._admitting: list[_Image] = []  # taken from the queue, being admitted in the engine now
        self._room = max_batch_size  # shrinks after out of memory, grows back as images finish
        self._arrivals = asyncio.Event()
        # One thread: the engine is not re-entrant; every engine call of an iteration runs there.
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._worker: asyncio.Task[None] | None = None
        self._in_engine = False
        self._closed = False

    # ----------------------------------------------------------------- the queue
    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="step-loop")

    @property
    def busy(self) -> bool:
        """True while the engine thread runs an iteration (which may be abandoned already)."""
        return self._in_engine

    def submit(self, items: Sequence[GenerationItem]) -> list[asyncio.Future[GenerationResult]]:
        """Queue ``items``; one future per item, in order. Raises QueueFullError when there is no room."""
        # 1. Refuse whole requests, never part of one.
        if self._closed:
            raise ShuttingDownError("the server is shutting down; send the request to another instance")
        if len(items) > self._max_queue_items:  # would never fit: a 429 would be retried forever
            raise ContractError(
                f"the request asks for {len(items)} images; this server queues at most "
                f"{self._max_queue_items} at once (SD_MAX_QUEUE_ITEMS): send fewer prompts or images"
            )
        if len(self._waiting) + len(items) > self._max_queue_items:
            self._metrics.rejections.inc()
            raise QueueFullError(
                f"the queue is full ({len(self._waiting)} of {self._max_queue_items} images waiting); "
                "retry after the Retry-After seconds"
            )
        # 2. Register each future before the image becomes visible to the loop.
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[GenerationResult]] = []
        for item in items:
            image = _Image(item, loop.create_future())
            image.future.add_done_callback(functools.partial(self._left, image))
            self._waiting.append(image)
            futures.append(image.future)
        self._metrics.queue_depth.set(len(self._waiting))
        self._arrivals.set()
        return futures

    def _left(self, image: _Image, _: object = None) -> None:
        """An image's future is done: a cancelled one leaves the queue now, or the engine next step."""
        if not image.future.cancelled():
            return
        try:
            self._waiting.remove(image)
            self._metrics.queue_depth.set(len(self._waiting))
        except ValueError:
            if image.handle is not None and image.handle in self._running:
                self._leaving.add(image.handle)

    # ----------------------------------------------------------------- the loop
    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # 1. Idle: sleep until an image arrives.
            while not self._waiting and not self._running:
                self._arrivals.clear()
                await self._arrivals.wait()
            # 2. One iteration in the engine thread: leave, admit, step, retire.
            leaving = self._take_leaving()
            admitting = self._admitting = self._take_admissions()
            self._metrics.running_images.set(len(self._running) + len(admitting))
            self._in_engine = True
            try:
                outcome = await asyncio.shield(
                    loop.run_in_executor(self._engine_thread, self._iterate, leaving, admitting)
                )
            except asyncio.CancelledError:
                self._in_engine = False
                self._fail([*admitting, *self._running.values()], ShuttingDownError(
                    "the server shut down before this image was done"
                ))  # fmt: skip
                raise
            self._in_engine = False
            self._admitting = []
            # 3. Hand out what it did.
            self._apply(admitting, outcome)

    def _take_leaving(self) -> list[int]:
        """Handles to drop: cancelled images, and any image whose future was failed meanwhile."""
        leaving = self._leaving | {h for h, image in self._running.items() if image.future.done()}
        self._leaving = set()
        for handle in leaving:
            if handle in self._running:
                del self._running[handle]
        return sorted(leaving)

    def _take_admissions(self) -> list[_Image]:
        """Waiting images to admit now: oldest first while there is room; a suspect runs alone."""
        if any(image.suspect for image in self._running.values()):
            return []
        admitting: list[_Image] = []
        while self._waiting and len(self._running) + len(admitting) < self._room:
            head = self._waiting[0]
            if head.future.done():  # cancelled an instant ago; its callback has not run yet
                self._waiting.popleft()
                continue
            if head.suspect and (self._running or admitting):
                break
            admitting.append(self._waiting.popleft())
            if head.suspect:
                break
        if admitting:
            self._metrics.queue_depth.set(len(self._waiting))
            now = time.monotonic()
            for image in admitting:
                self._metrics.queue_wait.observe(now - image.arrived)
        return admitting

    def _iterate(self, leaving: list[int], admitting: list[_Image]) -> _Outcome:
        """In the engine thread: cancel, admit, one step, retire. Never raises for engine errors."""
        engine, outcome = self._engine, _Outcome()
        started = time.perf_counter()
        for handle in leaving:
            engine.cancel(handle)
        for image in admitting:
            try:
                outcome.admitted.append((image, engine.admit(image.item)))
            except Exception as error:  # this item only: the engine cannot take it
                outcome.refused.append((image, error))
        running = len(self._running) + len(outcome.admitted)
        if running:
            try:
                finished = engine.step()
            except Exception as error:  # nothing advanced: the loop decides who leaves
                outcome.step_error = error
                return outcome
            outcome.stepped = running
            if finished:
                outcome.results = self._retire(finished)
        outcome.seconds = time.perf_counter() - started
        return outcome

    def _retire(self, handles: list[int]) -> list[tuple[int, GenerationResult | Exception]]:
        """Decode the finished images together; on failure one by one, so each gets its own outcome."""
        try:
            return list(zip(handles, self._engine.retire(handles), strict=True))
        except Exception:
            if len(handles) == 1:
                raise
        outcomes: list[tuple[int, GenerationResult | Exception]] = []
        for handle in handles:
            try:
                outcomes += zip([handle], self._engine.retire([handle]), strict=True)
            except Exception as error:
                outcomes.append((handle, error))
        return outcomes

    def _apply(self, admitting: list[_Image], outcome: _Outcome) -> None:
        # 1. Admissions: the engine holds these now (an image cancelled meanwhile leaves next step).
        for image, handle in outcome.admitted:
            image.handle = handle
            self._running[handle] = image
            if image.future.done():
                self._leaving.add(handle)
        for image, error in outcome.refused:
            self._fail([image], error)
        self._metrics.admitted_per_step.observe(len(outcome.admitted))
        # 2. A failed step: nothing advanced; shrink or isolate, then go round again.
        if outcome.step_error is not None:
            self._recover(outcome.step_error)
            return
        # 3. A step happened: first-step times, step metrics, finished images out.
        now = time.monotonic()
        for image in self._running.values():
            if image.first_step:
                image.first_step = False
                self._metrics.first_step_wait.observe(now - image.arrived)
        if outcome.stepped:
            self._metrics.step_seconds.observe(outcome.seconds)
            self._metrics.batch_size.observe(outcome.stepped)
        for handle, result in outcome.results:
            if handle not in self._running:
                continue
            image = self._running.pop(handle)
            if isinstance(result, Exception):
                self._fail([image], result)
                continue
            self._room = min(self._room + 1, self._max_batch_size)
            self._metrics.images_generated.inc()
            if result.nsfw_content_detected:
                self._metrics.images_flagged.inc()
            if not image.future.done():
                image.future.set_result(result)
        self._metrics.running_images.set(len(self._running))

    def _recover(self, error: Exception) -> None:
        """After a failed step (the engine state unchanged): who goes back to the queue, who fails."""
        running = sorted(self._running.values(), key=lambda image: image.handle or 0)
        if len(running) == 1:
            self._drop(running, requeue=False)
            self._fail(running, error)
            return
        if isinstance(error, EngineOutOfMemoryError):
            # The newest half goes back to the front of the queue; the room shrinks to what is left.
            keep = len(running) // 2
            evicted = running[keep:]
            self._room = max(keep, 1)
            log.warning("out of memory at %d images: %d go back to the queue", len(running), len(evicted))
            self._drop(evicted, requeue=True)
            return
        # Anything else: one of them may be the cause. Each runs again, alone.
        log.warning("a step of %d images failed (%s); running each alone", len(running), type(error).__name__)
        for image in running:
            image.suspect = True
        self._drop(running, requeue=True)

    def _drop(self, images: list[_Image], *, requeue: bool) -> None:
        """Take ``images`` out of the engine (at the next iteration); requeued ones go first."""
        for image in images:
            if image.handle is not None:
                if image.handle in self._running:
                    del self._running[image.handle]
                self._leaving.add(image.handle)
                image.handle = None
            image.first_step = True
        if requeue:
            self._waiting.extendleft(reversed([image for image in images if not image.future.done()]))
            self._metrics.queue_depth.set(len(self._waiting))
        self._metrics.running_images.set(len(self._running))

    @staticmethod
    def _fail(images: Sequence[_Image], error: BaseException) -> None:
        for image in images:
            if not image.future.done():
                image.future.set_exception(error)

    # ----------------------------------------------------------------- stop
    def abandon(self, error: BaseException) -> None:
        """Fail every waiting and running image with ``error`` now (the drain ran out of time);
        running images leave the engine at its next iteration."""
        self._closed = True
        waiting, self._waiting = list(self._waiting), deque()
        self._fail([*waiting, *self._admitting, *self._running.values()], error)
        self._metrics.queue_depth.set(0)

    async def close(self) -> None:
        """Fail what is left and stop the loop. An iteration in progress is not waited for."""
        self.abandon(ShuttingDownError("the server shut down before this image was done"))
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._engine_thread.shutdown(wait=False, cancel_futures=True)
