"""The request-level batcher (service/runtime/batching/batcher.py) against a fake engine, without HTTP."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from model.errors import EngineFailure, EngineOutOfMemoryError
from service.runtime.batching.batcher import Batcher
from service.runtime.errors import ContractError, QueueFullError, ShuttingDownError
from service.runtime.metrics import Metrics
from tests.runtime.fakes import FakeEngine, item


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


class Running:
    """A started batcher; closed at the end of the ``async with``."""

    def __init__(self, engine: FakeEngine, **options: Any) -> None:
        defaults = {"max_batch_size": 4, "max_wait_s": 0.05, "max_queue_items": 16}
        self.engine = engine
        self.metrics = Metrics()
        self.batcher = Batcher(engine, metrics=self.metrics, **{**defaults, **options})

    async def __aenter__(self) -> Batcher:
        self.batcher.start()
        return self.batcher

    async def __aexit__(self, *_: object) -> None:
        await self.batcher.close()


def gauge(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None
    return value


def test_concurrent_images_with_one_key_share_a_batch_up_to_the_limit() -> None:
    async def test() -> None:
        engine = FakeEngine()
        async with Running(engine, max_batch_size=4, max_wait_s=0.2) as batcher:
            futures = batcher.submit([item(seed=i) for i in range(6)])
            results = await asyncio.gather(*futures)
        assert [r.seed for r in results] == list(range(6))
        assert [len(b) for b in engine.batches] == [4, 2]

    run(test)


def test_images_with_different_steps_never_share_a_batch() -> None:
    async def test() -> None:
        engine = FakeEngine()
        async with Running(engine) as batcher:
            futures = batcher.submit([item(steps=2), item(steps=3), item(steps=2)])
            await asyncio.gather(*futures)
        assert sorted([i.num_inference_steps for i in b] for b in engine.batches) == [[2, 2], [3]]

    run(test)


def test_a_full_queue_refuses_the_whole_request_and_keeps_nothing_of_it() -> None:
    async def test() -> None:
        engine = FakeEngine()
        engine.gate = threading.Event()  # hold the engine so the queue fills
        async with Running(engine, max_batch_size=1, max_wait_s=0, max_queue_items=3) as batcher:
            first = batcher.submit([item(seed=0)])
            await asyncio.sleep(0.05)  # the first image is in the engine now
            queued = batcher.submit([item(seed=1), item(seed=2)])
            with pytest.raises(QueueFullError, match="queue is full"):
                batcher.submit([item(seed=3), item(seed=4)])
            engine.gate.set()
            results = await asyncio.gather(*first, *queued)
        assert [r.seed for r in results] == [0, 1, 2]
        assert all(i.seed not in (3, 4) for b in engine.batches for i in b)

    run(test)


def test_a_cancelled_image_leaves_the_queue_at_once() -> None:
    async def test() -> None:
        engine = FakeEngine()
        engine.gate = threading.Event()
        runner = Running(engine, max_batch_size=1, max_wait_s=0)
        async with runner as batcher:
            busy = batcher.submit([item(seed=0)])
            await asyncio.sleep(0.05)
            gone = batcher.submit([item(seed=1), item(seed=2)])
            assert gauge(runner.metrics, "sd_queue_depth") == 2
            for future in gone:
                future.cancel()
            await asyncio.sleep(0)
            assert gauge(runner.metrics, "sd_queue_depth") == 0
            engine.gate.set()
            await asyncio.gather(*busy)
            kept = batcher.submit([item(seed=3)])
            await asyncio.gather(*kept)
        assert [[i.seed for i in b] for b in engine.batches] == [[0], [3]]

    run(test)


def test_a_failing_batch_is_retried_item_by_item_so_only_the_culprit_fails() -> None:
    async def test() -> None:
        engine = FakeEngine()
        engine.fail_prompts.add("bad")
        async with Running(engine, max_batch_size=3, max_wait_s=0.1) as batcher:
            culprit = batcher.submit([item("bad", seed=0)])
            neighbours = batcher.submit([item("good", seed=1), item("good", seed=2)])
            outcomes = await asyncio.gather(*culprit, *neighbours, return_exceptions=True)
        assert isinstance(outcomes[0], EngineFailure)
        assert [o.seed for o in outcomes[1:]] == [1, 2]  # type: ignore[union-attr]
        assert [len(b) for b in engine.batches] == [3, 1, 1, 1]  # together once, then one by one

    run(test)


def test_a_request_larger_than_the_whole_queue_is_refused_as_invalid_not_busy() -> None:
    async def test() -> None:
        async with Running(FakeEngine(), max_queue_items=3) as batcher:
            with pytest.raises(ContractError, match="queues at most 3"):
                batcher.submit([item(seed=i) for i in range(4)])

    run(test)


def test_out_of_memory_splits_and_only_an_image_too_big_alone_fails() -> None:
    async def test() -> None:
        engine = FakeEngine(max_rows=1)
        async with Running(engine, max_batch_size=4, max_wait_s=0.1) as batcher:
            results = await asyncio.gather(*batcher.submit([item(seed=i) for i in range(4)]))
        assert [r.seed for r in results] == [0, 1, 2, 3]
        zero = FakeEngine(max_rows=0)
        async with Running(zero) as batcher:
            (outcome,) = await asyncio.gather(*batcher.submit([item()]), return_exceptions=True)
        assert isinstance(outcome, EngineOutOfMemoryError)

    run(test)


def test_metrics_count_images_flags_and_batches() -> None:
    async def test() -> None:
        engine = FakeEngine()
        engine.flag_prompts.add("flag me")
        runner = Running(engine, max_batch_size=4, max_wait_s=0.1)
        async with runner as batcher:
            await asyncio.gather(*batcher.submit([item("flag me"), item("fine", seed=1)]))
        metrics = runner.metrics
        assert gauge(metrics, "sd_images_generated_total", {"engine": "0"}) == 2
        assert gauge(metrics, "sd_images_flagged_total") == 1
        assert gauge(metrics, "sd_batch_size_count", {"engine": "0"}) == 1

    run(test)


def test_close_fails_what_is_queued_with_shutting_down_and_refuses_new_images() -> None:
    async def test() -> None:
        engine = FakeEngine()
        engine.gate = threading.Event()
        runner = Running(engine, max_batch_size=1, max_wait_s=0)
        await runner.__aenter__()
        batcher = runner.batcher
        running = batcher.submit([item(seed=0)])
        await asyncio.sleep(0.05)
        queued = batcher.submit([item(seed=1)])
        engine.gate.set()
        await batcher.close()
        assert isinstance(queued[0].exception(), ShuttingDownError)
        # The image in the engine at close either finished or was failed the same way, never lost.
        (outcome,) = await asyncio.gather(*running, return_exceptions=True)
        assert isinstance(outcome, ShuttingDownError) or outcome.seed == 0
        with pytest.raises(ShuttingDownError):
            batcher.submit([item()])

    run(test)
