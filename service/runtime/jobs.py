"""Requests in flight as jobs: each image's step and total, its latest preview, and the ways to
stop one (cancel by request id; end now with the image it has, as AUTOMATIC1111's interrupt does).

The step loop (batching/lane.py) writes a job's progress from the engine thread: plain integer
stores, read by the event loop without locks (a stale read is one step behind). Previews are
handed to the event loop with ``call_soon_threadsafe``. A job belongs to the caller that made
it (``owner``: a digest of its API key, "" on a server without keys): only that caller can
follow or stop it, so an id seen in a log stops nothing of anyone else's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# At most one preview a second for a request's progress polls, however often it polls (A1111's own
# live_preview_refresh_period): each is a decode in the engine thread, which every caller's images
# share, so a client polling in a tight loop must not buy a decode at every step.
POLLED_PREVIEW_INTERVAL_S = 1.0


@dataclass(eq=False)
class Job:
    """One generating request: its images, in response order, as the step loop runs them."""

    request_id: str
    owner: str
    client: str  # "score", "openai", "a1111", "huggingface": which routes' controls see it
    preview_every: int = 0  # a preview of each image every k steps (0: none)
    totals: list[int] = field(default_factory=list)  # each image's steps, once queued
    started: float = field(default_factory=time.monotonic)
    steps: list[int] = field(default_factory=list)  # each image's steps done (the engine thread writes)
    admitted: set[int] = field(default_factory=set)  # images an engine holds (its thread adds them)
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    cancelled: bool = False  # cancel: the request answers 499 cancelled
    interrupted: bool = False  # interrupt: the request answers with the images it has
    finish_now: set[int] = field(default_factory=set)  # images to end at the next step, as they are
    want_preview: bool = False  # one preview at the next step (someone polls the progress)
    polled_preview_at: float = -POLLED_PREVIEW_INTERVAL_S  # when the last polled preview was made
    latest: np.ndarray | None = None  # the latest preview of any of its images
    events: asyncio.Queue[tuple[int, int, np.ndarray]] = field(default_factory=asyncio.Queue)

    def begin(self, totals: list[int]) -> None:
        """Its images are queued, with these steps each."""
        self.totals = totals
        self.steps = [0] * len(totals)

    @property
    def progress(self) -> float:
        """Steps done over steps asked, from 0 to 1."""
        total = sum(self.totals)
        return sum(min(done, of) for done, of in zip(self.steps, self.totals, strict=True)) / max(total, 1)

    def step_of(self, image: int) -> tuple[int, int]:
        return min(self.steps[image], self.totals[image]), self.totals[image]

    def wants_preview(self, image: int) -> bool:
        """Read from the engine thread after each step of ``image``: a polled preview at most every
        POLLED_PREVIEW_INTERVAL_S (the poll waits for the next one), a streamed one at its steps."""
        done = self.steps[image]
        now = time.monotonic()
        if self.want_preview and now - self.polled_preview_at >= POLLED_PREVIEW_INTERVAL_S:
            self.polled_preview_at = now
            return True
        return bool(self.preview_every) and done % self.preview_every == 0 and done < self.totals[image]

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
        running = {image for image in list(self.admitted) if not self.futures[image].done()}
        self.finish_now |= running
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
