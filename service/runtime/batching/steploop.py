"""The engine core: step-level continuous batching over every engine of the server.

One core for all engines (vLLM's EngineCore, TEI's queue actor): the event loop is its one
thread, and the scheduler (scheduler.py) the one owner of every image's state and of what is on
each device. Everything else sends it commands, on the event loop: ``submit`` (add), a future's
cancellation (cancel), ``finish_now`` (A1111's interrupt and skip), ``ask_preview`` (a progress
poll), a lane's report of a step or of an adapter file read. One core rather than one per engine
behind a dispatcher, because placement is a decision over all engines at once: the fair share
per caller (fairness.py) and adapter affinity (residency.py) need the whole queue and every
device's residency, and a second-level dispatcher would have to mirror both.

Each engine has a lane (lane.py): at each step boundary it asks the scheduler for a plan (what to
drop, end, read, evict, install, admit, which images step and which preview), carries it out in
the engine's own thread, and hands the output back (steps and their times, previews, finished
images, failures); the scheduler's update says which futures to resolve. The engine thread reads
nothing of the scheduler's: it steps on without a round trip for as long as its plan holds, and
between steps looks at one flag (``Lane.attention``), which the core sets when a command concerns
that engine (an image could join, one left, an interrupt, a preview, an adapter read).

As a user sees it:
- an image arriving at an idle engine starts at once; nothing waits for company. Every running
  image advances one step per iteration (one UNet call per image size and adapter set, whatever
  each image's steps, scheduler or position), and finished ones leave into a batched decode;
- admission is fair between callers (API keys) and FIFO within one: a request's images are
  queued together and admitted one by one as room frees (``max_batch_size`` images per engine),
  so a caller's 4-image request is never overtaken by its own later single images, and another
  caller's single image is not stuck behind a flood (it joins a full engine, and the step's cost
  is capped so it runs near its speed alone while the flood's other images pause);
- with several engines, sleeping lanes are woken first when images arrive and share them out; a
  busy lane takes images at its next step boundary only while no engine that could run them is
  empty; an image stays on the engine that admitted it until it is done (or put back);
- one bounded queue (counted in images), and per caller a bound on images waiting or running.

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
from service.runtime.batching.lane import Lane, fail
from service.runtime.batching.residency import adapter_placement, model_placement
from service.runtime.batching.room import caller_bound, check_room, queue_bound
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
            adapter_caps=[adapter_placement(each) for each in engines],
            models=[model_placement(each) for each in engines],
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
        caller = job.owner if job is not None else ""
        bounds = [queue_bound(self.scheduler.waiting, self._max_queue_items)]
        if self._max_per_caller is not None:
            bounds.append(caller_bound(self.scheduler.held_by(caller), self._max_per_caller))
        check_room(closed=self._closed, incoming=len(items), bounds=bounds, metrics=self._metrics)
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
        self.scheduler.ask_preview([cast(Image, image) for image in job.images], time.monotonic())
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
