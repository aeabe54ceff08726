"""What is on each device, as the scheduler plans it (residency.py, scheduler.py): reads, installs and
evictions in the plan, never a held image's adapter out, affinity across engines, failures. No
threads, engines or files: plans in, outputs back."""

from __future__ import annotations

import itertools
from typing import Any, cast

from model.types import GenerationItem, adapter_set
from service.runtime.batching.scheduler import Image, Output, Scheduler, State

_seeds = itertools.count(1)


def image(*names: str, steps: int = 3) -> Image:
    item = GenerationItem(
        "p", seed=next(_seeds), num_inference_steps=steps, adapters=adapter_set(dict.fromkeys(names, 1.0))
    )
    return Image(item, cast(Any, None))


def admitted(scheduler: Scheduler, engine: int = 0) -> list[Image]:
    """One plan carried out: its images admitted (handles made up), no step."""
    plan = scheduler.schedule(engine)
    output = Output(admitted=[(each, next(_seeds)) for each in plan.admit])
    scheduler.update_from_output(engine, output)
    return plan.admit


def test_a_missing_adapter_is_read_then_installed_then_its_image_admitted() -> None:
    scheduler = Scheduler(1, max_batch_size=4, adapter_caps=[2])
    waiting = image("style")
    scheduler.add([waiting])
    assert scheduler.has_work(0)
    plan = scheduler.schedule(0)
    assert plan.adapters.read == ["style"] and plan.admit == [] and not plan.adapters.install
    assert not scheduler.has_work(0)  # reading: nothing to do until it is read
    scheduler.adapter_read(0, "style")
    assert scheduler.wants_plan(0) and scheduler.has_work(0)
    plan = scheduler.schedule(0)
    assert plan.adapters.install == ["style"] and plan.adapters.evict == [] and plan.admit == [waiting]


def test_an_image_whose_adapter_is_on_the_device_runs_without_waiting() -> None:
    scheduler = Scheduler(1, max_batch_size=4, adapter_caps=[2])
    scheduler.add([image("style")])
    scheduler.schedule(0)
    scheduler.adapter_read(0, "style")
    admitted(scheduler)
    second = image("style")
    scheduler.add([second])
    plan = scheduler.schedule(0)
    assert plan.admit == [second] and not plan.adapters


def test_the_least_recently_used_adapter_goes_but_never_one_a_held_image_uses() -> None:
    scheduler = Scheduler(1, max_batch_size=4, adapter_caps=[1])
    first = image("style", steps=5)
    scheduler.add([first])
    scheduler.schedule(0)
    scheduler.adapter_read(0, "style")
    assert admitted(scheduler) == [first]
    other = image("kohya")
    scheduler.add([other])
    assert scheduler.schedule(0).adapters.read == ["kohya"]
    scheduler.adapter_read(0, "kohya")
    plan = scheduler.schedule(0)
    assert plan.adapters.evict == [] and plan.adapters.install == [] and plan.admit == []  # style runs
    scheduler.cancel(first)  # the style image leaves; nothing pins style any more
    plan = scheduler.schedule(0)
    assert plan.adapters.evict == ["style"] and plan.adapters.install == ["kohya"] and plan.admit == [other]


def test_an_image_not_ready_holds_up_nobody_behind_it() -> None:
    scheduler = Scheduler(1, max_batch_size=4, adapter_caps=[2])
    waits, plain = image("style"), image()
    scheduler.add([waits, plain])
    plan = scheduler.schedule(0)
    assert plan.admit == [plain] and plan.adapters.read == ["style"]


def test_a_request_lapses_when_its_image_leaves_the_queue() -> None:
    scheduler = Scheduler(1, max_batch_size=4, adapter_caps=[1])
    gone = image("style")
    scheduler.add([gone])
    scheduler.schedule(0)
    scheduler.cancel(gone)
    scheduler.adapter_read(0, "style")
    plan = scheduler.schedule(0)
    assert not plan.adapters.install and not plan.admit  # read, but nobody wants it on the device


def test_an_adapter_in_demand_is_read_where_it_is_already() -> None:
    scheduler = Scheduler(2, max_batch_size=4, adapter_caps=[2, 2])
    scheduler.add([image("style")])
    assert scheduler.schedule(0).adapters.read == ["style"]
    scheduler.add([image("style")])
    assert not scheduler.schedule(1).adapters.read  # engine 0 reads it and has room
    scheduler.adapter_read(0, "style")
    assert len(admitted(scheduler, 0)) + len(admitted(scheduler, 0)) == 2
    assert not scheduler.engines[1].placement.reading and not scheduler.engines[1].placement.resident


def test_an_adapter_that_fails_to_install_fails_the_images_waiting_for_it() -> None:
    scheduler = Scheduler(1, max_batch_size=1, adapter_caps=[2])
    first, second = image("style"), image("style")
    scheduler.add([first, second])
    scheduler.schedule(0)
    scheduler.adapter_read(0, "style")
    plan = scheduler.schedule(0)
    assert plan.adapters.install == ["style"] and plan.admit == [first]
    update = scheduler.update_from_output(
        0,
        Output(refused=[(first, ValueError("no"))], adapter_failures={"style": "style.safetensors is gone"}),
    )
    failed = {id(each): str(error) for each, error in update.failed}
    assert "adapter style could not be loaded: style.safetensors is gone" in failed[id(second)]
    assert second.state is State.FAILED and scheduler.waiting == 0


def test_engines_without_adapters_plan_nothing() -> None:
    scheduler = Scheduler(1, max_batch_size=4)
    with_adapter = image("style")
    scheduler.add([with_adapter])
    plan = scheduler.schedule(0)
    assert plan.admit == [with_adapter] and not plan.adapters  # the engine refuses it at admission
