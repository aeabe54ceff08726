"""Failure isolation shared by the online batcher and the batch runner.

When the device runs out of memory for a batch, the same items usually fit in smaller batches:
we halve down to single items, and only items that fail alone are reported as failed. When a
batch fails for any other reason, one bad item may be the cause: the online batcher retries each
item alone (``generate_isolating_failures``) so that only the culprit's request fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from model.errors import EngineOutOfMemoryError
from model.types import GenerationItem, GenerationResult
from service.runtime.engines import ServingEngine

log = logging.getLogger(__name__)


def generate_splitting_on_oom(
    engine: ServingEngine, items: Sequence[GenerationItem]
) -> list[GenerationResult | EngineOutOfMemoryError]:
    """Generate ``items``; on OOM retry each half, down to batches of one.

    Returns one entry per item, in order: a result, or the OOM error of the single-item batch that
    still did not fit. Any other exception propagates (it concerns the whole batch).
    """
    try:
        results: list[GenerationResult | EngineOutOfMemoryError] = list(engine.generate(items))
    except EngineOutOfMemoryError as error:
        if len(items) == 1:
            return [error]
        half = len(items) // 2
        log.warning(
            "out of memory at batch size %d; retrying as %d + %d", len(items), half, len(items) - half
        )
        return generate_splitting_on_oom(engine, items[:half]) + generate_splitting_on_oom(
            engine, items[half:]
        )
    if len(results) != len(items):
        raise RuntimeError(f"engine returned {len(results)} results for {len(items)} items")
    return results


def generate_isolating_failures(
    engine: ServingEngine, items: Sequence[GenerationItem]
) -> list[GenerationResult | Exception]:
    """``generate_splitting_on_oom``, except that a batch failing with any other error is retried
    item by item: one entry per item, its result or the error it fails with alone."""
    try:
        return list(generate_splitting_on_oom(engine, items))
    except Exception as error:
        if len(items) == 1:
            return [error]
        log.warning(
            "a batch of %d failed (%s); retrying its items one by one", len(items), type(error).__name__
        )
    outcomes: list[GenerationResult | Exception] = []
    for item in items:
        try:
            outcomes += generate_splitting_on_oom(engine, [item])
        except Exception as error:
            outcomes.append(error)
    return outcomes
