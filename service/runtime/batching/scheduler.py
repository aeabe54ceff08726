"""The step loop's policy: which images an engine admits, cancels, requeues or fails at a step
boundary, decided by one synchronous object (no asyncio, threads or clock), as vLLM's v1
``Scheduler.schedule()`` / ``update_from_output()``.

Each image's state is one ``State`` held here. The lanes (lane.py) ask for a ``Plan`` before each
iteration, carry it out in their engine's thread, and hand the ``Output`` back; the ``Update`` says
which futures to resolve. The scheduler is the queue's one owner: a cancelled image leaves the
queue at once, or its engine at that engine's next plan.

The rules (steploop.py's docstring tells them as a user sees them):
- FIFO by image among the images that are ready (``ready``): one that is not ready (its adapter
  still loading, say) stays waiting without holding up the images behind it;
- an engine admits while it has room (``max_batch_size``, less after running out of memory), and
  while another engine holds nothing, a busy one leaves new images to it and an empty one takes
  its share;
- out of memory in a step: the most recently admitted half goes back to the front of the queue
  and the room shrinks to what is left, growing back by one per image finished; one image that
  does not fit alone fails;
- any other failed step: each of its images runs again alone (a suspect), so only the culprit
  fails; ``max_failures`` such steps in a row take the engine out of rotation: its images fail,
  the suspects it made run in company again elsewhere, and with no engine left the queue fails.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.errors import EngineOutOfMemoryError
from model.types import GenerationItem, GenerationResult
from service.runtime.batching.oom import after_failure
from service.runtime.errors import NotReadyError

if TYPE_CHECKING:
    import asyncio

    from service.runtime.jobs import Job

NO_ENGINE_LEFT = "every engine of this server failed and was taken out of rotation; restart the server"

# Whether an image may be admitted on an engine now: (engine index, item) -> ready. Called on the
# event loop and, for a yes/no between steps, from engine threads: it must be a cheap, safe read.
Ready = Callable[[int, GenerationItem], bool]


def always_ready(engine: int, item: GenerationItem) -> bool:
    return True


class State(enum.Enum):
    WAITING = "waiting"  # in the queue
    ADMITTING = "admitting"  # taken by an engine, which admits it in its current iteration
    RUNNING = "running"  # an engine holds it (``handle``)
    FINISHED = "finished"  # its result is out
    CANCELLED = "cancelled"  # its caller gave up; its handle, if any, leaves at the next plan
    FAILED = "failed"  # it got an error: its own, its engine's, or the shutdown's


DONE = frozenset({State.FINISHED, State.CANCELLED, State.FAILED})


@dataclass(eq=False)
class Image:
    """One image of a request, from the queue to its result. The scheduler never touches
    ``future``; the lanes resolve it from the scheduler's ``Update``."""

    item: GenerationItem
    future: asyncio.Future[GenerationResult]
    arrived: float = 0.0  # monotonic time of its arrival (the caller's clock: for metrics only)
    job: Job | None = None  # the request it belongs to, when someone follows it (jobs.py)
    index: int = 0  # its place in the job
    state: State = State.WAITING
    engine: int | None = None  # the engine that holds or admits it
    handle: int | None = None  # its handle in that engine
    suspect_on: int | None = None  # a failed step on this engine made it suspect: it runs alone
    first_step: bool = True  # no step of it has ended since it was (re)admitted


@dataclass
class EngineSlot:
    """What the scheduler knows of one engine."""

    index: int
    max_batch_size: int
    room: int  # the running set's size limit: shrinks after out of memory, grows back
    serving: bool = True  # in rotation
    failures: int = 0  # failed steps in a row (not out of memory)
    running: dict[int, Image] = field(default_factory=dict)  # handle -> image, in admission order
    admitting: list[Image] = field(default_factory=list)  # planned, in its engine's admit now
    leaving: list[int] = field(default_factory=list)  # handles its engine drops at the next plan

    @property
    def held(self) -> int:
        return len(self.running) + len(self.admitting)


@dataclass
class Plan:
    """One iteration of one engine: drop ``leave`` (handles), then admit ``admit`` in order."""

    leave: list[int]
    admit: list[Image]


@dataclass
class Output:
    """What one iteration did, as the lane hands it back."""

    admitted: list[tuple[Image, int]] = field(default_factory=list)  # (image, its handle)
    refused: list[tuple[Image, Exception]] = field(default_factory=list)  # admit raised
    results: list[tuple[int, GenerationResult | Exception]] = field(default_factory=list)  # retired
    step_error: Exception | None = None  # the step that failed (nothing advanced in it)
    steps: list[tuple[int, float]] = field(default_factory=list)  # (images, seconds) per step done
    first_step_done: float | None = None  # monotonic time at the end of its first step


@dataclass
class Update:
    """What to tell the callers after an iteration."""

    finished: list[tuple[Image, GenerationResult]] = field(default_factory=list)
    failed: list[tuple[Image, BaseException]] = field(default_factory=list)
    requeued: list[Image] = field(default_factory=list)  # back in the queue, from step 0
    out_of_memory_at: int = 0  # the running images of a step that ran out of memory (0: none did)
    isolated: int = 0  # the images of a failed step that each run alone from now on
    counted_failure: bool = False  # a failed step that counts towards taking the engine out
    taken_out: bool = False  # this engine left the rotation


class Scheduler:
    def __init__(
        self, engines: int, *, max_batch_size: int, max_failures: int = 3, ready: Ready = always_ready
    ) -> None:
        self.engines = [EngineSlot(index, max_batch_size, max_batch_size) for index in range(engines)]
        self._max_failures = max_failures
        self._ready = ready
        self._queue: deque[Image] = deque()

    # ----------------------------------------------------------------- the queue
    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def serving(self) -> list[EngineSlot]:
        return [slot for slot in self.engines if slot.serving]

    def add(self, images: Sequence[Image]) -> None:
        """Queue ``images`` behind every waiting one (the caller checked the queue's room)."""
        for image in images:
            image.state = State.WAITING
        self._queue.extend(images)

    def has_work(self, engine: int) -> bool:
        """Whether a waiting image is ready for ``engine`` (safe to call from its thread)."""
        return any(self._ready(engine, image.item) for image in list(self._queue))

    def cancel(self, image: Image) -> None:
        """``image``'s caller gave up: it leaves the queue now, or its engine at the next plan."""
        if image.state is State.WAITING:
            self._queue.remove(image)
        elif image.state is State.RUNNING and image.engine is not None and image.handle is not None:
            slot = self.engines[image.engine]
            slot.running.pop(image.handle, None)
            slot.leaving.append(image.handle)
        elif image.state is not State.ADMITTING:  # done already
            return
        image.state = State.CANCELLED  # an admitting one leaves once its handle is known

    def abandon(self) -> list[Image]:
        """Every waiting and held image, failed now (the caller fails their futures); held ones
        leave their engines at the next plan."""
        images = list(self._queue)
        self._queue.clear()
        for slot in self.engines:
            images += slot.admitting  # their handles are dropped in update_from_output
            for handle, image in slot.running.items():
                slot.leaving.append(handle)
                images.append(image)
            slot.running = {}
        for image in images:
            image.state = State.FAILED
        return images

    # ----------------------------------------------------------------- one engine's iteration
    def schedule(self, engine: int) -> Plan:
        """What ``engine`` does at its step boundary: the handles to drop, the images to admit."""
        slot = self.engines[engine]
        leave, slot.leaving = slot.leaving, []
        admit = self._take(slot)
        for image in admit:
            image.state, image.engine = State.ADMITTING, engine
        slot.admitting = admit
        return Plan(leave, admit)

    def _take(self, slot: EngineSlot) -> list[Image]:
        """Waiting images for ``slot``, oldest ready first, within its room and its share; a
        suspect runs alone."""
        if not slot.serving or any(image.suspect_on is not None for image in slot.running.values()):
            return []
        empty = sum(1 for other in self.engines if other is not slot and other.serving and not other.held)
        if empty and slot.running:
            return []  # the empty engines take new images
        # One that is not ready stays first in line for when it is, and holds nobody up.
        ready = [image for image in self._queue if self._ready(slot.index, image.item)]
        share = math.ceil(len(ready) / (empty + 1))
        admit: list[Image] = []
        for image in ready:
            if len(slot.running) + len(admit) >= slot.room or len(admit) >= share:
                break
            if image.suspect_on is not None and (slot.running or admit):
                break
            self._queue.remove(image)
            admit.append(image)
            if image.suspect_on is not None:
                break
        return admit

    def should_hand_back(self, engine: int) -> bool:
        """Whether ``engine``'s thread should end its iteration at this step boundary: a handle
        is to leave, an image it admits was cancelled, or a waiting image could join. Read from
        the engine's thread; a stale answer costs one step."""
        slot = self.engines[engine]
        if slot.leaving or not slot.serving:
            return True
        if any(image.state is not State.ADMITTING for image in list(slot.admitting)):
            return True
        return slot.held < slot.room and self.has_work(engine)

    def update_from_output(self, engine: int, output: Output) -> Update:
        """Apply what ``engine``'s iteration did; say what to resolve."""
        slot, update = self.engines[engine], Update()
        # 1. Admissions: the engine holds these now; one cancelled meanwhile leaves at the next plan.
        for image, handle in output.admitted:
            image.handle = handle
            if image.state is State.ADMITTING:
                image.state = State.RUNNING
                slot.running[handle] = image
            else:
                slot.leaving.append(handle)
        for image, error in output.refused:
            if image.state is State.ADMITTING:
                image.state = State.FAILED
                update.failed.append((image, error))
        slot.admitting = []
        if output.steps:
            slot.failures = 0
        # 2. A failed step (its images as they were): shrink, isolate or take out.
        if output.step_error is not None:
            self._recover(slot, output.step_error, update)
            return update
        # 3. Finished images out (a cancelled one left ``running`` already).
        for handle, result in output.results:
            if handle not in slot.running:
                continue
            image = slot.running.pop(handle)
            if isinstance(result, Exception):  # its decode failed: it leaves the engine too
                slot.leaving.append(handle)
                image.state = State.FAILED
                update.failed.append((image, result))
                continue
            slot.room = min(slot.room + 1, slot.max_batch_size)
            image.state = State.FINISHED
            update.finished.append((image, result))
        return update

    def _recover(self, slot: EngineSlot, error: Exception, update: Update) -> None:
        """After a failed step (the engine state unchanged): the rule of oom.py, unless the engine
        has failed too often in a row."""
        if not isinstance(error, EngineOutOfMemoryError):
            slot.failures += 1
            update.counted_failure = True
            if slot.failures >= self._max_failures:
                self._take_out(slot, list(slot.running.values()), error, update)
                return
        verdict = after_failure(list(slot.running.values()), error)  # in admission order
        self._fail(slot, verdict.fail, error, update)
        if verdict.later:  # out of memory: the room shrinks to what goes on
            slot.room = len(verdict.keep)
            update.out_of_memory_at = len(verdict.keep) + len(verdict.later)
        for image in verdict.alone:
            image.suspect_on = slot.index
        update.isolated = len(verdict.alone)
        self._requeue(slot, [*verdict.later, *verdict.alone], update)

    def _fail(self, slot: EngineSlot, images: list[Image], error: BaseException, update: Update) -> None:
        for image in images:
            self._leave(slot, image)
            image.state = State.FAILED
            update.failed.append((image, error))

    def _requeue(self, slot: EngineSlot, images: list[Image], update: Update) -> None:
        """Back to the front of the queue, in order; they restart from step 0."""
        for image in images:
            self._leave(slot, image)
            image.state, image.first_step = State.WAITING, True
        self._queue.extendleft(reversed(images))
        update.requeued += images

    @staticmethod
    def _leave(slot: EngineSlot, image: Image) -> None:
        if image.handle is not None:
            slot.running.pop(image.handle, None)
            slot.leaving.append(image.handle)
        image.handle = image.engine = None

    def _take_out(self, slot: EngineSlot, running: list[Image], error: Exception, update: Update) -> None:
        """The device failed: its images fail; the suspects it made were not to blame (its device
        was), so they run in company again; with no engine left, the queue fails."""
        slot.serving = False
        update.taken_out = True
        self._fail(slot, running, error, update)
        for image in self._queue:
            if image.suspect_on == slot.index:
                image.suspect_on = None
        if not self.serving:
            waiting = list(self._queue)
            self._queue.clear()
            for image in waiting:
                image.state = State.FAILED
                update.failed.append((image, NotReadyError(NO_ENGINE_LEFT)))
