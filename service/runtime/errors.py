"""The serving runtime's own errors. The message of each is sent to the client as is, so it says
what was wrong and what to do, and never repeats the request's content.

Which HTTP status each one becomes is decided in one place only: the table in service/web/errors.py.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the server's own errors; the message is sent to the client as is."""


class MalformedJsonError(ServiceError):
    """The body is not JSON (or not JSON the parser can take)."""


class ContractError(ServiceError):
    """The JSON does not follow the scoring contract."""


class QueueFullError(ServiceError):
    """The batch queue has no room for this request's images: ``waiting`` images are ahead; the
    scorer sets ``retry_after_s``, its estimate of when they will have left."""

    def __init__(self, message: str, waiting: int = 0) -> None:
        super().__init__(message)
        self.waiting = waiting
        self.retry_after_s: int | None = None


class RequestTimeoutError(ServiceError):
    """The request did not finish within SD_REQUEST_TIMEOUT_S."""

    @classmethod
    def after(cls, limit_s: float) -> RequestTimeoutError:
        return cls(
            f"the request did not finish within {limit_s:g} s (SD_REQUEST_TIMEOUT_S); "
            "retry later, or ask for fewer images or steps"
        )


class NotReadyError(ServiceError):
    """The model is still loading or warming up."""


class ShuttingDownError(ServiceError):
    """The server is draining before it exits."""


class RequestCancelledError(ServiceError):
    """The request was cancelled by its id (POST /requests/{id}/cancel) before it was done."""


class ModelNotFoundError(ServiceError):
    """A request names a model this server does not serve (service/runtime/library.py)."""

    param = "model"  # the request field at fault, in OpenAI's error shape

    def __init__(self, message: str, param: str = "model") -> None:
        super().__init__(message)
        self.param = param
