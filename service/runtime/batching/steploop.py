"""Step-level continuous batching: images join and leave the running batch between denoising steps.

One bounded queue (counted in images) in front of one loop per engine (a lane, lane.py: one per
device of SD_DEVICES), one future per image. Each iteration of a lane, in its engine's own
thread: cancel what left (a request that timed out or whose client went away), admit waiting
images oldest first while the running set has room (``max_batch_size`` images), advance every
running image one step (one UNet call per image size, whatever each image's steps, scheduler or
position), and retire the finished ones into a batched decode. An image arriving at an idle
engine starts at once; nothing waits for company.

With several engines, sleeping lanes are woken first when images arrive and share them out (so
the least loaded engines take new work); a busy lane takes images at its next step boundary only
while no engine is empty. An image stays on the engine that admitted it until it is done (or put
back).

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
  that engine out of rotation; when none is left, waiting images fail with 503.

Who runs when is decided by the scheduler (scheduler.py), which holds each image's state; this
module wires it to asyncio: futures, cancellation, waking the lanes, the queue's room.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

from model.types import GenerationItem, GenerationResult
from service.runtime.batching.lane import Lane, adapter_cap, fail
from service.runtime.batching.room import check_caller_room, check_room
from service.runtime.batching.scheduler import NO_ENGINE_LEFT, Image, Ready, Scheduler, always_ready
from service.runtime.engines import ServingEngine
from service.runtime.errors import NotReadyError, ShuttingDownError
from service.runtime.jobs import Job
from service.runtime.metrics import Metrics

__all__ = ["NO_ENGINE_LEFT", "EngineState", "StepLoop"]


@dataclass(frozen=True)
class EngineState:
    """One engine as /info shows it."""

    index: int
    device: str
    dtype: str
    running: int  # images it holds or admits now
    max_running: int  # its room now (less than SD_MAX_BATCH_SIZE after running out of memory)
    serving: bool
    failures: int  # failed steps in a row


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
        ready: Ready | None = None,
        max_images_per_caller: int | None = None,
        weights: Mapping[str, float] | None = None,
        max_groups: int = 4,
    ) -> None:
        """``threads``: each engine's own thread (engines.engine_thread), which its lane takes
        over; a lane makes one for an engine without. ``ready``: whether an image may be admitted
        on an engine now (scheduler.py; by default, once its LoRA adapters are on the engine's
        device); call ``poke`` when one becomes ready. ``max_images_per_caller``: one caller's
        images waiting or running at most (None: the queue's bound); ``weights``: callers' shares
        and ``max_groups``: UNet calls per step (scheduler.py)."""
        engines = list(engine) if isinstance(engine, Sequence) else [engine]
        given = list(threads) + [None] * (len(engines) - len(threads))
        self._max_queue_items = max_queue_items
        self._max_per_caller = max_images_per_caller
        self._metrics = metrics
        self.scheduler = Scheduler(
            len(engines),
            max_batch_size=max_batch_size,
            max_failures=max_failures,
            ready=ready or always_ready,
            adapter_caps=[adapter_cap(each) for each in engines],
            weights=weights,
            max_groups=max_groups,
        )
        self.lanes = [
            Lane(index, each, self.scheduler, metrics=metrics, wake=self.poke, thread=thread)
            for index, (each, thread) in enumerate(zip(engines, given, strict=True))
        ]
        self._closed = False
        metrics.engines_serving.set(len(self.lanes))

    def start(self) -> None:
        for lane in self.lanes:
            lane.start()

    @property
    def busy(self) -> bool:
        """True while an engine thread runs an iteration (which may be abandoned already)."""
        return any(lane.in_engine for lane in self.lanes)

    @property
    def serving(self) -> bool:
        """Whether any engine is still in rotation."""
        return bool(self.scheduler.serving)

    def engines(self) -> list[EngineState]:
        return [
            EngineState(
                lane.index,
                lane.engine.info.device,
                lane.engine.info.dtype,
                running=slot.held,
                max_running=slot.room,
                serving=slot.serving,
                failures=slot.failures,
            )
            for lane, slot in zip(self.lanes, self.scheduler.engines, strict=True)
        ]

    def submit(
        self, items: Sequence[GenerationItem], job: Job | None = None
    ) -> list[asyncio.Future[GenerationResult]]:
        """Queue ``items``; one future per item, in order. Raises QueueFullError when there is no room.
        With a ``job``, the lanes report each image's steps and previews to it (jobs.py)."""
        # 1. Refuse whole requests, never part of one.
        if not self._closed and not self.serving:
            raise NotReadyError(NO_ENGINE_LEFT)
        check_room(
            closed=self._closed, waiting=self.scheduler.waiting, incoming=len(items),
            max_queue_items=self._max_queue_items, metrics=self._metrics,
        )  # fmt: skip
        caller = job.owner if job is not None else ""
        if self._max_per_caller is not None:
            check_caller_room(
                held=self.scheduler.held_by(caller), incoming=len(items),
                max_images=self._max_per_caller, metrics=self._metrics,
            )  # fmt: skip
        # 2. Register each future before the image becomes visible to the lanes.
        loop, now = asyncio.get_running_loop(), time.monotonic()
        images = [
            Image(item, loop.create_future(), now, job, index, caller) for index, item in enumerate(items)
        ]
        if job is not None:
            job.images, job.core = images, self
            for image in images:
                image.preview_every = job.preview_every
        for image in images:
            image.future.add_done_callback(functools.partial(self._done, image))
        self.scheduler.add(images)
        self._metrics.queue_depth.set(self.scheduler.waiting)
        self.poke()
        return [image.future for image in images]

    # ----------------------------------------------------------------- commands of a job (jobs.Core)
    def finish_now(self, job: Job, images: list[int]) -> None:
        """End ``job``'s images of these indexes at their next step, with what they have."""
        self.scheduler.finish([cast(Image, job.images[index]) for index in images])
        self.poke()

    def ask_preview(self, job: Job) -> None:
        """A preview of ``job``'s running images at their engines' next step boundary."""
        self.scheduler.ask_preview([cast(Image, image) for image in job.images])
        self.poke()

    def poke(self) -> None:
        """Images are waiting or became ready: wake the sleeping lanes (they share them out), and
        tell the busy ones the scheduler wants a new plan from (they hand back at their next step)."""
        for lane in self.lanes:
            if lane.serving and lane.asleep:
                lane.arrival.set()
            elif lane.serving and self.scheduler.wants_plan(lane.index):
                lane.attention.set()

    def _done(self, image: Image, _: object = None) -> None:
        """An image's future is done: a cancelled one leaves the queue now, or its engine next step."""
        if image.future.cancelled():
            self.scheduler.cancel(image)
            self._metrics.queue_depth.set(self.scheduler.waiting)
            self.poke()

    # ----------------------------------------------------------------- stop
    def abandon(self, error: BaseException) -> None:
        """Fail every waiting and running image with ``error`` now (the drain ran out of time);
        running images leave their engine at its next iteration."""
        self._closed = True
        fail(self.scheduler.abandon(), error)
        self._metrics.queue_depth.set(0)

    async def close(self) -> None:
        """Fail what is left and stop the lanes. An iteration in progress is not waited for."""
        self.abandon(ShuttingDownError("the server shut down before this image was done"))
        await asyncio.gather(*(lane.close() for lane in self.lanes))
