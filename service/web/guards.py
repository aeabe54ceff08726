"""Cross-site guards, as pure ASGI middleware: what keeps a web page on another site (or one rebound to
this server's address by its DNS) from using the server through its visitor's browser.

- Security headers on every answer: ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``
  and, unless the page sets its own (the playground and the API docs do, service/web/ui.py and
  service/web/docs.py), ``Content-Security-Policy: default-src 'none'; frame-ancestors 'none'``.
- The Host header must name a host of SD_ALLOWED_HOSTS (default: the loopback names when the server
  listens on loopback). A DNS-rebinding page reaches 127.0.0.1 under its own name, and says so in
  Host; the health probes' GET and HEAD are exempt (orchestrators probe by address), never a POST to
  the same path (``POST /`` generates).
- A state-changing request (any method but GET, HEAD, OPTIONS) that a browser sent from another
  origin is refused (403): the browser says so in ``Sec-Fetch-Site`` (or, before 2023, in ``Origin``).
  A page may send a ``text/plain`` or body-less POST anywhere without a preflight, and a loopback
  server sees its visitor's own Host; clients that are not browsers (A1111's, OpenAI's SDKs, curl)
  send neither header and are served.
- JSON routes take only ``application/json`` bodies (415): a page may post a ``text/plain`` form or
  a typeless body to any site without asking the browser first; ``application/json`` needs the
  CORS preflight, which this server never grants.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.web.errors import (
    CrossOriginError,
    HostNotAllowedError,
    UnsupportedMediaTypeError,
    scope_error_response,
)

DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'"
_SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY"}
JSON_MEDIA_TYPE = "application/json"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PROBE_METHODS = frozenset({"GET", "HEAD"})
# Sec-Fetch-Site values of a request the user made on this origin, or typed in (curl sends none).
_SAME_ORIGIN_SITES = frozenset({"same-origin", "none"})


class ResponseHeadersMiddleware:
    """Edits the headers of every HTTP answer in place as it starts (``edit``): one way for the web
    app and its hosts (Ray Serve's replica header) to add or take out response headers, errors and
    streams included."""

    def __init__(self, app: ASGIApp, edit: Callable[[MutableHeaders], None]) -> None:
        self.app = app
        self.edit = edit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_edited(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.edit(MutableHeaders(scope=message))
            await send(message)

        await self.app(scope, receive, send_edited)


class SecurityHeadersMiddleware(ResponseHeadersMiddleware):
    """nosniff, no framing, and a closed Content-Security-Policy on every answer that sets none."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app, _add_security_headers)


def _add_security_headers(headers: MutableHeaders) -> None:
    for name, value in _SECURITY_HEADERS.items():
        headers[name] = value
    if "content-security-policy" not in headers:
        headers["content-security-policy"] = DEFAULT_CSP


class RefusingMiddleware:
    """Answers a request with the error of ``refusal`` before the app sees it, or passes it on (when
    ``refusal`` gives None, and always for what is not HTTP): the shape of every guard here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def refusal(self, scope: Scope) -> Exception | None:
        """Why the HTTP request of ``scope`` is refused, or None to serve it."""
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = self.refusal(scope) if scope["type"] == "http" else None
        if error is None:
            await self.app(scope, receive, send)
            return
        await scope_error_response(error, scope)(scope, receive, send)


def host_of(header: str) -> str:
    """The host name of a Host header, lower case, without the port (``[::1]:5001`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """``host`` against names such as ``api.example.com``, ``*.example.com`` (subdomains only), ``*``."""
    for pattern in allowed:
        if pattern == "*" or host == pattern.strip("[]"):
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
            return True
    return False


class HostCheckMiddleware(RefusingMiddleware):
    """400 ``host_not_allowed`` for a Host header outside the allowed names (the probes' GET and HEAD
    exempt: the exemption is for orchestrators, and ``POST /`` on a probe's path generates)."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...], exempt_paths: frozenset[str]) -> None:
        super().__init__(app)
        self.allowed = allowed
        self.exempt_paths = exempt_paths

    def refusal(self, scope: Scope) -> Exception | None:
        probe = scope.get("method") in PROBE_METHODS and scope.get("path") in self.exempt_paths
        if "*" in self.allowed or probe:
            return None
        if host_allowed(host_of(Headers(scope=scope).get("host", "")), self.allowed):
            return None
        return HostNotAllowedError(
            "the Host header names a host this server does not answer to; use one of its names, or add "
            "this one to SD_ALLOWED_HOSTS"
        )


class CrossOriginMiddleware(RefusingMiddleware):
    """403 ``cross_origin_request`` for a state-changing request a browser sent from another origin,
    on every route, the body-less ones (interrupt, skip, cancel) included. The check of Go's
    ``net/http.CrossOriginProtection``: ``Sec-Fetch-Site`` when the browser sends it, else an
    ``Origin`` that must name the request's own Host; a request with neither is not a browser's."""

    def refusal(self, scope: Scope) -> Exception | None:
        if scope["method"] in SAFE_METHODS or _same_origin(Headers(scope=scope)):
            return None
        return CrossOriginError(
            "a web page of another origin cannot send this request through its visitor's browser; "
            "call the API from a program, or from a page this server serves"
        )


def _same_origin(headers: Headers) -> bool:
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() in _SAME_ORIGIN_SITES
    origin = headers.get("origin")
    if origin is None:
        return True  # neither header: not a browser (every browser since 2020 sends Origin on a POST)
    try:
        netloc = urlsplit(origin.strip()).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == headers.get("host", "").strip().lower()  # "null" has none


class JsonOnlyMiddleware(RefusingMiddleware):
    """415 ``unsupported_media_type`` for a POST to a JSON route whose Content-Type is not
    ``application/json`` (parameters such as ``charset`` allowed), before the body is read."""

    def __init__(
        self, app: ASGIApp, json_paths: frozenset[str], also: dict[str, tuple[str, ...]] | None = None
    ) -> None:
        super().__init__(app)
        self.json_paths = json_paths
        # Routes that take other bodies too: media types, or prefixes ending in "/" ("image/"); ""
        # is a body with no Content-Type (huggingface_hub posts an image's bytes so). A cross-site
        # page can send those without asking, so the origin check (CrossOriginMiddleware) comes first.
        self.also = also or {}

    def refusal(self, scope: Scope) -> Exception | None:
        if scope["method"] != "POST" or scope["path"] not in self.json_paths:
            return None
        given = Headers(scope=scope).get("content-type", "")
        media = given.partition(";")[0].strip().lower()
        others = self.also.get(scope["path"], ())
        if media == JSON_MEDIA_TYPE or any(
            media == other or (other.endswith("/") and media.startswith(other)) for other in others
        ):
            return None
        shown = f"Content-Type {given[:60]!r}" if given else "no Content-Type"
        if not others:
            return UnsupportedMediaTypeError(
                f"this route takes a JSON body, and the request has {shown}; "
                f"send Content-Type: {JSON_MEDIA_TYPE}"
            )
        accepted = [JSON_MEDIA_TYPE, *(f"{other}*" if other.endswith("/") else other for other in others)]
        return UnsupportedMediaTypeError(
            f"this route takes a body of {', '.join(name for name in accepted if name)}, and the request "
            f"has {shown}"
        )
