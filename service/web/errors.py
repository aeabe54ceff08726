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
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from model.errors import (
    EngineError,
    EngineFailure,
    EngineOutOfMemoryError,
    InvalidRequestError,
    ModelLoadError,
)
from service.images_in import ImageInputError, ImageUrlRefusedError
from service.runtime.errors import (
    ContractError,
    MalformedJsonError,
    ModelNotFoundError,
    NotReadyError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
    ServiceError,
    ShuttingDownError,
)
from service.runtime.protocols import protocol_for
from service.runtime.protocols.score import score_error

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
RETRY_AFTER_OVERLOADED_S = 5

# The answers any generating route may give besides its own parsing errors (keys, the body's guards,
# the queue, readiness, the deadline), described once for every route's OpenAPI entry.
SHARED_ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "Missing or unknown API key (when SD_API_KEYS is set).",
    403: "A browser sent it from a page of another origin (Sec-Fetch-Site or Origin say so).",
    408: "The body did not arrive within SD_BODY_TIMEOUT_S.",
    413: "The body is larger than SD_MAX_BODY_BYTES.",
    415: "The body is not application/json, or has a Content-Encoding (gzip, ...); send plain JSON.",
    429: "The queue is full; retry after Retry-After seconds (estimated from the queue and throughput).",
    431: "A request-id header is longer than 100 characters, or the headers exceed SD_MAX_HEADER_COUNT "
    "or SD_MAX_HEADER_BYTES.",
    503: "Not ready, shutting down, out of memory even for one image, or SD_MAX_CONNECTIONS reached; "
    "see Retry-After.",
    504: "The request did not finish within SD_REQUEST_TIMEOUT_S.",
}


class UnauthorizedError(ServiceError):
    """No bearer key, or one that is not configured."""


class BodyTooLargeError(ServiceError):
    """The body is larger than SD_MAX_BODY_BYTES."""


class UnsupportedEncodingError(ServiceError):
    """The body comes with a Content-Encoding (gzip, ...) that the server does not decode."""


class HeaderTooLongError(ServiceError):
    """A request-id header is longer than the limit."""


class UnsupportedMediaTypeError(ServiceError):
    """A JSON route was sent a body labelled other than application/json (a cross-site form can send
    text/plain without asking the browser's permission)."""


class HostNotAllowedError(ServiceError):
    """The Host header names a host outside SD_ALLOWED_HOSTS (DNS rebinding)."""


class CrossOriginError(ServiceError):
    """A browser sent a state-changing request from a page of another origin (Sec-Fetch-Site, Origin)."""


class TooManyConnectionsError(ServiceError):
    """SD_MAX_CONNECTIONS connections (or requests) are open already."""


class HttpVersionError(ServiceError):
    """HTTP/0.9, which has no headers (so no key, no Host) and no status line."""


class BodyTimeoutError(ServiceError):
    """The body did not arrive within SD_BODY_TIMEOUT_S."""


class RequestNotFoundError(ServiceError):
    """No running request of the caller has the id it asked to cancel."""


class JobNotFoundError(ServiceError):
    """No job of the caller has that id (unknown, expired, deleted, or another caller's)."""


class JobsUnavailableError(ServiceError):
    """The server keeps no jobs (SD_JOB_STORE=off), or its store could not be opened."""


class LinkNotFoundError(ServiceError):
    """An image link (OpenAI's url answers) is unknown, expired, or left the store for newer ones."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    code: str
    retry_after_s: int | None = None


# The one table. Order matters only for subclasses listed before their bases.
ERROR_TABLE: dict[type[BaseException], ErrorKind] = {
    MalformedJsonError: ErrorKind(400, "malformed_json"),
    HostNotAllowedError: ErrorKind(400, "host_not_allowed"),
    UnauthorizedError: ErrorKind(401, "unauthorized"),
    CrossOriginError: ErrorKind(403, "cross_origin_request"),
    ModelNotFoundError: ErrorKind(404, "model_not_found"),
    RequestNotFoundError: ErrorKind(404, "request_not_found"),
    JobNotFoundError: ErrorKind(404, "job_not_found"),
    LinkNotFoundError: ErrorKind(404, "link_not_found"),
    BodyTimeoutError: ErrorKind(408, "body_timeout"),
    BodyTooLargeError: ErrorKind(413, "body_too_large"),
    UnsupportedEncodingError: ErrorKind(415, "unsupported_content_encoding"),
    UnsupportedMediaTypeError: ErrorKind(415, "unsupported_media_type"),
    ImageUrlRefusedError: ErrorKind(400, "image_url_refused"),
    ImageInputError: ErrorKind(422, "invalid_image"),
    ContractError: ErrorKind(422, "invalid_request"),
    InvalidRequestError: ErrorKind(422, "invalid_request"),
    QueueFullError: ErrorKind(429, "too_many_requests", RETRY_AFTER_S),
    HeaderTooLongError: ErrorKind(431, "header_too_long"),
    RequestCancelledError: ErrorKind(499, "cancelled"),  # as Google's APIs map CANCELLED
    EngineFailure: ErrorKind(500, "engine_failure"),
    EngineOutOfMemoryError: ErrorKind(503, "out_of_memory", RETRY_AFTER_OVERLOADED_S),
    ModelLoadError: ErrorKind(503, "model_not_loaded", RETRY_AFTER_OVERLOADED_S),
    NotReadyError: ErrorKind(503, "not_ready", RETRY_AFTER_OVERLOADED_S),
    JobsUnavailableError: ErrorKind(503, "jobs_unavailable"),
    ShuttingDownError: ErrorKind(503, "shutting_down", RETRY_AFTER_S),
    TooManyConnectionsError: ErrorKind(503, "too_many_connections", RETRY_AFTER_S),
    HttpVersionError: ErrorKind(505, "http_version_not_supported"),
    RequestTimeoutError: ErrorKind(504, "timeout"),
}
_INTERNAL = ErrorKind(500, "internal_error")
_INTERNAL_MESSAGE = (
    "the server failed unexpectedly; the request id in the x-request-id header finds it in the logs"
)
_ENGINE_OOM_MESSAGE = (
    "the device ran out of memory even for a single image; retry later or ask for smaller images"
)


def error_responses(
    descriptions: dict[int, str], model: type | None = None
) -> dict[int | str, dict[str, Any]]:
    """The error answers a route documents (for /docs): its own ``descriptions`` and the ones every
    route shares, each with the body ``model`` its API answers errors with."""
    merged = {**descriptions, **SHARED_ERROR_DESCRIPTIONS}
    return {
        status: {"description": text} | ({"model": model} if model is not None else {})
        for status, text in sorted(merged.items())
    }


# The request models of the routes that read their body themselves: their schemas (and the models
# they nest) go into the OpenAPI document's components, where json_body's references point.
REQUEST_MODELS: dict[str, type[BaseModel]] = {}


def json_body(model: type[BaseModel], example: Any) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself (parsed off the event loop),
    so that /docs still shows the body's schema and an example. The schema is a reference to the
    components (see ``request_components``): pydantic's own ``#/$defs/...`` would dangle there."""
    REQUEST_MODELS[model.__name__] = model
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {"application/json": {"schema": schema, "example": example}}
    return {"requestBody": {"required": True, "content": content}}


def request_components() -> dict[str, Any]:
    """The schemas of every model json_body named, and of the models they nest, by name."""
    components: dict[str, Any] = {}
    for name, model in REQUEST_MODELS.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[name] = schema
    return components


def classify(error: BaseException) -> tuple[ErrorKind, str]:
    """The status, code and client-facing message of ``error``; an error that carries its own
    ``retry_after_s`` (the queue's estimate) overrides the table's."""
    kind, message = _classify(error)
    retry_after_s = getattr(error, "retry_after_s", None)
    if kind.retry_after_s is not None and isinstance(retry_after_s, int):
        kind = ErrorKind(kind.status, kind.code, retry_after_s)
    return kind, message


def _classify(error: BaseException) -> tuple[ErrorKind, str]:
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


# The status line's reason phrase of an error answer, carried from the app to the protocol in this
# header (service/hosts/connections.py writes it into the status line and drops the header): clients
# that show only the status and its phrase (Open WebUI's OpenAI engine shows aiohttp's
# ``ClientResponseError.message``) then show what to change. Reason phrases are free text (RFC 9112).
REASON_HEADER = "x-sd-reason"
MAX_REASON_CHARS = 200


def reason_phrase(status: int, message: str) -> str:
    """The standard phrase and the message's first line, in the printable ASCII a status line takes."""
    standard = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else "Error"
    first = message.strip().splitlines()[0] if message.strip() else ""
    text = f"{standard}: {first}" if first else standard
    return "".join(char if " " <= char <= "~" else "?" for char in text)[:MAX_REASON_CHARS]


def error_response(error: BaseException, *, path: str = "", method: str = "GET") -> JSONResponse:
    """The JSON answer for ``error`` in the shape of the client whose route ``method`` and ``path``
    name (the protocols' table: OpenAI's under /v1/, A1111's under /sdapi/, Hugging Face's on
    POST /, ours elsewhere), whichever layer refuses it (keys, body size, media type: the
    middleware's answers too); logs the traceback of anything unexpected."""
    kind, message = classify(error)
    if kind is _INTERNAL:
        log.error("unexpected error", exc_info=error)
    elif isinstance(error, EngineError):
        log.warning("%s: %s", kind.code, message)
    # FieldError's param, an image's field: the request field at fault (OpenAI's shape names it)
    param = getattr(error, "param", None) or getattr(error, "field", None)
    status, body = protocol_for(path, method).error(
        kind.status, kind.code, message, param if isinstance(param, str) else None
    )
    headers = {"Retry-After": str(kind.retry_after_s)} if kind.retry_after_s is not None else None
    response = JSONResponse(body, status_code=status, headers=headers)
    if isinstance(error, HTTPException) and error.headers:
        response.headers.update(error.headers)  # routing's own, e.g. Allow on a 405
    response.headers[REASON_HEADER] = reason_phrase(response.status_code, message)
    return response


def scope_error_response(error: BaseException, scope: MutableMapping[str, Any]) -> JSONResponse:
    """``error_response`` for the request of an ASGI ``scope`` (the middleware's refusals)."""
    return error_response(error, path=scope["path"], method=scope["method"])


def error_json(status: int, code: str, message: str) -> JSONResponse:
    """Our own error body (service/runtime/protocols/score.py), for answers outside the table."""
    return JSONResponse(score_error(status, code, message, None)[1], status_code=status)
