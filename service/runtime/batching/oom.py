"""What happens to the images of a failed engine call: the one rule for the step loop's failed
steps (scheduler.py) and for batch jobs' failed batches (``generate_isolating_failures``).

Out of memory: the same images usually fit in smaller sets, so the older half goes on and the
newer half runs later; an image that does not fit alone fails. Any other failure: one bad image
may be the cause, so each runs again alone and only the culprit fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from model.errors import EngineOutOfMemoryError
from model.types import GenerationItem, GenerationResult

if TYPE_CHECKING:
    from service.runtime.engines import ServingEngine

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Verdict(Generic[T]):
    """The images of a failed call, in the order they were given, each in one list."""

    keep: list[T] = field(default_factory=list)  # run on (out of memory: the older half)
    later: list[T] = field(default_factory=list)  # run after them (out of memory: the newer half)
    alone: list[T] = field(default_factory=list)  # each runs again alone (any other failure)
    fail: list[T] = field(default_factory=list)  # fail with the error (it failed alone)


def after_failure(images: Sequence[T], error: Exception) -> Verdict[T]:
    """The rule, for ``images`` (oldest first) whose engine call failed with ``error``."""
    if len(images) <= 1:
        return Verdict(fail=list(images))
    if isinstance(error, EngineOutOfMemoryError):
        half = len(images) // 2
        return Verdict(keep=list(images[:half]), later=list(images[half:]))
    return Verdict(alone=list(images))


def generate_isolating_failures(
    engine: ServingEngine, items: Sequence[GenerationItem]
) -> list[GenerationResult | Exception]:
    """Generate ``items`` as one batch, under the rule on failure: one entry per item, in order,
    its result or the error it failed with alone."""
    try:
        results: list[GenerationResult | Exception] = list(engine.generate(items))
    except Exception as error:
        verdict = after_failure(items, error)
        if verdict.keep:
            log.warning(
                "out of memory at batch size %d; retrying as %d + %d",
                len(items), len(verdict.keep), len(verdict.later),
            )  # fmt: skip
        elif verdict.alone:
            log.warning(
                "a batch of %d failed (%s); retrying its items one by one", len(items), type(error).__name__
            )
        outcomes: list[GenerationResult | Exception] = [error] * len(verdict.fail)
        for part in [verdict.keep, verdict.later, *([each] for each in verdict.alone)]:
            if part:
                outcomes += generate_isolating_failures(engine, part)
        return outcomes
    if len(results) != len(items):
        raise RuntimeError(f"engine returned {len(results)} results for {len(items)} items")
    return results
