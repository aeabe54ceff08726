"""The one rule for whether a request's images may join the step loop's queue: whole requests
only, never part of one; within the queue's bound and within the caller's."""

from __future__ import annotations

from dataclasses import dataclass

from service.runtime.errors import ContractError, QueueFullError, ShuttingDownError
from service.runtime.metrics import Metrics


@dataclass(frozen=True)
class Bound:
    """One limit on images at once: what it counts, its setting and its bound."""

    held: int  # images it counts now
    limit: int
    setting: str  # the variable that sets it
    takes: str  # what the server does within it, with "{limit}": "queues at most {limit} at once"
    full: str  # why a request that would pass it waits: "the queue is full (...)"


def check_room(*, closed: bool, incoming: int, bounds: list[Bound], metrics: Metrics) -> None:
    """Raise why ``incoming`` images cannot join; return when every bound lets them in."""
    if closed:
        raise ShuttingDownError("the server is shutting down; send the request to another instance")
    for bound in bounds:
        if incoming > bound.limit:  # would never fit: a 429 would be retried forever
            takes = bound.takes.format(limit=bound.limit)
            raise ContractError(
                f"the request asks for {incoming} images; this server {takes} ({bound.setting}): "
                "send fewer prompts or images"
            )
    for bound in bounds:
        if bound.held + incoming > bound.limit:
            metrics.rejections.inc()
            raise QueueFullError(f"{bound.full}; retry after the Retry-After seconds", waiting=bound.held)


def queue_bound(waiting: int, max_queue_items: int) -> Bound:
    return Bound(
        waiting, max_queue_items, "SD_MAX_QUEUE_ITEMS", "queues at most {limit} at once",
        f"the queue is full ({waiting} of {max_queue_items} images waiting)",
    )  # fmt: skip


def caller_bound(held: int, max_images: int) -> Bound:
    """One key never fills the queue that every key shares (SD_MAX_IMAGES_PER_KEY)."""
    return Bound(
        held, max_images, "SD_MAX_IMAGES_PER_KEY", "takes at most {limit} at once from one API key",
        f"this API key has {held} images waiting or running, and may have at most {max_images} "
        "(SD_MAX_IMAGES_PER_KEY)",
    )  # fmt: skip
