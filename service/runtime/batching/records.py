"""The scheduler's records (scheduler.py): each image's one state, what it knows of each engine, and
the plans, outputs and updates it trades with the lanes. Everything else (a job's progress, a
metric) is a view of these or an output."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model.types import GenerationItem, GenerationResult
from service.runtime.batching.cost import StepCost
from service.runtime.batching.residency import Changes, Placement

if TYPE_CHECKING:
    import asyncio

    from service.runtime.jobs import Job


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
    caller: str = ""  # whose it is (a digest of the API key): the unit of the fair share
    state: State = State.WAITING
    engine: int | None = None  # the engine that holds or admits it
    handle: int | None = None  # its handle in that engine
    suspect_on: int | None = None  # a failed step on this engine made it suspect: it runs alone
    first_step: bool = True  # no step of it has ended since it was (re)admitted
    steps: int = 0  # steps done since it was (re)admitted (its job's progress is a view of this)
    ending: bool = False  # interrupted: it ends at its next plan with the latents it has
    preview_asked: bool = False  # someone polls its progress: one preview after its next step
    previewed_at: float = float("-inf")  # when a poll last asked for its preview (the rate bound)
    preview_every: int = 0  # a preview every k steps (a stream's partial images; 0: none)

    @property
    def on_engine(self) -> bool:
        return self.state in (State.ADMITTING, State.RUNNING)


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
    ending: list[int] = field(default_factory=list)  # handles its engine ends now (interrupted)
    stepping: list[Image] = field(default_factory=list)  # the images the current iteration steps
    cost: StepCost = field(default_factory=StepCost)  # its steps' prices, fitted to their times
    placement: Placement = field(default_factory=lambda: Placement(None))  # its adapters on the device
    models: Placement = field(default_factory=lambda: Placement(None))  # its library's models on the device

    @property
    def held(self) -> int:
        return len(self.running) + len(self.admitting)


@dataclass
class Plan:
    """One iteration of one engine: drop ``leave`` (handles), then admit ``admit`` in order, then
    step ``step`` (None: every image it holds; else these, the others paused). ``finish``: handles
    to end now with the latents they have (an interrupt), retired before any step. ``preview``:
    the images to preview, each with when (``Preview``)."""

    leave: list[int]
    admit: list[Image]
    step: list[Image] | None = None
    running: list[tuple[Image, int]] = field(default_factory=list)  # what it holds already, by handle
    finish: list[int] = field(default_factory=list)
    preview: dict[Image, Preview] = field(default_factory=dict)
    adapters: Changes = field(default_factory=Changes)  # reads to start; out and in, first thing
    models: Changes = field(default_factory=Changes)  # loads to start; out and in, before the adapters


@dataclass(frozen=True)
class Preview:
    """When an image of a plan is previewed: ``once`` (a poll asked) at once, or after the first
    step of an image that has none yet; and at every step that is a multiple of ``every`` before its
    last (a stream's partial images)."""

    steps: int  # its steps done when the plan was made
    every: int = 0
    once: bool = False

    def due(self, stepped: int, total: int) -> bool:
        """Whether to preview after the iteration's ``stepped``-th step (0: before the first) of an
        image of ``total`` steps."""
        done = self.steps + stepped
        if done >= total:
            return False
        once_at = 1 if self.steps == 0 else 0  # an image not yet stepped has nothing to show
        if self.once and stepped == once_at:
            return True
        return stepped > 0 and self.every > 0 and done % self.every == 0


@dataclass
class Output:
    """What one iteration did, as the lane hands it back."""

    admitted: list[tuple[Image, int]] = field(default_factory=list)  # (image, its handle)
    refused: list[tuple[Image, Exception]] = field(default_factory=list)  # admit raised
    results: list[tuple[int, GenerationResult | Exception]] = field(default_factory=list)  # retired
    step_error: Exception | None = None  # the step that failed (nothing advanced in it)
    steps: list[tuple[int, float]] = field(default_factory=list)  # (images, seconds) per step done
    previews: list[tuple[Image, float]] = field(default_factory=list)  # (image, seconds) per preview
    adapter_failures: dict[str, str] = field(default_factory=dict)  # adapters that failed to install
    model_failures: dict[str, str] = field(default_factory=dict)  # models that failed to load
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


def ask_preview(images: Sequence[Image], now: float, interval_s: float) -> None:
    """Someone polls a request's progress (``images``: the request's, ``now``: the caller's clock):
    its images on an engine are previewed at their next step boundary, at most once per
    ``interval_s`` for the request (A1111's live_preview_refresh_period), so a client polling in a
    tight loop buys no decode at every step of an engine others share."""
    if any(now - image.previewed_at < interval_s for image in images):
        return
    for image in images:
        image.previewed_at = now
        image.preview_asked = image.on_engine


def previews_of(stepping: list[Image]) -> dict[Image, Preview]:
    """The previews an iteration that steps ``stepping`` makes, each with when."""
    orders = {}
    for image in stepping:
        if image.preview_asked or image.preview_every:
            orders[image] = Preview(image.steps, image.preview_every, image.preview_asked)
            image.preview_asked = False
    return orders
