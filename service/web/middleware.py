"""Pure ASGI middleware, outermost first: request context (ids, metrics, access log, last-resort 500,
the connection limit, WebSocket and HTTP/0.9 refusals), then service/web/guards.py's (security
headers, Host), HEAD as GET, trailing-slash redirects, API keys, the JSON media type, body size and
encoding. Pure ASGI rather than BaseHTTPMiddleware so that the body is never buffered here and the
endpoint can still see the client disconnect."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Iterable
from urllib.parse import quote

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import request_id_var
from service.runtime.metrics import Metrics
from service.web.errors import (
    BodyTimeoutError,
    BodyTooLargeError,
    HeaderTooLongError,
    HttpVersionError,
    TooManyConnectionsError,
    UnauthorizedError,
    UnsupportedEncodingError,
    scope_error_response,
)

log = logging.getLogger("service.access")

MAX_ID_CHARS = 100
ID_HEADERS = ("x-request-id", "x-ms-request-id", "x-ms-client-request-id")
# Probes and scrapes: open without a key, and logged at DEBUG so they do not drown the log.
OPEN_PATHS = frozenset({"/", "/health/live", "/health/ready", "/metrics", "/ui"})
# GETs under these are open too: the image links of OpenAI's url answers, where the unguessable
# token in the path is the permission (service/web/clients/links.py).
OPEN_PREFIXES = ("/v1/images/files/",)
PROBE_PATHS = frozenset({"/", "/health/live", "/health/ready", "/metrics"})
# Set in the scope by the protocol (service/hosts/connections.py) beyond SD_MAX_CONNECTIONS: 503 here.
OVER_CAPACITY = "sd_endpoint.over_capacity"
CLIENT_CLOSED_STATUS = 499  # nginx's code for "the client went away"; nobody reads it but the metrics
MAX_LOGGED_CHARS = 200  # of the path and the method in the access line; the rest is cut, and says so


def cap(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """``text``, cut to ``limit`` characters with a marker saying how many were left out."""
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text) - limit} more chars cut]"


class RequestContextMiddleware:
    """Request ids (431 when too long), per-route metrics, one access line, and a JSON 500 for bugs."""

    def __init__(self, app: ASGIApp, metrics: Metrics, route_paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.route_paths = route_paths  # metric labels; any other path is "other" (bounded cardinality)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._refuse_websocket(scope)
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # 1. Ids: the client's, else a new one; all three echoed on the answer (not over-long ones).
        started = time.perf_counter()
        headers = Headers(scope=scope)
        given = {name: headers.get(name) for name in ID_HEADERS}
        too_long = [name for name, value in given.items() if value is not None and len(value) > MAX_ID_CHARS]
        request_id = given["x-request-id"] if given["x-request-id"] and not too_long else str(uuid.uuid4())
        echoed = {"x-request-id": request_id, "x-ms-request-id": request_id}
        if not too_long:
            echoed["x-ms-request-id"] = given["x-ms-request-id"] or request_id
            if given["x-ms-client-request-id"]:
                echoed["x-ms-client-request-id"] = given["x-ms-client-request-id"]
        token = request_id_var.set(request_id)
        status = 0  # 0 until the answer starts

        async def send_with_ids(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = MutableHeaders(scope=message)
                for name, value in echoed.items():
                    response_headers[name] = value
            await send(message)

        # 2. The app, or the error answer; a bug becomes a logged 500, never a traceback to the client.
        try:
            refusal = self._refusal(scope, too_long)
            if refusal is not None:
                response = scope_error_response(refusal, scope)
                if isinstance(refusal, TooManyConnectionsError):
                    response.headers["connection"] = "close"  # its slot is what the others wait for
                await response(scope, receive, send_with_ids)
            else:
                await self.app(scope, receive, send_with_ids)
        except ClientDisconnect:  # it left before its body arrived: nobody to answer, nothing failed
            status = status or CLIENT_CLOSED_STATUS
            log.info("client disconnected before its request was read")
        except Exception as error:
            if status:
                log.exception("failed after the answer had started")
            else:
                await scope_error_response(error, scope)(scope, receive, send_with_ids)
        finally:
            # 3. Metrics by route template (unknown paths share one label) and the access line.
            seconds = time.perf_counter() - started
            path = scope["path"]
            template = getattr(scope.get("route"), "path_format", path)  # /v1/models/{model_id}, say
            route = template if template in self.route_paths else "other"
            if route in PROBE_PATHS and scope["method"] == "POST":
                route = f"POST {route}"  # POST / generates (Hugging Face's task): not the probe's label
            status = status or 500
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(seconds)
            probe = path in PROBE_PATHS and scope["method"] in ("GET", "HEAD")  # POST / generates
            level = logging.DEBUG if probe and status < 500 else logging.INFO
            # an image link's token is its permission: the log holds the route's template instead
            shown = str(template) if path.startswith(OPEN_PREFIXES) else path
            log.log(level, "%s %s %d %.1f ms", cap(scope["method"], 20), cap(shown), status, seconds * 1000)
            request_id_var.reset(token)

    @staticmethod
    def _refusal(scope: Scope, too_long: list[str]) -> Exception | None:
        """What refuses this request before the app sees it, if anything."""
        if scope.get(OVER_CAPACITY):
            return TooManyConnectionsError(
                "the server has as many connections as it takes (SD_MAX_CONNECTIONS); retry after Retry-After"
            )
        if scope.get("http_version") not in ("1.0", "1.1", "2", "2.0", "3"):
            return HttpVersionError("this server speaks HTTP/1.0 and later; send HTTP/1.1")
        if too_long:
            return HeaderTooLongError(
                f"{', '.join(too_long)} is longer than {MAX_ID_CHARS} characters; send a shorter id"
            )
        return None

    async def _refuse_websocket(self, scope: Scope) -> None:
        """A WebSocket handshake: this server has no WebSocket route. Refused (uvicorn answers the
        close before accept with 403), logged and counted like any other answer."""
        self.metrics.requests.labels(route="other", status="403").inc()
        log.info("GET %s 403: WebSocket upgrade refused (this server speaks HTTP only)", cap(scope["path"]))


class HeadMiddleware:
    """HEAD is GET without the body (RFC 9110 asks every server to take it; uptime checkers send
    it): the route answers as for GET, with the same status and headers, Content-Length included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


class SlashRedirectMiddleware:
    """``/ui/`` -> 307 to ``/ui`` for every known route, with a relative Location: never a URL
    built from the request's Host header, which the client controls."""

    def __init__(self, app: ASGIApp, route_paths: frozenset[str]) -> None:
        self.app = app
        self.route_paths = route_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            target = path.rstrip("/")
            if target in self.route_paths:
                query = scope.get("query_string", b"").decode("latin-1")
                location = quote(target) + (f"?{query}" if query else "")
                await RedirectResponse(location, status_code=307)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """With keys configured, every route but health and metrics needs ``Authorization: Bearer <key>``
    (or HTTP Basic with the key as password).

    Checked before the body is read. Keys are compared as SHA-256 digests with hmac.compare_digest,
    so the time taken says nothing about a key's content or length.
    """

    def __init__(self, app: ASGIApp, keys: Iterable[bytes]) -> None:
        self.app = app
        self._digests = tuple(hashlib.sha256(key).digest() for key in keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")  # POST / needs a key
        open_path = scope.get("method") == "GET" and (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES))
        if scope["type"] != "http" or not self._digests or open_path:
            await self.app(scope, receive, send)
            return
        digest = hashlib.sha256(presented_key(Headers(scope=scope)).encode()).digest()
        # Compare against every key, always, so timing does not tell which key matched.
        matches = [hmac.compare_digest(digest, known) for known in self._digests]
        if any(matches):
            await self.app(scope, receive, send)
            return
        response = scope_error_response(
            UnauthorizedError(
                "a valid API key is required; send the header Authorization: Bearer <key> "
                "(or HTTP Basic with the key as the password)"
            ),
            scope,
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def presented_key(headers: Headers) -> str:
    """The API key of ``Authorization: Bearer <key>``, or the password of ``Basic`` (AUTOMATIC1111's
    clients send "user:password"; the user name is not checked); "" when there is none."""
    scheme, _, credential = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credential.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(credential.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return ""
    return ""


class BodyLimitMiddleware:
    """413 for bodies over the limit: at once from Content-Length, or while streaming a chunked one;
    408 for a body that does not arrive within its deadline (a client sending a byte a second);
    415 for a body in a Content-Encoding other than identity (it would be parsed as if it were
    plain, or a compressed one be a 400 that does not say why; and the size limit is on the wire)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float = 30) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await scope_error_response(self._too_large(), scope)(scope, receive, send)
            return
        listed = ",".join(headers.getlist("content-encoding")).split(",")
        encodings = {part.strip().lower() for part in listed} - {"", "identity"}
        has_body = declared not in (None, "0") or "transfer-encoding" in headers
        if has_body and encodings:
            shown = ", ".join(sorted(encodings))[:100]
            error = UnsupportedEncodingError(
                f"the body's Content-Encoding ({shown}) is not supported; send it uncompressed"
            )
            await scope_error_response(error, scope)(scope, receive, send)
            return
        received = 0
        complete = False
        deadline = time.monotonic() + self.body_timeout_s

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body: only the disconnect is left to wait for, without deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                raise BodyTimeoutError(
                    f"the body did not arrive within {self.body_timeout_s:g} s (SD_BODY_TIMEOUT_S); "
                    "send it at once"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()  # answered by the app's handler for ServiceError
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, guarded_receive, send)

    def _too_large(self) -> BodyTooLargeError:
        return BodyTooLargeError(
            f"the body is larger than {self.max_body_bytes} bytes (SD_MAX_BODY_BYTES); "
            "send fewer or shorter prompts"
        )
