"""Requests in flight as jobs: each image's step and total, its latest preview, and the ways to
stop one (cancel by request id; end now with the image it has, as AUTOMATIC1111's interrupt does).

A job holds no state of its images: their steps are the scheduler's records (batching/records.py),
counted on the event loop as each step ends; interrupts and preview requests are commands to the
step loop, which the scheduler carries out at the next step boundary. Previews arrive on the event
loop with ``call_soon_threadsafe``. A job belongs to the caller that made
it (``owner``: a digest of its API key, "" on a server without keys): only that caller can
follow or stop it, so an id seen in a log stops nothing of anyone else's.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.settings import Settings


def caller_of(key: str | bytes) -> str:
    """A caller's name from its API key: a digest, so that no key is kept or logged."""
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()[:32]


def caller_weights(settings: Settings) -> dict[str, float]:
    """Each key's caller and its share (SD_KEY_WEIGHTS, in SD_API_KEYS' order; checked at start-up)."""
    weights = [float(weight) for weight in (settings.key_weights or "").split(",") if weight.strip()]
    return {caller_of(key): weight for key, weight in zip(settings.api_key_list, weights, strict=False)}


def images_per_caller(settings: Settings) -> int | None:
    """Images one caller may have waiting or running at once (None: no bound but the queue's):
    SD_MAX_IMAGES_PER_KEY, else half the queue on a server with keys."""
    if settings.max_images_per_key is not None:
        return settings.max_images_per_key
    return max(1, settings.max_queue_items // 2) if settings.api_keys is not None else None


# At most one preview a second for a request's progress polls, however often it polls (A1111's own
# live_preview_refresh_period): each is a decode in the engine thread, which every caller's images
# share, so a client polling in a tight loop must not buy a decode at every step (scheduler.py).
POLLED_PREVIEW_INTERVAL_S = 1.0


class Core(Protocol):
    """The commands a job sends the step loop that runs its images (steploop.StepLoop)."""

    def finish_now(self, job: Job, images: list[int]) -> None: ...

    def ask_preview(self, job: Job) -> None: ...


class Followed(Protocol):
    """What a job reads of its images' records in the scheduler (batching/records.Image)."""

    @property
    def steps(self) -> int: ...

    @property
    def on_engine(self) -> bool: ...


@dataclass(eq=False)
class Job:
    """One generating request: its images, in response order, as the step loop runs them. Each
    image's state is held once, in the scheduler's record (``images``); a job's steps and progress
    are views of those, and its stops are commands to the step loop (``core``)."""

    request_id: str
    owner: str
    client: str  # "score", "openai", "a1111", "huggingface": which routes' controls see it
    preview_every: int = 0  # a preview of each image every k steps (0: none)
    totals: list[int] = field(default_factory=list)  # each image's steps, once queued
    started: float = field(default_factory=time.monotonic)
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    images: Sequence[Followed] = ()  # the scheduler's records of its images (set when queued)
    core: Core | None = None  # the step loop that runs them (set when queued)
    cancelled: bool = False  # cancel: the request answers 499 cancelled
    interrupted: bool = False  # interrupt: the request answers with the images it has
    latest: np.ndarray | None = None  # the latest preview of any of its images
    events: asyncio.Queue[tuple[int, int, np.ndarray]] = field(default_factory=asyncio.Queue)

    def begin(self, totals: list[int]) -> None:
        """Its images are queued, with these steps each."""
        self.totals = totals

    @property
    def steps(self) -> list[int]:
        """Each image's steps done (0 while it waits, and again if it is put back in the queue)."""
        if len(self.images) != len(self.totals):
            return [0] * len(self.totals)
        return [image.steps for image in self.images]

    @property
    def admitted(self) -> set[int]:
        """The images an engine holds."""
        return {index for index, image in enumerate(self.images) if image.on_engine}

    @property
    def progress(self) -> float:
        """Steps done over steps asked, from 0 to 1."""
        total = sum(self.totals)
        return sum(min(done, of) for done, of in zip(self.steps, self.totals, strict=True)) / max(total, 1)

    def step_of(self, image: int) -> tuple[int, int]:
        return min(self.steps[image], self.totals[image]), self.totals[image]

    def ask_preview(self) -> None:
        """Someone polls its progress: a preview of its running images soon (at a bounded rate)."""
        if self.core is not None:
            self.core.ask_preview(self)

    def preview(self, image: int, step: int, pixels: np.ndarray) -> None:
        """On the event loop: a preview of ``image`` at ``step`` arrived."""
        self.latest = pixels
        if self.preview_every:
            self.events.put_nowait((image, step, pixels))

    def cancel(self) -> None:
        """Every image leaves the queue now, or its engine at the next step."""
        self.cancelled = True
        for future in self.futures:
            future.cancel()

    def interrupt(self, *, waiting_too: bool) -> None:
        """The running images end at the next step with the image they have; the waiting ones
        leave too (``waiting_too``: A1111's interrupt) or go on (its skip)."""
        running = sorted(image for image in self.admitted if not self.futures[image].done())
        if self.core is not None and running:
            self.core.finish_now(self, running)
        if waiting_too:
            self.interrupted = True
            for image, future in enumerate(self.futures):
                if image not in running:
                    future.cancel()


class Jobs:
    """The jobs in flight, by request id (clients may reuse an id: each of them is kept)."""

    def __init__(self) -> None:
        self._by_id: dict[str, list[Job]] = {}

    def open(self, job: Job) -> Job:
        self._by_id.setdefault(job.request_id, []).append(job)
        return job

    def close(self, job: Job) -> None:
        jobs = self._by_id.get(job.request_id, [])
        if job in jobs:
            jobs.remove(job)
        if not jobs:
            self._by_id.pop(job.request_id, None)

    def find(self, request_id: str, owner: str) -> list[Job]:
        return [job for job in self._by_id.get(request_id, []) if job.owner == owner]

    def of(self, owner: str, client: str) -> list[Job]:
        """``owner``'s jobs from ``client``'s routes, oldest first."""
        jobs = [job for job in self if job.owner == owner and job.client == client]
        return sorted(jobs, key=lambda job: job.started)

    def __iter__(self) -> Iterator[Job]:
        return (job for jobs in list(self._by_id.values()) for job in jobs)
