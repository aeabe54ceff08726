"""The fair share per caller and the step's cost caps (scheduler.py, fairness.py, cost.py), played by
hand: plans in, outputs back, no event loop, thread, sleep or clock. A simulated engine steps the
plan's images and reports a step time from a price list, as a lane measures it."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any, cast

import numpy as np
import pytest

from model.types import GenerationItem, GenerationResult
from service.runtime.batching.cost import StepCost, group_of
from service.runtime.batching.fairness import FairQueue
from service.runtime.batching.room import caller_bound, check_room, queue_bound
from service.runtime.batching.scheduler import Image, Output, Scheduler, State
from service.runtime.errors import ContractError, QueueFullError
from service.runtime.jobs import caller_of, caller_weights, images_per_caller
from service.runtime.metrics import Metrics
from service.settings import Settings

_handles = itertools.count(1)


def images(caller: str, count: int, *, steps: int = 4, size: int = 64, adapters: Any = ()) -> list[Image]:
    made = []
    for _ in range(count):
        item = GenerationItem("p", seed=next(_handles), num_inference_steps=steps, height=size, width=size)
        if adapters:
            item = GenerationItem(
                "p", seed=item.seed, num_inference_steps=steps, height=size, width=size, adapters=adapters
            )
        made.append(Image(item, cast(Any, None), caller=caller))
    return made


class Engine:
    """A simulated engine: per-image positions; a step's time is ``per_group`` per UNet call plus
    ``per_row`` per row (a CPU: no fixed part), as the lane would measure it."""

    def __init__(self, scheduler: Scheduler, *, per_group: float = 0.0, per_row: float = 1.0) -> None:
        self.scheduler = scheduler
        self.per_group, self.per_row = per_group, per_row
        self.position: dict[int, int] = {}
        self.clock = 0.0
        self.done_at: dict[int, float] = {}  # seed -> simulated time its image finished
        self.stepped: Counter[str] = Counter()  # caller -> image-steps
        self.groups_per_step: list[int] = []

    def iterate(self) -> None:
        """One plan, one step, retire the finished."""
        plan = self.scheduler.schedule(0)
        output = Output(admitted=[(image, next(_handles)) for image in plan.admit])
        held = [*plan.running, *output.admitted]
        for _, handle in output.admitted:
            self.position[handle] = 0
        stepping = held if plan.step is None else [(i, h) for i, h in held if any(i is s for s in plan.step)]
        if not stepping:
            self.scheduler.update_from_output(0, output)
            return
        groups = Counter(group_of(image.item) for image, _ in stepping)
        seconds = self.per_group * len(groups) + self.per_row * len(stepping)
        self.clock += seconds
        self.groups_per_step.append(len(groups))
        output.steps = [(len(stepping), seconds)]
        for image, handle in stepping:
            self.position[handle] += 1
            self.stepped[image.caller] += 1
            if self.position[handle] >= image.item.num_inference_steps:
                output.results.append((handle, GenerationResult(np.zeros((1, 1, 3), np.uint8), False, 0)))
                self.done_at[image.item.seed] = self.clock
        self.scheduler.update_from_output(0, output)

    def run(self, until: Any, limit: int = 10_000) -> None:
        for _ in range(limit):
            if until():
                return
            self.iterate()
        raise AssertionError("the simulation did not finish")


def latency_alone(steps: int = 4) -> float:
    engine = Engine(Scheduler(1, max_batch_size=8))
    (alone,) = images("b", 1, steps=steps)
    engine.scheduler.add([alone])
    engine.run(lambda: alone.state is State.FINISHED)
    return engine.done_at[alone.item.seed]


@pytest.mark.parametrize("per_group", [0.0, 4.0])  # a CPU (every row costs) and a GPU-like device
def test_a_single_image_behind_a_flood_takes_about_twice_its_time_alone(per_group: float) -> None:
    scheduler = Scheduler(1, max_batch_size=8)
    engine = Engine(scheduler, per_group=per_group)
    flood = images("a", 64)
    scheduler.add(flood)
    for _ in range(3):  # the flood is running, the engine full
        engine.iterate()
    assert scheduler.engines[0].held == 8
    (single,) = images("b", 1)
    scheduler.add([single])
    started = engine.clock
    engine.run(lambda: single.state is State.FINISHED)
    quiet = Engine(Scheduler(1, max_batch_size=8), per_group=per_group)
    (alone,) = images("b", 1)
    quiet.scheduler.add([alone])
    quiet.run(lambda: alone.state is State.FINISHED)
    waited = engine.done_at[single.item.seed] - started
    assert waited <= 2.05 * quiet.done_at[alone.item.seed], (waited, quiet.done_at[alone.item.seed])
    # ... and the flood lost nothing: every image finishes, none restarted
    engine.run(lambda: all(image.state is State.FINISHED for image in flood))
    assert engine.stepped["a"] == 64 * 4


def test_without_a_second_caller_the_flood_runs_full_batches() -> None:
    scheduler = Scheduler(1, max_batch_size=8)
    engine = Engine(scheduler)
    flood = images("a", 16)
    scheduler.add(flood)
    engine.iterate()
    assert scheduler.engines[0].held == 8 and len(scheduler.engines[0].stepping) == 8


def test_weighted_callers_share_steps_by_weight() -> None:
    scheduler = Scheduler(1, max_batch_size=2, weights={"heavy": 2.0})
    engine = Engine(scheduler, per_group=10.0)  # rows nearly free: the cap lets both run
    scheduler.add(images("heavy", 60, steps=2))
    scheduler.add(images("light", 60, steps=2))
    for _ in range(60):
        engine.iterate()
    ratio = engine.stepped["heavy"] / engine.stepped["light"]
    assert 1.6 <= ratio <= 2.5, engine.stepped


def test_two_equal_floods_alternate_admissions() -> None:
    queue = FairQueue()
    a, b = images("a", 4), images("b", 4)
    queue.add(a)
    queue.add(b)
    order = queue.fair_order(StepCost())
    assert [cast(Image, image).caller for image in order] == ["a", "b"] * 4


def test_an_idle_caller_banks_no_credit() -> None:
    scheduler = Scheduler(1, max_batch_size=4)
    engine = Engine(scheduler)
    early = images("b", 1)
    scheduler.add(early)
    engine.run(lambda: early[0].state is State.FINISHED)
    scheduler.add(images("a", 40))
    for _ in range(20):
        engine.iterate()
    # b comes back after a's 20 steps: it is first in line, but gets no 20 steps of credit
    back = images("b", 6)
    scheduler.add(back)
    before = Counter(engine.stepped)
    for _ in range(12):
        engine.iterate()
    gained = {name: engine.stepped[name] - before[name] for name in ("a", "b")}
    assert gained["a"] > 0 and gained["b"] > 0, gained


def test_a_step_opens_at_most_max_groups_and_none_starves() -> None:
    scheduler = Scheduler(1, max_batch_size=8, max_groups=2)
    engine = Engine(scheduler)
    sizes = [64, 72, 80, 88]
    queued = [image for size in sizes for image in images("a", 2, size=size)]
    scheduler.add(queued)
    engine.run(lambda: all(image.state is State.FINISHED for image in queued))
    assert max(engine.groups_per_step) <= 2


def test_an_image_that_joins_an_open_group_is_preferred() -> None:
    scheduler = Scheduler(1, max_batch_size=8, max_groups=1)
    engine = Engine(scheduler)
    first = images("a", 1, size=64)
    other = images("a", 1, size=96)
    same = images("a", 1, size=64)
    scheduler.add([*first, *other, *same])
    engine.iterate()
    stepping = scheduler.engines[0].stepping
    assert {image.item.seed for image in stepping} == {first[0].item.seed, same[0].item.seed}


def test_adapter_sets_are_groups_too() -> None:
    scheduler = Scheduler(1, max_batch_size=8, max_groups=2)
    engine = Engine(scheduler, per_group=3.0)
    queued = [
        *images("a", 2, adapters=(("x", 1.0),)),
        *images("a", 2, adapters=(("y", 1.0),)),
        *images("a", 2, adapters=(("z", 1.0),)),
    ]
    scheduler.add(queued)
    engine.run(lambda: all(image.state is State.FINISHED for image in queued))
    assert max(engine.groups_per_step) <= 2


def test_step_prices_are_fitted_from_measured_steps() -> None:
    cost = StepCost()
    assert cost.estimate({(512, 512, ()): 2}) == 2 * cost.estimate({(512, 512, ()): 1})  # before any step
    one_group = StepCost()
    for _ in range(5):  # the same step each time: the prices cannot be told apart; all on the rows
        one_group.observe({(512, 512, ()): 8}, 0.8)
    assert one_group.per_group == pytest.approx(0.0, abs=1e-3)
    group = (512, 512, ())
    other = (512, 512, (("x", 1.0),))
    for rows in (1, 2, 4, 8, 3, 6):
        for groups in ({group: rows}, {group: rows, other: rows}):
            cost.observe(groups, 0.5 * len(groups) + 0.02 * sum(groups.values()))
    assert cost.estimate({group: 4, other: 4}) == pytest.approx(2 * 0.5 + 8 * 0.02, rel=0.05)
    assert cost.per_group == pytest.approx(0.5, rel=0.05)
    assert cost.per_row == pytest.approx(0.02, rel=0.1)


def test_a_key_past_its_limit_gets_429_and_a_request_larger_than_the_limit_422() -> None:
    metrics = Metrics()

    def check(held: int, incoming: int) -> None:
        bounds = [queue_bound(0, 64), caller_bound(held, 4)]
        check_room(closed=False, incoming=incoming, bounds=bounds, metrics=metrics)

    check(3, 1)
    with pytest.raises(QueueFullError, match="SD_MAX_IMAGES_PER_KEY") as refused:
        check(4, 1)
    assert refused.value.waiting == 4
    with pytest.raises(ContractError, match="at most 4 at once from one API key"):
        check(0, 5)


def test_a_cancelled_paused_image_leaves_its_engine() -> None:
    scheduler = Scheduler(1, max_batch_size=2)
    engine = Engine(scheduler)
    flood = images("a", 2, steps=20)
    scheduler.add(flood)
    engine.iterate()
    single = images("b", 1, steps=20)
    scheduler.add(single)
    engine.iterate()
    paused = [image for image in flood if not any(image is s for s in scheduler.engines[0].stepping)]
    assert paused, "a flood image pauses while the newcomer runs"
    scheduler.cancel(paused[0])
    assert scheduler.wants_plan(0) and paused[0].state is State.CANCELLED
    assert scheduler.schedule(0).leave == [paused[0].handle]


def test_key_weights_and_the_per_key_default_come_from_the_settings() -> None:
    settings = Settings(api_keys="first,second", key_weights="2,1", max_queue_items=10)
    assert caller_weights(settings) == {caller_of("first"): 2.0, caller_of("second"): 1.0}
    assert images_per_caller(settings) == 5  # half the queue with keys
    assert images_per_caller(Settings(max_queue_items=10)) is None  # one caller: the queue's bound
    assert images_per_caller(Settings(api_keys="k", max_images_per_key=3)) == 3
    for wrong, problem in (("2", "1 weights for 2 keys"), ("x,1", "positive numbers"), ("0,1", "positive")):
        with pytest.raises(ValueError, match=problem):
            Settings(api_keys="first,second", key_weights=wrong)


def test_a_preview_is_charged_to_its_callers_share() -> None:
    scheduler = Scheduler(1, max_batch_size=4)
    engine = Engine(scheduler)
    (polled,) = images("a", 1, steps=10)
    (other,) = images("b", 1, steps=10)
    scheduler.add([polled, other])
    engine.iterate()
    before = scheduler._queue.passes()
    scheduler.update_from_output(0, Output(previews=[(polled, 5.0)]))
    after = scheduler._queue.passes()
    assert after["a"] == pytest.approx(before["a"] + 5.0) and after["b"] == before["b"]


def test_polls_ask_one_preview_a_second_per_request() -> None:
    scheduler = Scheduler(1, max_batch_size=4)
    engine = Engine(scheduler)
    request = images("a", 2, steps=10)
    scheduler.add(request)
    engine.iterate()
    scheduler.ask_preview(request, now=100.0)
    assert scheduler.wants_plan(0)
    assert set(scheduler.schedule(0).preview) == set(request)
    scheduler.ask_preview(request, now=100.5)  # polled again within the second: nothing more
    assert not scheduler.wants_plan(0) and not scheduler.schedule(0).preview
    scheduler.ask_preview(request, now=101.0)
    assert set(scheduler.schedule(0).preview) == set(request)
