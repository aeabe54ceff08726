"""The step loop (service/runtime/batching/steploop.py) against a fake step engine, without HTTP:
admission at step boundaries, FIFO by image, leaving on cancel, OOM shrink and regrow, isolation."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from model.errors import EngineFailure, EngineOutOfMemoryError, InvalidRequestError
from model.types import GenerationItem
from service.runtime.batching.steploop import StepLoop
from service.runtime.errors import QueueFullError, ShuttingDownError
from service.runtime.metrics import Metrics
from tests.runtime.fakes import item
from tests.runtime.stepfakes import FakeStepEngine


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """The async ``test`` as a plain one, run in a fresh event loop and failed after 30 s: a loop
    that never steps must fail the test, not hang the run."""

    @functools.wraps(test)
    def plain() -> None:
        asyncio.run(asyncio.wait_for(test(), 30))

    return plain


def loop_for(engine: FakeStepEngine, **options: Any) -> tuple[StepLoop, Metrics]:
    metrics = Metrics()
    defaults = {"max_batch_size": 4, "max_queue_items": 32}
    return StepLoop(engine, metrics=metrics, **{**defaults, **options}), metrics


def started(engine: FakeStepEngine, *, gated: bool = False, **options: Any) -> tuple[StepLoop, Metrics]:
    """A running loop over ``engine``. ``gated`` holds every step until the test sets the gate, so
    that the test can act while the loop is inside a step."""
    if gated:
        engine.gate = threading.Event()
    steps, metrics = loop_for(engine, **options)
    steps.start()
    return steps, metrics


async def outcomes_of(steps: StepLoop, items: list[GenerationItem]) -> list[Any]:
    """Each image's result or error, in order: the failure tests check one image fails alone."""
    return await asyncio.gather(*steps.submit(items), return_exceptions=True)


async def served(engine: FakeStepEngine, *requests: list[GenerationItem]) -> list[list[Any]]:
    """Each request's outcomes, one request after the other, on a loop over ``engine`` that is closed
    afterwards: the failure tests check what a failure leaves working."""
    steps, _ = started(engine)
    outcomes = [await outcomes_of(steps, items) for items in requests]
    await steps.close()
    return outcomes


async def step_boundary(engine: FakeStepEngine) -> None:
    """Until the loop is inside its next step (holding the gate)."""
    await asyncio.to_thread(engine.step_started.acquire, True, 10)


@in_loop
async def test_an_image_at_an_idle_engine_starts_at_once_and_images_of_any_steps_share_steps() -> None:
    engine = FakeStepEngine()
    steps, _ = started(engine)
    long, short = steps.submit([item(seed=1, steps=5), item(seed=2, steps=2)])
    assert (await short).seed == 2 and (await long).seed == 1
    await steps.close()
    # Both were stepped together from the first step; the short one left after its 2nd.
    assert engine.steps[:2] == [[1, 2], [1, 2]] and engine.steps[2:] == [[1]] * 3


@in_loop
async def test_waiting_images_join_at_the_next_step_boundary_oldest_first_within_the_room() -> None:
    engine = FakeStepEngine()
    steps, metrics = started(engine, gated=True, max_batch_size=2)
    first = steps.submit([item(seed=1, steps=3)])
    await step_boundary(engine)  # seed 1 is in its first step
    later = steps.submit([item(seed=2, steps=1), item(seed=3, steps=1), item(seed=4, steps=1)])
    engine.gate.set()
    await asyncio.gather(*first, *later)
    await steps.close()
    # Step 2 admitted seed 2 (room 2); 3 joined when 2 left, then 4 when 3 left: FIFO by image.
    assert engine.steps == [[1], [1, 2], [1, 3], [4]]
    assert metrics.registry.get_sample_value("sd_time_to_first_step_seconds_count", {"engine": "0"}) == 4


@in_loop
async def test_a_cancelled_image_leaves_the_engine_at_the_next_step_and_frees_its_room() -> None:
    engine = FakeStepEngine()
    steps, metrics = started(engine, gated=True, max_batch_size=1)
    (abandoned,) = steps.submit([item(seed=1, steps=1000)])
    await step_boundary(engine)
    (waiting,) = steps.submit([item(seed=2, steps=1)])
    abandoned.cancel()
    engine.gate.set()
    assert (await waiting).seed == 2
    await steps.close()
    assert engine.cancelled == [1]
    assert len(engine.steps) == 2  # one step of the abandoned image, then the waiting one's
    assert metrics.registry.get_sample_value("sd_running_images", {"engine": "0"}) == 0


@in_loop
async def test_a_refused_admission_fails_only_that_image() -> None:
    engine = FakeStepEngine()
    engine.refuse_prompts.add("no")
    [outcomes] = await served(engine, [item("no"), item("yes", seed=5)])
    assert isinstance(outcomes[0], InvalidRequestError) and outcomes[1].seed == 5  # type: ignore[union-attr]


@in_loop
async def test_out_of_memory_shrinks_the_set_and_only_an_image_too_big_alone_fails() -> None:
    engine = FakeStepEngine(max_rows=2)
    steps, _ = started(engine, max_batch_size=4)
    results = await asyncio.gather(*steps.submit([item(seed=i, steps=2) for i in range(4)]))
    assert [r.seed for r in results] == [0, 1, 2, 3]
    assert max(len(s) for s in engine.steps) == 2  # ran in sets that fit
    # The set grows again afterwards: 4 images of one step each fit two at a time at most,
    # but with a bigger engine the room returns to the full batch.
    engine.max_rows = None
    await asyncio.gather(*steps.submit([item(seed=10 + i, steps=3) for i in range(4)]))
    assert [10, 11, 12, 13] in engine.steps
    engine.max_rows = 0
    (alone,) = await asyncio.gather(*steps.submit([item(seed=99)]), return_exceptions=True)
    await steps.close()
    assert isinstance(alone, EngineOutOfMemoryError)


@in_loop
async def test_a_failing_step_is_retried_image_by_image_so_only_the_culprit_fails() -> None:
    engine = FakeStepEngine()
    engine.fail_prompts.add("bad")
    outcomes, after = await served(
        engine, [item("good", seed=1), item("bad", seed=2), item("good", seed=3)], [item("good", seed=4)]
    )
    assert isinstance(outcomes[1], EngineFailure)
    assert [outcomes[0].seed, outcomes[2].seed, after[0].seed] == [1, 3, 4]  # type: ignore[union-attr]


@in_loop
async def test_a_full_queue_refuses_whole_requests_and_close_fails_what_is_left() -> None:
    engine = FakeStepEngine()
    steps, _ = started(engine, gated=True, max_batch_size=1, max_queue_items=2)
    (running,) = steps.submit([item(seed=1, steps=5)])
    await step_boundary(engine)
    queued = steps.submit([item(seed=2), item(seed=3)])
    with pytest.raises(QueueFullError):
        steps.submit([item(seed=4)])
    steps.abandon(ShuttingDownError("drain over"))
    engine.gate.set()
    outcomes = await asyncio.gather(running, *queued, return_exceptions=True)
    await steps.close()
    assert all(isinstance(o, ShuttingDownError) for o in outcomes)
    with pytest.raises(ShuttingDownError):
        steps.submit([item()])


@in_loop
async def test_an_image_whose_decode_fails_fails_alone_and_leaves_the_engine() -> None:
    engine = FakeStepEngine()
    engine.undecodable.add("nan")
    outcomes, after = await served(
        engine, [item("nan", seed=1), item("fine", seed=2)], [item("fine", seed=3)]
    )
    assert isinstance(outcomes[0], EngineFailure) and outcomes[1].seed == 2  # type: ignore[union-attr]
    assert after[0].seed == 3 and not engine.running  # the failed one was cancelled
    assert engine.cancelled == [1]


@in_loop
async def test_an_image_not_ready_waits_for_poke_while_the_others_are_served() -> None:
    engine = FakeStepEngine()
    loading = {"adapter"}
    steps = StepLoop(
        engine, metrics=Metrics(), max_batch_size=4, max_queue_items=32,
        ready=lambda _, it: it.prompt not in loading,
    )  # fmt: skip
    steps.start()
    (blocked,) = steps.submit([item("adapter", seed=1)])
    served = await asyncio.gather(*steps.submit([item(seed=2), item(seed=3)]))
    assert [r.seed for r in served] == [2, 3] and not blocked.done()
    loading.clear()
    steps.poke()  # what the adapter's loader calls when it is done
    assert (await blocked).seed == 1
    await steps.close()
    assert [1] in engine.steps and not any(1 in s for s in engine.steps[: len(engine.steps) - 2])
