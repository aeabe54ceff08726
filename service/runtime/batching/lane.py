"""One engine's step loop (a lane): it takes images from the shared queue (steploop.py) at its
step boundaries while it has room, steps them in the engine's own thread, and hands out results.

Failures stay with their image (see steploop.py); a lane whose steps keep failing (not out of
memory: ``max_failures`` in a row, SD_ENGINE_MAX_FAILURES) is a failed device: its running images
fail (500 engine_failure), it is taken out of rotation with a loud log line, and the other lanes
keep serving. Images it had put back in the queue to run alone go to the other lanes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from model.errors import EngineOutOfMemoryError
from model.types import GenerationItem, GenerationResult
from service.runtime.engines import FollowableEngine, ServingEngine, engine_thread
from service.runtime.errors import ShuttingDownError
from service.runtime.jobs import Job
from service.runtime.metrics import Metrics

log = logging.getLogger(__name__)
ADAPTER_WAIT_S = 0.5  # an idle lane waits this long at most for an adapter file, then looks again


@dataclass(eq=False)
class Image:
    item: GenerationItem
    future: asyncio.Future[GenerationResult]
    arrived: float = field(default_factory=time.monotonic)
    handle: int | None = None  # set while an engine holds it
    suspect: bool = False  # was running when a step failed: runs alone from now on
    first_step: bool = True
    job: Job | None = None  # the request it belongs to, when someone follows it (jobs.py)
    index: int = 0  # its place in the job


@dataclass
class _Outcome:
    """What one iteration in the engine thread did."""

    admitted: list[tuple[Image, int]] = field(default_factory=list)
    refused: list[tuple[Image, Exception]] = field(default_factory=list)
    results: list[tuple[int, GenerationResult | Exception]] = field(default_factory=list)
    step_error: Exception | None = None
    steps: list[tuple[int, float]] = field(default_factory=list)  # (images, seconds) of each step
    first_step_done: float | None = None  # monotonic time at the end of the iteration's first step


class ImageSource(Protocol):
    """The shared queue, as a lane sees it."""

    async def wait_for_work(self, lane: Lane) -> None: ...

    def take(self, lane: Lane) -> list[Image]: ...

    def requeue(self, images: list[Image]) -> None: ...

    def has_waiting(self) -> bool: ...

    def lane_down(self, lane: Lane) -> None: ...


def fail(images: Sequence[Image], error: BaseException) -> None:
    for image in images:
        if not image.future.done():
            image.future.set_exception(error)


class Lane:
    def __init__(
        self,
        index: int,
        engine: ServingEngine,
        source: ImageSource,
        *,
        max_batch_size: int,
        max_failures: int,
        metrics: Metrics,
        thread: ThreadPoolExecutor | None = None,
    ) -> None:
        self.index = index
        self.engine = engine
        self._source = source
        self.max_batch_size = max_batch_size
        self._max_failures = max_failures
        self._metrics = metrics.for_engine(index, getattr(engine.info, "adapters", ()))
        self.running: dict[int, Image] = {}
        self._leaving: set[int] = set()  # handles whose futures are done: cancel at the next step
        self.admitting: list[Image] = []  # taken from the queue, being admitted in the engine now
        self.room = max_batch_size  # shrinks after out of memory, grows back as images finish
        self.arrival = asyncio.Event()  # set by the queue when images arrive while this lane is idle
        self.idle = False  # waiting for images
        self.serving = True  # in rotation
        self.failures = 0  # consecutive failed steps (not out of memory)
        # The engine's one thread (the one it was loaded and warmed up in, when given; the lane
        # owns it from now on): every engine call of an iteration runs there.
        self._engine_thread = thread or engine_thread(index)
        self._worker: asyncio.Task[None] | None = None
        self.in_engine = False
        self._followable = isinstance(engine, FollowableEngine)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def load(self) -> int:
        return len(self.running) + len(self.admitting)

    @property
    def has_suspect(self) -> bool:
        return any(image.suspect for image in self.running.values())

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.create_task(self._work(), name=f"step-loop-{self.index}")

    # ----------------------------------------------------------------- the loop
    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self.serving:
            # 1. Idle: sleep until an image arrives.
            if not self.running:
                await self._source.wait_for_work(self)
            # 2. One iteration in the engine thread: leave, admit, step, retire.
            leaving = self._take_leaving()
            admitting = self.admitting = self._source.take(self)
            pending = getattr(getattr(self.engine, "adapters", None), "pending", False) is True
            if not admitting and not self.running and not leaving and not pending:
                continue  # another lane took what had arrived
            self._metrics.running_images.set(self.load)
            self.in_engine = True
            iteration = loop.run_in_executor(self._engine_thread, self._iterate, leaving, admitting)
            try:
                outcome = await asyncio.shield(iteration)
            except asyncio.CancelledError:
                # Abandoned, but the engine thread still runs it: busy until it returns, so that a
                # stop does not release the model under it (and the host exits without joining it).
                iteration.add_done_callback(self._iteration_over)
                fail([*admitting, *self.running.values()], ShuttingDownError(
                    "the server shut down before this image was done"
                ))  # fmt: skip
                raise
            self.in_engine = False
            self.admitting = []
            # 3. Hand out what it did.
            self._apply(outcome)

    def _iteration_over(self, _: object) -> None:
        self.in_engine = False

    def _take_leaving(self) -> list[int]:
        """Handles to drop: cancelled images, and any image whose future was failed meanwhile."""
        leaving = self._leaving | {h for h, image in self.running.items() if image.future.done()}
        self._leaving = set()
        for handle in leaving:
            if handle in self.running:
                del self.running[handle]
        return sorted(leaving)

    def left(self, image: Image) -> None:
        """``image``'s future was cancelled while this engine held it: it leaves at the next step."""
        if image.handle is not None and image.handle in self.running:
            self._leaving.add(image.handle)

    def _iterate(self, leaving: list[int], admitting: list[Image]) -> _Outcome:
        """In the engine thread: cancel, admit, then step until there is something to hand back.

        The engine steps on without a round trip through the event loop for as long as nothing
        finished, nothing left and no waiting image could join (the event loop may be busy with
        HTTP and PNGs; the engine must not wait for it between steps). Never raises for engine
        errors: a failed step ends the iteration, the steps before it stand.
        """
        engine, outcome = self.engine, _Outcome()
        for handle in leaving:
            engine.cancel(handle)
        for image in admitting:
            try:
                outcome.admitted.append((image, engine.admit(image.item)))
            except Exception as error:  # this item only: the engine cannot take it
                outcome.refused.append((image, error))
                continue
            if image.job is not None:  # now, not after the iteration: the engine may step on long
                image.job.admitted.add(image.index)
        running = len(self.running) + len(outcome.admitted)
        self._install_adapters(0.0 if running else ADAPTER_WAIT_S)  # adapters read go on the device
        held = [*((image, handle) for handle, image in self.running.items()), *outcome.admitted]
        ending = self._ending(held)
        if ending:  # interrupted: they end with the latents they have, before any other step
            outcome.results = self._retire(ending)
            return outcome
        while running:
            started = time.perf_counter()
            try:
                finished = engine.step()
            except Exception as error:  # nothing advanced in this step: the loop decides who leaves
                outcome.step_error = error
                break
            outcome.steps.append((running, time.perf_counter() - started))
            self._install_adapters(0.0)
            self._follow(held, finished)
            if outcome.first_step_done is None:
                outcome.first_step_done = time.monotonic()
            if finished:
                outcome.results = self._retire(finished)
                break
            if self._should_hand_back(outcome):
                break
        return outcome

    def _ending(self, held: list[tuple[Image, int]]) -> list[int]:
        """In the engine thread: the handles whose jobs were interrupted, finished as they are."""
        if not self._followable:
            return []
        ending = []
        for image, handle in held:
            if image.job is not None and image.index in image.job.finish_now:
                image.job.finish_now.discard(image.index)
                self.engine.finish(handle)  # type: ignore[attr-defined]
                ending.append(handle)
        return ending

    def _follow(self, held: list[tuple[Image, int]], finished: list[int]) -> None:
        """In the engine thread, after a step: the followed images' steps, and the previews asked
        for (handed to the event loop; a failed preview costs the image nothing)."""
        for image, handle in held:
            job = image.job
            if job is None:
                continue
            job.steps[image.index] += 1
            if not self._followable or handle in finished or not job.wants_preview(image.index):
                continue
            job.want_preview = False  # one preview per request for it (the engine may step on at once)
            try:
                pixels = self.engine.preview(handle)  # type: ignore[attr-defined]
            except Exception:
                log.warning("engine %d: a preview failed; the image goes on", self.index, exc_info=True)
                continue
            if self._loop is not None:
                self._loop.call_soon_threadsafe(job.preview, image.index, job.steps[image.index], pixels)

    def adapters_ready(self, item: GenerationItem) -> bool:
        """Whether ``item``'s LoRA adapters are on the device (model/adapters); if not, they are read."""
        adapters = getattr(self.engine, "adapters", None)
        if not item.adapters or adapters is None or adapters.ready(item.adapters):
            return True
        adapters.request(item.adapters)
        return False

    def _install_adapters(self, wait: float) -> None:
        if hasattr(self.engine, "install_adapters"):
            self.engine.install_adapters(wait)

    def _should_hand_back(self, outcome: _Outcome) -> bool:
        """Whether the event loop has something to do at this step boundary: an image left (or was
        failed), or a waiting image could join. Read from the engine thread: each check is one
        attribute or length read, and a stale answer only costs one more step."""
        if self._leaving or not self.serving:
            return True
        images = [*self.running.values(), *(image for image, _ in outcome.admitted)]
        if any(image.future.done() or (image.job is not None and image.job.finish_now) for image in images):
            return True
        return len(images) < self.room and self._source.has_waiting()

    def _retire(self, handles: list[int]) -> list[tuple[int, GenerationResult | Exception]]:
        """Decode the finished images together; on failure one by one, so each gets its own outcome
        (a handle whose decode failed stays in the engine: the lane cancels it next iteration)."""
        try:
            return list(zip(handles, self.engine.retire(handles), strict=True))
        except Exception as error:
            if len(handles) == 1:
                return [(handles[0], error)]
        outcomes: list[tuple[int, GenerationResult | Exception]] = []
        for handle in handles:
            try:
                outcomes += zip([handle], self.engine.retire([handle]), strict=True)
            except Exception as error:
                outcomes.append((handle, error))
        return outcomes

    def _apply(self, outcome: _Outcome) -> None:
        # 1. Admissions: the engine holds these now (an image cancelled meanwhile leaves next step).
        for image, handle in outcome.admitted:
            image.handle = handle
            self.running[handle] = image
            if image.future.done():
                self._leaving.add(handle)
        for image, error in outcome.refused:
            fail([image], error)
        self._metrics.admitted_per_step.observe(len(outcome.admitted))
        # 2. The steps that happened: first-step times, step metrics.
        if outcome.steps:
            self.failures = 0
        adapter_sets = [image.item.adapters for image in self.running.values()]
        for images, seconds in outcome.steps:
            self._metrics.step_seconds.observe(seconds)
            self._metrics.adapter_step(adapter_sets, seconds)
            self._metrics.batch_size.observe(images)
        if outcome.first_step_done is not None:
            for image in self.running.values():
                if image.first_step:
                    image.first_step = False
                    self._metrics.first_step_wait.observe(outcome.first_step_done - image.arrived)
        # 3. A failed step (its images as they were): shrink or isolate, then go round again.
        if outcome.step_error is not None:
            self._recover(outcome.step_error)
            return
        # 4. Finished images out.
        for handle, result in outcome.results:
            if handle not in self.running:
                continue
            image = self.running.pop(handle)
            if isinstance(result, Exception):  # its decode failed: it leaves the engine too
                self._leaving.add(handle)
                fail([image], result)
                continue
            self.room = min(self.room + 1, self.max_batch_size)
            self._metrics.images_generated.inc()
            self._metrics.adapter_image(image.item.adapters)
            if result.nsfw_content_detected:
                self._metrics.images_flagged.inc()
            if not image.future.done():
                image.future.set_result(result)
        self._metrics.running_images.set(len(self.running))

    def _recover(self, error: Exception) -> None:
        """After a failed step (the engine state unchanged): who goes back to the queue, who fails."""
        running = sorted(self.running.values(), key=lambda image: image.handle or 0)
        if not isinstance(error, EngineOutOfMemoryError):
            self.failures += 1
            self._metrics.engine_failures.inc()
            if self.failures >= self._max_failures:
                self._take_out(running, error)
                return
        if len(running) == 1:
            self._drop(running, requeue=False)
            fail(running, error)
            return
        if isinstance(error, EngineOutOfMemoryError):
            # The newest half goes back to the front of the queue; the room shrinks to what is left.
            keep = len(running) // 2
            evicted = running[keep:]
            self.room = max(keep, 1)
            log.warning(
                "engine %d: out of memory at %d images: %d go back to the queue",
                self.index, len(running), len(evicted),
            )  # fmt: skip
            self._drop(evicted, requeue=True)
            return
        # Anything else: one of them may be the cause. Each runs again, alone.
        log.warning(
            "engine %d: a step of %d images failed (%s); running each alone",
            self.index, len(running), type(error).__name__,
        )  # fmt: skip
        for image in running:
            image.suspect = True
        self._drop(running, requeue=True)

    def _take_out(self, running: list[Image], error: Exception) -> None:
        """The device failed: its running images fail, the lane leaves the rotation for good."""
        self.serving = False
        self._drop(running, requeue=False)
        fail(running, error)
        log.error(
            "%s\n  ENGINE %d (%s) TAKEN OUT OF ROTATION after %d failed steps in a row (last: %s: %s);\n"
            "  the other engines keep serving. Restart the server to bring its device back.\n%s",
            "!" * 78, self.index, self.engine.info.device, self.failures, type(error).__name__,
            str(error)[:200], "!" * 78,
        )  # fmt: skip
        self._source.lane_down(self)

    def _drop(self, images: list[Image], *, requeue: bool) -> None:
        """Take ``images`` out of the engine (at the next iteration); requeued ones go first."""
        for image in images:
            if image.handle is not None:
                if image.handle in self.running:
                    del self.running[image.handle]
                self._leaving.add(image.handle)
                image.handle = None
            image.first_step = True
            if image.job is not None:
                image.job.steps[image.index] = 0  # it restarts from step 0
                image.job.admitted.discard(image.index)
        if requeue:
            self._source.requeue([image for image in images if not image.future.done()])
        self._metrics.running_images.set(len(self.running))

    # ----------------------------------------------------------------- stop
    def abandon(self, error: BaseException) -> None:
        fail([*self.admitting, *self.running.values()], error)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._engine_thread.shutdown(wait=False, cancel_futures=True)
