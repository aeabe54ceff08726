"""Which models of a library are on each device, as the scheduler plans it (residency.py with
``model_needs``): loads in the background, installs and evictions at step boundaries, never a model
with running images out, draining so that alternating requests cannot starve a model, affinity
across engines, failed loads. No threads, engines or files: plans in, outputs back."""

from __future__ import annotations

import itertools
from typing import Any, cast

import numpy as np

from model.errors import ModelLoadError
from model.types import GenerationItem, GenerationResult
from service.runtime.batching.residency import Placement, model_needs
from service.runtime.batching.scheduler import Image, Output, Scheduler, State

_seeds = itertools.count(1)


def image(model: str | None = None, caller: str = "") -> Image:
    item = GenerationItem("p", seed=next(_seeds), num_inference_steps=3, model=model)
    return Image(item, cast(Any, None), caller=caller)


def scheduler(cap: int, engines: int = 1) -> Scheduler:
    placements = [Placement(cap, model_needs("base"), "model", ["base"]) for _ in range(engines)]
    return Scheduler(engines, max_batch_size=4, models=placements)


def admitted(scheduler: Scheduler, engine: int = 0) -> list[Image]:
    """One plan carried out: its images admitted (handles made up), no step."""
    plan = scheduler.schedule(engine)
    scheduler.update_from_output(engine, Output(admitted=[(each, next(_seeds)) for each in plan.admit]))
    return plan.admit


def finish(scheduler: Scheduler, images: list[Image], engine: int = 0) -> None:
    done = GenerationResult(np.zeros((8, 8, 3), np.uint8), None, 0)
    scheduler.update_from_output(engine, Output(results=[(each.handle, done) for each in images]))  # type: ignore[misc]


def test_the_default_model_serves_at_once_and_another_loads_before_its_image_runs() -> None:
    plans = scheduler(cap=2)
    default, other = image(), image("two")
    plans.add([default, other])
    plan = plans.schedule(0)
    assert plan.admit == [default] and plan.models.read == ["two"] and not plan.models.install
    plans.model_loaded(0, "two")
    assert plans.wants_plan(0)
    plan = plans.schedule(0)
    assert plan.models.install == ["two"] and plan.models.evict == [] and plan.admit == [other]


def test_a_model_in_use_stays_and_younger_images_of_it_wait_behind_the_other_model() -> None:
    plans = scheduler(cap=1)
    first = image()
    plans.add([first])
    assert admitted(plans) == [first]
    other, younger = image("two"), image()
    plans.add([other, younger])
    plan = plans.schedule(0)
    # "two" loads meanwhile; base is in use, so it cannot leave: the engine drains
    assert plan.models.read == ["two"] and plan.admit == []
    plans.model_loaded(0, "two")
    plan = plans.schedule(0)
    assert plan.models.install == [] and plan.admit == []  # the younger base image does not get in
    finish(plans, [first])
    plan = plans.schedule(0)
    assert plan.models.evict == ["base"] and plan.models.install == ["two"] and plan.admit == [other]
    # and then base comes back for the younger image, once "two"'s image is done
    assert plans.schedule(0).models.read == ["base"]
    plans.model_loaded(0, "base")
    finish(plans, [other])
    plan = plans.schedule(0)
    assert plan.models.evict == ["two"] and plan.models.install == ["base"] and plan.admit == [younger]


def test_a_model_that_fails_to_load_fails_its_images_and_is_tried_again_later() -> None:
    plans = scheduler(cap=2)
    first = image("two")
    plans.add([first])
    plans.schedule(0)
    plans.model_loaded(0, "two")
    plan = plans.schedule(0)
    assert plan.models.install == ["two"] and plan.admit == [first]
    late = image("two")  # arrives while the engine installs it
    plans.add([late])
    # the engine could not install it, so it refused the image it was to admit (ModelSet says why)
    refusal = ModelLoadError("model two could not be loaded: its unet has no weights")
    update = plans.update_from_output(
        0, Output(refused=[(first, refusal)], model_failures={"two": "its unet has no weights"})
    )
    assert [each for each, _ in update.failed] == [first, late]
    assert all(isinstance(error, ModelLoadError) for _, error in update.failed)
    assert "model two could not be loaded: its unet has no weights" in str(update.failed[1][1])
    assert first.state is State.FAILED and late.state is State.FAILED
    again = image("two")
    plans.add([again])
    assert plans.schedule(0).models.read == ["two"]  # mended meanwhile, perhaps: it is read again


def test_an_engine_leaves_a_model_to_the_engine_that_has_it() -> None:
    plans = scheduler(cap=2, engines=2)
    plans.add([image("two")])
    assert plans.schedule(0).models.read == ["two"]
    plans.add([image("two")])
    assert plans.schedule(1).models.read == []  # engine 0 is loading it and has room


def test_with_room_on_the_device_nothing_waits_for_a_load() -> None:
    plans = scheduler(cap=2)
    running = image()
    plans.add([running])
    admitted(plans)
    other, younger = image("two"), image()
    plans.add([other, younger])
    plan = plans.schedule(0)
    assert plan.models.read == ["two"] and plan.admit == [younger]
