"""Step-level continuous batching: images join and leave the running set between denoising steps.

One bounded queue (counted in images) in front of one loop per engine (a lane, lane.py: one per
device of SD_DEVICES), one future per image. Each iteration of a lane, in its engine's own
thread: cancel what left (a request that timed out or whose client went away), admit waiting
images oldest first while the running set has room (``max_batch_size`` images), advance every
running image one step (one UNet call per image size, whatever each image's steps, scheduler or
position), and retire the finished ones into a batched decode. An image arriving at an idle
engine starts at once; nothing waits for company.

With several engines, idle lanes are woken first when images arrive and share them out (so the
least loaded engines take new work); a busy lane takes images at its next step boundary only while
no lane is idle. An image stays on the engine that admitted it until it is done (or put back).

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
  alone, so only the image that fails alone fails (500);
- steps of one engine that keep failing (SD_ENGINE_MAX_FAILURES in a row, not out of memory) take
  that engine out of rotation (lane.py); when none is left, waiting images fail with 503.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from model.types import GenerationItem, GenerationResult
from service.runtime.batching.lane import Image, Lane, fail
from service.runtime.batching.room import check_room
from service.runtime.engines import ServingEngine
from service.runtime.errors import NotReadyError, ShuttingDownError
from service.runtime.jobs import Job
from service.runtime.metrics import Metrics

log = logging.getLogger(__name__)

NO_ENGINE_LEFT = "every engine of this server failed and was taken out of rotation; restart the server"


class StepLoop:
    def __init__(
        self,
        engine: ServingEngine | Sequence[ServingEngine],
        *,
        max_batch_size: int,
        max_queue_items: int,
        metrics: Metrics,
        max_failures: int = 3,
        threads: Sequence[ThreadPoolExecutor] = (),
    ) -> None:
        """``threads``: each engine's own thread (engines.engine_thread), which its lane takes
        over; a lane makes one for an engine without."""
        engines = list(engine) if isinstance(engine, Sequence) else [engine]
        given = list(threads) + [None] * (len(engines) - len(threads))
        self._max_queue_items = max_queue_items
        self._metrics = metrics
        self._waiting: deque[Image] = deque()
        self.lanes = [
            Lane(
                index,
                each,
                self,
                max_batch_size=max_batch_size,
                max_failures=max_failures,
                metrics=metrics,
                thread=thread,
            )
            for index, (each, thread) in enumerate(zip(engines, given, strict=True))
        ]
        self._holder: dict[int, Lane] = {}  # id(image) -> the lane that holds it (for cancellation)
        self._suspected_by: dict[int, int] = {}  # id(image) -> the lane whose failed step requeued it
        self._closed = False
        metrics.engines_serving.set(len(self.lanes))

    # ----------------------------------------------------------------- the queue
    def start(self) -> None:
        for lane in self.lanes:
            lane.start()

    @property
    def busy(self) -> bool:
        """True while an engine thread runs an iteration (which may be abandoned already)."""
        return any(lane.in_engine for lane in self.lanes)

    @property
    def serving(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.serving]

    def submit(
        self, items: Sequence[GenerationItem], job: Job | None = None
    ) -> list[asyncio.Future[GenerationResult]]:
        """Queue ``items``; one future per item, in order. Raises QueueFullError when there is no room.
        With a ``job``, the lanes report each image's steps and previews to it (jobs.py)."""
        # 1. Refuse whole requests, never part of one.
        if not self._closed and not self.serving:
            raise NotReadyError(NO_ENGINE_LEFT)
        check_room(
            closed=self._closed, waiting=len(self._waiting), incoming=len(items),
            max_queue_items=self._max_queue_items, metrics=self._metrics,
        )  # fmt: skip
        # 2. Register each future before the image becomes visible to the lanes.
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[GenerationResult]] = []
        for index, item in enumerate(items):
            image = Image(item, loop.create_future(), job=job, index=index)
            image.future.add_done_callback(functools.partial(self._left, image))
            self._waiting.append(image)
            futures.append(image.future)
        self._metrics.queue_depth.set(len(self._waiting))
        self._wake()
        return futures

    def _wake(self) -> None:
        """Images are waiting: idle lanes first (they share them out; busy ones take at their next step)."""
        for lane in self.lanes:
            if lane.serving and lane.idle:
                lane.arrival.set()

    def _left(self, image: Image, _: object = None) -> None:
        """An image's future is done: a cancelled one leaves the queue now, or its engine next step."""
        lane = self._holder.pop(id(image), None)
        self._suspected_by.pop(id(image), None)
        if not image.future.cancelled():
            return
        try:
            self._waiting.remove(image)
            self._metrics.queue_depth.set(len(self._waiting))
        except ValueError:
            if lane is not None:
                lane.left(image)

    # ----------------------------------------------------------------- what the lanes ask
    async def wait_for_work(self, lane: Lane) -> None:
        lane.idle = True
        try:
            while not self._waiting:
                lane.arrival.clear()
                await lane.arrival.wait()
        finally:
            lane.idle = False

    def has_waiting(self) -> bool:
        """Whether images wait (read from engine threads: one length read)."""
        return bool(self._waiting)

    def take(self, lane: Lane) -> list[Image]:
        """Waiting images for ``lane`` to admit now: oldest first while it has room; a suspect runs
        alone; while other lanes are idle, a busy lane leaves the images to them and an idle one
        takes its share."""
        if lane.has_suspect:
            return []
        # An idle lane holds nothing: asleep, just woken, or not started yet; it comes to take soon.
        others_idle = sum(1 for other in self.lanes if other is not lane and other.serving and not other.load)
        if others_idle and lane.running:
            return []
        share = math.ceil(len(self._waiting) / (others_idle + 1))
        admitting: list[Image] = []
        while self._waiting and len(lane.running) + len(admitting) < lane.room and len(admitting) < share:
            head = self._waiting[0]
            if head.future.done():  # cancelled an instant ago; its callback has not run yet
                self._waiting.popleft()
                continue
            if head.suspect and (lane.running or admitting):
                break
            if not lane.adapters_ready(head.item):
                break  # its adapters are being read; it keeps its place (FIFO)
            admitting.append(self._waiting.popleft())
            self._holder[id(head)] = lane
            self._suspected_by.pop(id(head), None)
            if head.suspect:
                break
        if admitting:
            self._metrics.queue_depth.set(len(self._waiting))
            now = time.monotonic()
            for image in admitting:
                self._metrics.queue_wait.observe(now - image.arrived)
        return admitting

    def requeue(self, images: list[Image]) -> None:
        """Back to the front of the queue, in order (out of memory, or to run alone)."""
        for image in images:
            lane = self._holder.pop(id(image), None)
            if image.suspect and lane is not None:
                self._suspected_by[id(image)] = lane.index
        self._waiting.extendleft(reversed(images))
        self._metrics.queue_depth.set(len(self._waiting))
        if images:
            self._wake()

    def lane_down(self, lane: Lane) -> None:
        """``lane`` left the rotation: the images its failed steps put back were not to blame (its
        device was), so they run in company again on the others."""
        self._metrics.engines_serving.set(len(self.serving))
        for image in self._waiting:
            if self._suspected_by.get(id(image)) == lane.index:
                image.suspect = False
                del self._suspected_by[id(image)]
        if not self.serving:
            log.error("no engine is left in rotation: %s", NO_ENGINE_LEFT)
            waiting, self._waiting = list(self._waiting), deque()
            fail(waiting, NotReadyError(NO_ENGINE_LEFT))
            self._metrics.queue_depth.set(0)

    # ----------------------------------------------------------------- stop
    def abandon(self, error: BaseException) -> None:
        """Fail every waiting and running image with ``error`` now (the drain ran out of time);
        running images leave their engine at its next iteration."""
        self._closed = True
        waiting, self._waiting = list(self._waiting), deque()
        fail(waiting, error)
        for lane in self.lanes:
            lane.abandon(error)
        self._metrics.queue_depth.set(0)

    async def close(self) -> None:
        """Fail what is left and stop the lanes. An iteration in progress is not waited for."""
        self.abandon(ShuttingDownError("the server shut down before this image was done"))
        await asyncio.gather(*(lane.close() for lane in self.lanes))
