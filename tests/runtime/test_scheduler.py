"""The step loop's policy (service/runtime/batching/scheduler.py) on its own: plans in, outputs
back, no event loop, threads, sleeps or clock. Each test plays engines' iterations by hand."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pytest

from model.errors import EngineFailure, EngineOutOfMemoryError, InvalidRequestError
from model.types import GenerationResult
from service.runtime.batching.scheduler import Image, Output, Plan, Scheduler, State, Update
from service.runtime.errors import NotReadyError
from tests.runtime.fakes import item

_handles = itertools.count(1)


def images(*seeds: int, steps: int = 2, prompt: str = "p") -> list[Image]:
    return [Image(item(prompt, seed=seed, steps=steps), cast(Any, None)) for seed in seeds]


def result(image: Image) -> GenerationResult:
    return GenerationResult(np.zeros((1, 1, 3), np.uint8), False, image.item.seed)


def seeds(found: list[Image] | list[tuple[Image, Any]]) -> list[int]:
    return [(each[0] if isinstance(each, tuple) else each).item.seed for each in found]


def admit(plan: Plan) -> Output:
    """An iteration that admits the plan and stops before any step."""
    return Output(admitted=[(image, next(_handles)) for image in plan.admit])


def step(
    scheduler: Scheduler, engine: int, *, finished: Sequence[Image] = (), error: Exception | None = None
) -> Update:
    """One iteration of ``engine``: its plan admitted, one step (or ``error``), ``finished`` retired."""
    plan = scheduler.schedule(engine)
    output = admit(plan)
    if error is not None:
        output.step_error = error
        return scheduler.update_from_output(engine, output)
    output.steps = [(1, 0.0)]
    held = {**scheduler.engines[engine].running, **{handle: image for image, handle in output.admitted}}
    output.results = [(handle, result(image)) for handle, image in held.items() if image in finished]
    return scheduler.update_from_output(engine, output)


def queued(*seeds: int, max_batch_size: int, **options: Any) -> tuple[Scheduler, list[Image]]:
    """One engine's scheduler holding an image per seed, added as one request: where most tests
    start, before the first plan."""
    scheduler = Scheduler(1, max_batch_size=max_batch_size, **options)
    added = images(*seeds)
    scheduler.add(added)
    return scheduler, added


def running(scheduler: Scheduler, engine: int = 0) -> list[int]:
    return seeds(list(scheduler.engines[engine].running.values()))


def test_waiting_images_are_admitted_oldest_first_within_the_room() -> None:
    scheduler = Scheduler(1, max_batch_size=2)
    first, second, third = images(1, 2, 3)
    scheduler.add([first])
    scheduler.add([second, third])
    plan = scheduler.schedule(0)
    assert seeds(plan.admit) == [1, 2] and plan.leave == []
    assert [image.state for image in (first, second, third)] == [State.ADMITTING] * 2 + [State.WAITING]
    scheduler.update_from_output(0, admit(plan))
    assert running(scheduler) == [1, 2] and first.state is State.RUNNING
    assert scheduler.schedule(0).admit == []  # full
    update = step(scheduler, 0, finished=[first])
    assert seeds(update.finished) == [1] and first.state is State.FINISHED
    assert seeds(scheduler.schedule(0).admit) == [3]  # the room a finished image left


def test_a_request_is_never_overtaken_by_later_images() -> None:
    scheduler = Scheduler(1, max_batch_size=1)
    request = images(1, 2, 3)
    later = images(9)
    scheduler.add(request)
    scheduler.add(later)
    order = []
    for _ in range(4):
        plan = scheduler.schedule(0)
        order += seeds(plan.admit)
        scheduler.update_from_output(0, admit(plan))
        step(scheduler, 0, finished=list(scheduler.engines[0].running.values()))
    assert order == [1, 2, 3, 9]


def test_empty_engines_share_new_images_and_a_busy_one_leaves_them_to_them() -> None:
    scheduler = Scheduler(3, max_batch_size=4)
    scheduler.add(images(1))
    scheduler.update_from_output(0, admit(scheduler.schedule(0)))
    scheduler.add(images(2, 3, 4, 5))
    assert scheduler.schedule(0).admit == []  # engines 1 and 2 hold nothing: they take these
    assert seeds(scheduler.schedule(1).admit) == [2, 3]  # half of the four, the oldest
    assert seeds(scheduler.schedule(2).admit) == [4, 5]


def test_a_cancelled_waiting_image_leaves_the_queue_at_once() -> None:
    scheduler, (gone, _kept) = queued(1, 2, max_batch_size=4)
    scheduler.cancel(gone)
    assert gone.state is State.CANCELLED and scheduler.waiting == 1
    assert seeds(scheduler.schedule(0).admit) == [2]
    scheduler.cancel(gone)  # a second cancel changes nothing
    assert gone.state is State.CANCELLED


def test_a_cancelled_running_image_leaves_its_engine_at_the_next_plan_and_frees_its_room() -> None:
    scheduler, (gone, _waiting) = queued(1, 2, max_batch_size=1)
    plan = scheduler.schedule(0)
    output = admit(plan)
    scheduler.update_from_output(0, output)
    scheduler.cancel(gone)
    assert scheduler.engines[0].held == 0 and scheduler.wants_plan(0)
    plan = scheduler.schedule(0)
    assert plan.leave == [output.admitted[0][1]] and seeds(plan.admit) == [2]


def test_an_image_cancelled_while_its_engine_admits_it_leaves_once_its_handle_is_known() -> None:
    scheduler, (gone,) = queued(1, max_batch_size=4)
    plan = scheduler.schedule(0)
    scheduler.cancel(gone)
    assert scheduler.wants_plan(0)
    output = admit(plan)
    update = scheduler.update_from_output(0, output)
    assert update.finished == update.failed == [] and running(scheduler) == []
    assert scheduler.schedule(0).leave == [output.admitted[0][1]]


def test_a_refused_admission_fails_only_that_image() -> None:
    scheduler, (refused, taken) = queued(1, 2, max_batch_size=4)
    plan = scheduler.schedule(0)
    error = InvalidRequestError("no")
    update = scheduler.update_from_output(0, Output(admitted=[(taken, 7)], refused=[(refused, error)]))
    assert update.failed == [(refused, error)] and refused.state is State.FAILED
    assert running(scheduler) == [2] and plan.admit == [refused, taken]


def test_out_of_memory_requeues_the_newest_half_first_in_line_and_the_room_grows_back() -> None:
    scheduler = Scheduler(1, max_batch_size=4)
    four = images(1, 2, 3, 4)
    scheduler.add(four)
    scheduler.add(images(5))
    scheduler.update_from_output(0, admit(scheduler.schedule(0)))
    update = step(scheduler, 0, error=EngineOutOfMemoryError("full"))
    assert seeds(update.requeued) == [3, 4] and update.out_of_memory_at == 4 and update.failed == []
    assert running(scheduler) == [1, 2] and scheduler.engines[0].room == 2
    assert all(image.state is State.WAITING and image.handle is None for image in four[2:])
    assert len(scheduler.schedule(0).leave) == 2  # their handles leave the engine
    step(scheduler, 0, finished=[four[0]])
    assert scheduler.engines[0].room == 3
    assert seeds(scheduler.schedule(0).admit) == [3, 4]  # back first in line, within the room


def test_an_image_that_does_not_fit_alone_fails_with_out_of_memory() -> None:
    scheduler, (alone,) = queued(1, max_batch_size=4)
    error = EngineOutOfMemoryError("too big")
    update = step(scheduler, 0, error=error)
    assert update.failed == [(alone, error)] and alone.state is State.FAILED
    assert scheduler.engines[0].failures == 0 and not update.counted_failure  # out of memory: no fault


def test_after_another_failure_each_image_runs_alone_so_only_the_culprit_fails() -> None:
    scheduler, (good, bad, other) = queued(1, 2, 3, max_batch_size=4)
    update = step(scheduler, 0, error=EngineFailure("boom"))
    assert update.isolated == 3 and seeds(update.requeued) == [1, 2, 3] and update.counted_failure
    plan = scheduler.schedule(0)
    assert seeds(plan.admit) == [1]  # a suspect runs alone
    scheduler.update_from_output(0, admit(plan))
    assert seeds(step(scheduler, 0, finished=[good]).finished) == [1]
    failed = step(scheduler, 0, error=EngineFailure("boom"))
    assert seeds(failed.failed) == [2] and bad.state is State.FAILED
    assert seeds(step(scheduler, 0, finished=[other]).finished) == [3]
    assert scheduler.engines[0].failures == 0  # the successful step reset the count


def test_failures_in_a_row_take_the_engine_out_and_its_suspects_run_in_company_elsewhere() -> None:
    scheduler = Scheduler(2, max_batch_size=4, max_failures=2)
    held = images(1)
    scheduler.add(held)
    scheduler.update_from_output(0, admit(scheduler.schedule(0)))
    suspects = images(2, 3, 4)
    scheduler.add(suspects)
    assert step(scheduler, 1, error=EngineFailure("dead")).isolated == 3
    update = step(scheduler, 1, error=EngineFailure("dead"))  # 2, alone: the second in a row
    assert update.taken_out and seeds(update.failed) == [2] and not scheduler.engines[1].serving
    assert [image.suspect_on for image in suspects[1:]] == [None, None]
    assert seeds(scheduler.schedule(0).admit) == [3, 4]  # together, on the engine that serves
    assert scheduler.schedule(1).admit == []


def test_when_no_engine_is_left_the_waiting_images_fail_not_ready() -> None:
    scheduler, _ = queued(1, 2, max_batch_size=1, max_failures=1)
    update = step(scheduler, 0, error=EngineFailure("dead"))
    assert update.taken_out and seeds(update.failed) == [1, 2]
    assert isinstance(update.failed[1][1], NotReadyError) and scheduler.serving == []


def test_an_image_whose_decode_fails_fails_alone_and_leaves_the_engine() -> None:
    scheduler, (broken, fine) = queued(1, 2, max_batch_size=4)
    plan = scheduler.schedule(0)
    output = admit(plan)
    (_, h1), (_, h2) = output.admitted
    error = EngineFailure("NaN")
    output.steps, output.results = [(2, 0.0)], [(h1, error), (h2, result(fine))]
    update = scheduler.update_from_output(0, output)
    assert update.failed == [(broken, error)] and seeds(update.finished) == [2]
    assert scheduler.schedule(0).leave == [h1]


def test_an_image_that_is_not_ready_waits_without_holding_up_the_others() -> None:
    loading = {"adapter-a"}
    scheduler = Scheduler(2, max_batch_size=4, ready=lambda engine, it: it.prompt not in loading)
    (blocked,) = images(1, prompt="adapter-a")
    scheduler.add([blocked, *images(2, 3)])
    assert scheduler.has_work(0)
    assert seeds(scheduler.schedule(0).admit) == [2]  # engine 1 is empty: its share is the other
    assert seeds(scheduler.schedule(1).admit) == [3]
    assert blocked.state is State.WAITING and scheduler.waiting == 1 and not scheduler.has_work(0)
    loading.clear()  # the adapter finished loading
    assert scheduler.has_work(0)
    scheduler.update_from_output(0, Output())
    scheduler.update_from_output(1, Output())
    assert seeds(scheduler.schedule(0).admit) == [1]


def test_readiness_is_asked_per_engine() -> None:
    scheduler = Scheduler(2, max_batch_size=4, ready=lambda engine, it: engine == 1)
    scheduler.add(images(1))
    assert scheduler.schedule(0).admit == [] and not scheduler.has_work(0)
    assert seeds(scheduler.schedule(1).admit) == [1]


def test_a_waiting_image_that_could_join_ends_the_engines_run_of_steps() -> None:
    scheduler = Scheduler(1, max_batch_size=2)
    scheduler.add(images(1))
    scheduler.update_from_output(0, admit(scheduler.schedule(0)))
    assert not scheduler.wants_plan(0)
    scheduler.add(images(2))
    assert scheduler.wants_plan(0)
    scheduler.engines[0].room = 1  # after out of memory: no room, it steps on
    assert not scheduler.wants_plan(0)


def test_abandon_fails_every_waiting_and_held_image() -> None:
    scheduler, (held, waiting) = queued(1, 2, max_batch_size=1)
    output = admit(scheduler.schedule(0))
    scheduler.update_from_output(0, output)
    assert seeds(scheduler.abandon()) == [2, 1]
    assert held.state is waiting.state is State.FAILED and scheduler.waiting == 0
    assert scheduler.schedule(0).leave == [output.admitted[0][1]]


@pytest.mark.parametrize("error", [EngineFailure("boom"), RuntimeError("kernel"), ValueError("odd")])
def test_any_failure_but_out_of_memory_counts_towards_taking_the_engine_out(error: Exception) -> None:
    scheduler = Scheduler(1, max_batch_size=4, max_failures=3)
    scheduler.add(images(1, 2))
    update = step(scheduler, 0, error=error)
    assert update.counted_failure and scheduler.engines[0].failures == 1 and not update.taken_out
