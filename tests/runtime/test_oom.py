"""The rule for a failed engine call (service/runtime/batching/oom.py), as batch jobs apply it to
whole batches, against a fake engine that fits N rows at most."""

from __future__ import annotations

import pytest

from model.errors import EngineFailure, EngineOutOfMemoryError
from model.types import GenerationResult
from service.runtime.batching.oom import generate_isolating_failures
from tests.runtime.fakes import FakeEngine, item


def test_a_batch_that_fits_runs_once() -> None:
    engine = FakeEngine(max_rows=8)
    results = generate_isolating_failures(engine, [item(seed=i) for i in range(8)])
    assert [len(batch) for batch in engine.batches] == [8]
    assert [r.seed for r in results if isinstance(r, GenerationResult)] == list(range(8))


def test_out_of_memory_halves_until_the_batches_fit_and_keeps_the_order() -> None:
    engine = FakeEngine(max_rows=2)
    results = generate_isolating_failures(engine, [item(seed=i) for i in range(7)])
    # 7 -> 3 + 4 -> (1 + 2) + (2 + 2): every item ran exactly once in a batch that fitted.
    fitted = [len(batch) for batch in engine.batches if len(batch) <= 2]
    assert sorted(fitted) == [1, 2, 2, 2]
    assert [r.seed for r in results if isinstance(r, GenerationResult)] == list(range(7))
    assert all(int(r.image[0, 0, 0]) == r.seed for r in results if isinstance(r, GenerationResult))


def test_an_item_that_does_not_fit_alone_is_reported_and_its_neighbours_still_run() -> None:
    engine = FakeEngine(max_rows=0)
    results = generate_isolating_failures(engine, [item(seed=i) for i in range(3)])
    assert len(results) == 3 and all(isinstance(r, EngineOutOfMemoryError) for r in results)


def test_any_other_error_runs_each_item_alone_and_only_the_culprit_fails() -> None:
    engine = FakeEngine()
    engine.fail_prompts.add("bad")
    results = generate_isolating_failures(engine, [item("good", seed=1), item("bad"), item("good", seed=2)])
    assert isinstance(results[1], EngineFailure)
    assert [r.seed for r in results if isinstance(r, GenerationResult)] == [1, 2]
    assert [len(batch) for batch in engine.batches] == [3, 1, 1, 1]


def test_another_error_in_half_of_an_oversized_batch_isolates_only_that_half() -> None:
    engine = FakeEngine(max_rows=2)
    engine.fail_prompts.add("bad")
    results = generate_isolating_failures(engine, [item(seed=1), item(seed=2), item("bad"), item(seed=3)])
    names = [type(r).__name__ for r in results]
    assert names == ["GenerationResult", "GenerationResult", "EngineFailure", "GenerationResult"]
    assert [[i.seed for i in batch] for batch in engine.batches] == [[1, 2, 0, 3], [1, 2], [0, 3], [0], [3]]


def test_an_engine_that_returns_the_wrong_count_is_a_bug_not_a_result() -> None:
    class Short(FakeEngine):
        def generate(self, items):  # type: ignore[no-untyped-def]
            return super().generate(items)[:-1]

    with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
        generate_isolating_failures(Short(), [item(seed=1), item(seed=2)])
