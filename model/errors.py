"""The engine's own exceptions. They carry no HTTP knowledge: service/ maps them to statuses."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as asked (bad steps, size, scheduler, mixed batch keys...).

    Raised before any GPU work, so retrying the same request can never succeed.
    """


class EngineOutOfMemoryError(EngineError):
    """The device ran out of memory for this batch; a smaller batch may succeed."""


class EngineFailure(EngineError):
    """The engine failed while generating (non-finite output, kernel error...)."""


class ModelLoadError(EngineError):
    """The model named by a spec could not be found or loaded."""
