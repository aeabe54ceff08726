"""The ONE table that maps exception types to HTTP statuses, and the HTTP layer's own errors.

The engine raises its own domain exceptions (model/errors.py), the runtime its own
(service/runtime/errors.py), and the HTTP layer the few below.
Every non-2xx body is ``{"error": {"code", "message", "status"}}``; messages say what was wrong and
what to do, and never repeat the request's content. Anything not in the table is a 500 whose
traceback is logged, never sent.
"""

from __future__ import annotations

import http
import logging
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from model.errors import (
    EngineError,
    EngineFailure,
    EngineOutOfMemoryError,
    InvalidRequestError,
    ModelLoadError,
)
from service.runtime.errors import (
    ContractError,
    MalformedJsonError,
    NotReadyError,
    QueueFullError,
    RequestTimeoutError,
    ServiceError,
    ShuttingDownError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
RETRY_AFTER_OVERLOADED_S = 5


class UnauthorizedError(ServiceError):
    """No bearer key, or one that is not configured."""


class BodyTooLargeError(ServiceError):
    """The body is larger than SD_MAX_BODY_BYTES."""


class HeaderTooLongError(ServiceError):
    """A request-id header is longer than the limit."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    code: str
    retry_after_s: int | None = None


# The one table. Order matters only for subclasses listed before their bases.
ERROR_TABLE: dict[type[BaseException], ErrorKind] = {
    MalformedJsonError: ErrorKind(400, "malformed_json"),
    UnauthorizedError: ErrorKind(401, "unauthorized"),
    BodyTooLargeError: ErrorKind(413, "body_too_large"),
    ContractError: ErrorKind(422, "invalid_request"),
    InvalidRequestError: ErrorKind(422, "invalid_request"),
    QueueFullError: ErrorKind(429, "too_many_requests", RETRY_AFTER_S),
    HeaderTooLongError: ErrorKind(431, "header_too_long"),
    EngineFailure: ErrorKind(500, "engine_failure"),
    EngineOutOfMemoryError: ErrorKind(503, "out_of_memory", RETRY_AFTER_OVERLOADED_S),
    ModelLoadError: ErrorKind(503, "model_not_loaded", RETRY_AFTER_OVERLOADED_S),
    NotReadyError: ErrorKind(503, "not_ready", RETRY_AFTER_OVERLOADED_S),
    ShuttingDownError: ErrorKind(503, "shutting_down", RETRY_AFTER_S),
    RequestTimeoutError: ErrorKind(504, "timeout"),
}
_INTERNAL = ErrorKind(500, "internal_error")
_INTERNAL_MESSAGE = (
    "the server failed unexpectedly; the request id in the x-request-id header finds it in the logs"
)
_ENGINE_OOM_MESSAGE = (
    "the device ran out of memory even for a single image; retry later or ask for smaller images"
)


def classify(error: BaseException) -> tuple[ErrorKind, str]:
    """The status, code and client-facing message of ``error``."""
    if isinstance(error, HTTPException):
        phrase = http.HTTPStatus(error.status_code).phrase
        code = phrase.lower().replace(" ", "_").replace("-", "_")
        return ErrorKind(error.status_code, code), f"{error.detail}; the routes are listed at /docs"
    for error_type in type(error).__mro__:
        kind = ERROR_TABLE.get(error_type)
        if kind is not None:
            break
    else:
        return _INTERNAL, _INTERNAL_MESSAGE
    if isinstance(error, EngineOutOfMemoryError):
        return kind, _ENGINE_OOM_MESSAGE  # the engine's text names tensors, not what the client can do
    return kind, str(error) or kind.code.replace("_", " ")


def error_response(error: BaseException) -> JSONResponse:
    """The JSON answer for ``error``; logs the traceback of anything unexpected."""
    kind, message = classify(error)
    if kind is _INTERNAL:
        log.error("unexpected error", exc_info=error)
    elif isinstance(error, EngineError):
        log.warning("%s: %s", kind.code, message)
    return error_json(kind.status, kind.code, message, kind.retry_after_s)


def error_json(status: int, code: str, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    body = {"error": {"code": code, "message": message, "status": status}}
    return JSONResponse(body, status_code=status, headers=headers)
