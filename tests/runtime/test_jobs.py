"""Following and stopping images in the step loop (service/runtime/jobs.py, batching/lane.py)
against a fake step engine that can end an item early and preview it: each image's steps, previews
every k steps (and only for images that asked), interrupt, skip and cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import numpy as np

from model.types import GenerationResult
from service.runtime.jobs import Job, Jobs
from tests.runtime.fakes import item
from tests.runtime.stepfakes import FakeStepEngine
from tests.runtime.test_steploop import in_loop, started, step_boundary


class FollowableFake(FakeStepEngine):
    """Also ends an item at its current step (``finish``) and previews it (its steps done as pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.previewed: list[tuple[int, int]] = []  # (seed, steps done) of every preview
        self.finished_at: dict[int, int] = {}  # seed -> steps done when it was ended early

    def finish(self, handle: int) -> None:
        running = self.running[handle]
        self.finished_at[running.item.seed] = running.done
        running.done = running.item.num_inference_steps

    def preview(self, handle: int) -> np.ndarray:
        running = self.running[handle]
        self.previewed.append((running.item.seed, running.done))
        return np.full((2, 2, 3), running.done, dtype=np.uint8)

    def retire(self, handles: Sequence[int]) -> list[GenerationResult]:
        return super().retire(handles)


@asynccontextmanager
async def followed_at_a_gate(
    *steps_each: int, max_batch_size: int = 4
) -> AsyncIterator[tuple[FollowableFake, Job]]:
    """A gated loop running one followed job, an image per entry of ``steps_each`` (seeds 1, 2, ...):
    the tests ask for previews or stop the job while the loop is inside a step. The loop is closed
    on the way out."""
    engine = FollowableFake()
    steps, _ = started(engine, gated=True, max_batch_size=max_batch_size)
    job = Job("r1", "", "a1111")
    job.begin(list(steps_each))
    job.futures = list(steps.submit([item(seed=i, steps=n) for i, n in enumerate(steps_each, 1)], job))
    yield engine, job
    await steps.close()


async def inside_a_step(engine: FollowableFake, act: Callable[[], None]) -> None:
    """Does ``act`` while the loop is inside a step, then lets the step finish: what a caller asking
    for a preview or stopping its job does while its images run."""
    await step_boundary(engine)
    act()
    assert engine.gate is not None
    engine.gate.set()


@in_loop
async def test_steps_are_counted_and_previews_come_every_k_steps_for_the_images_that_asked() -> None:
    engine = FollowableFake()
    steps, _ = started(engine)
    job = Job("r1", "", "openai", preview_every=2)
    job.begin([5])
    [followed] = job.futures = steps.submit([item(seed=1, steps=5)], job)
    [plain] = steps.submit([item(seed=2, steps=5)])
    await asyncio.gather(followed, plain)
    await asyncio.sleep(0)  # previews are handed over with call_soon_threadsafe
    assert job.steps == [5] and job.progress == 1.0
    assert engine.previewed == [(1, 2), (1, 4)]  # never seed 2, never after the last step
    events = [job.events.get_nowait() for _ in range(job.events.qsize())]
    assert [(image, step, int(pixels[0, 0, 0])) for image, step, pixels in events] == [
        (0, 2, 2),
        (0, 4, 4),
    ]
    await steps.close()


@in_loop
async def test_want_preview_gives_one_preview_at_the_next_step() -> None:
    async with followed_at_a_gate(6) as (engine, job):
        await inside_a_step(engine, job.ask_preview)
        await job.futures[0]
        await asyncio.sleep(0)
        assert engine.previewed == [(1, 1)] and job.latest is not None and job.events.empty()


@in_loop
async def test_interrupt_ends_running_images_with_what_they_have_and_drops_the_waiting_ones() -> None:
    async with followed_at_a_gate(50, 50, max_batch_size=1) as (engine, job):
        running, waiting = job.futures
        for _ in range(3):
            await step_boundary(engine)
            engine.gate.set()
            engine.gate.clear()
        await inside_a_step(engine, lambda: job.interrupt(waiting_too=True))
        assert (await running).seed == 1
        assert waiting.cancelled() and job.interrupted
        assert 3 <= engine.finished_at[1] <= 5  # ended within a step or two, not after its 50


@in_loop
async def test_skip_ends_the_running_image_and_the_next_one_goes_on() -> None:
    async with followed_at_a_gate(50, 3, max_batch_size=1) as (engine, job):
        await inside_a_step(engine, lambda: job.interrupt(waiting_too=False))
        assert (await job.futures[0]).seed == 1 and (await job.futures[1]).seed == 2
        assert engine.finished_at == {1: 1} and not job.interrupted


def test_jobs_are_found_only_by_their_owner_and_leave_when_closed() -> None:
    jobs = Jobs()
    mine, again, theirs = Job("id", "me", "score"), Job("id", "me", "a1111"), Job("id", "you", "score")
    for job in (mine, again, theirs):
        jobs.open(job)
    assert jobs.find("id", "me") == [mine, again] and jobs.find("id", "nobody") == []
    assert jobs.of("me", "a1111") == [again]
    jobs.close(mine)
    jobs.close(again)
    jobs.close(theirs)
    assert jobs.find("id", "you") == [] and list(jobs) == []
