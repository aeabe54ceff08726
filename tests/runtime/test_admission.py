"""The lane admits a plan's newcomers together (one text-encoder call, one VAE encoder pass per size
for images in: Engine.admit_all), and when the engine cannot take one of them (it admits all or
none), each alone, so that only that one is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from model.errors import InvalidRequestError
from model.types import GenerationItem
from service.runtime.batching.steploop import StepLoop
from service.runtime.metrics import Metrics
from tests.runtime.fakes import item
from tests.runtime.stepfakes import FakeStepEngine


class Batching(FakeStepEngine):
    """Records each admission call's seeds; refuses seed 13 (as an engine refuses what it cannot run)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[int]] = []

    def admit_all(self, items: Sequence[GenerationItem]) -> list[int]:
        if any(each.seed == 13 for each in items):
            raise InvalidRequestError("seed 13: this engine cannot take it")
        self.calls.append([each.seed for each in items])
        return [FakeStepEngine.admit(self, each) for each in items]

    def admit(self, item: GenerationItem) -> int:
        return self.admit_all([item])[0]


async def serve(engine: Batching, seeds: list[int]) -> list[object]:
    steps = StepLoop([engine], max_batch_size=8, max_queue_items=32, metrics=Metrics())
    steps.start()
    try:
        futures = steps.submit([item(seed=seed, steps=2) for seed in seeds])
        return list(await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30))
    finally:
        await steps.close()


def test_a_requests_images_are_admitted_in_one_call() -> None:
    engine = Batching()
    outcomes = asyncio.run(serve(engine, [1, 2, 3, 4]))
    assert [getattr(outcome, "seed", None) for outcome in outcomes] == [1, 2, 3, 4]
    assert engine.calls == [[1, 2, 3, 4]]


def test_one_image_the_engine_cannot_take_is_refused_alone() -> None:
    engine = Batching()
    outcomes = asyncio.run(serve(engine, [1, 13, 3]))
    assert getattr(outcomes[0], "seed", None) == 1 and getattr(outcomes[2], "seed", None) == 3
    assert isinstance(outcomes[1], InvalidRequestError)
    assert engine.calls == [[1], [3]]  # the call of all three failed: then one by one


def test_a_single_newcomer_goes_alone() -> None:
    engine = Batching()
    asyncio.run(serve(engine, [7]))
    assert engine.calls == [[7]]
