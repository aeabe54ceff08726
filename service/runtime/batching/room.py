"""The one rule for whether a request's images may join the step loop's queue: whole requests
only, never part of one."""

from __future__ import annotations

from service.runtime.errors import ContractError, QueueFullError, ShuttingDownError
from service.runtime.metrics import Metrics


def check_room(*, closed: bool, waiting: int, incoming: int, max_queue_items: int, metrics: Metrics) -> None:
    """Raise why ``incoming`` images cannot join ``waiting`` ones; return when they can."""
    if closed:
        raise ShuttingDownError("the server is shutting down; send the request to another instance")
    if incoming > max_queue_items:  # would never fit: a 429 would be retried forever
        raise ContractError(
            f"the request asks for {incoming} images; this server queues at most "
            f"{max_queue_items} at once (SD_MAX_QUEUE_ITEMS): send fewer prompts or images"
        )
    if waiting + incoming > max_queue_items:
        metrics.rejections.inc()
        raise QueueFullError(
            f"the queue is full ({waiting} of {max_queue_items} images waiting); "
            "retry after the Retry-After seconds",
            waiting=waiting,
        )


def check_caller_room(*, held: int, incoming: int, max_images: int, metrics: Metrics) -> None:
    """Raise why one caller's ``incoming`` images cannot join the ``held`` ones it has waiting or
    running (SD_MAX_IMAGES_PER_KEY): one key never fills the queue that every key shares."""
    if incoming > max_images:
        raise ContractError(
            f"the request asks for {incoming} images; this server takes at most {max_images} at once "
            "from one API key (SD_MAX_IMAGES_PER_KEY): send fewer prompts or images"
        )
    if held + incoming > max_images:
        metrics.rejections.inc()
        raise QueueFullError(
            f"this API key has {held} images waiting or running, and may have at most {max_images} "
            "(SD_MAX_IMAGES_PER_KEY); retry after the Retry-After seconds, or wait for them",
            waiting=held,
        )
