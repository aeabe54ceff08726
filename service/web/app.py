"""The FastAPI application: ``create_app(settings, engine=None)``.

Without an engine the app loads the one the settings name, in a thread after start-up; ``GET /``
answers 503 until it is loaded and warmed up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from model.errors import EngineError
from service.runtime.engines import ServingEngine
from service.runtime.errors import ServiceError
from service.runtime.jobs import Jobs
from service.runtime.lifecycle import Lifecycle
from service.runtime.metrics import Metrics
from service.settings import Settings
from service.web import docs, openai, routes, ui
from service.web.clients import a1111, a1111_lists, control, huggingface, links
from service.web.errors import request_components, scope_error_response
from service.web.guards import (
    CrossOriginMiddleware,
    HostCheckMiddleware,
    JsonOnlyMiddleware,
    SecurityHeadersMiddleware,
)
from service.web.jobs import routes as jobs_routes
from service.web.jobs.routes import RespondAsync
from service.web.jobs.setup import DurableJobs
from service.web.middleware import (
    PROBE_PATHS,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    HeadMiddleware,
    RequestContextMiddleware,
    SlashRedirectMiddleware,
)

DESCRIPTION = """Text-to-image with Stable Diffusion behind Azure ML's model-catalog scoring contract.

`POST /score` takes `{"input_data": {"columns": ["prompt"], "data": [...], "parameters": {...}}}` and
answers one record per image with a base64 PNG, the NSFW flag and the seed that reproduces it.
Every error is `{"error": {"code", "message", "status"}}`. With `SD_API_KEYS` set, send
`Authorization: Bearer <key>`.

`POST /v1/images/generations` and `GET /v1/models` speak OpenAI's Images API (base URL `/v1`), with the
same limits and generation path; errors on `/v1/*` are OpenAI's `{"error": {"message", "type", "param",
"code"}}`.
"""


CLIENT_ROUTERS = (huggingface.router, a1111.router, a1111_lists.router, control.router, links.router)
# POSTs that carry no body (they stop requests): no media type for the JSON-only rule to check (the
# cross-origin rule of service/web/guards.py keeps other sites' pages from sending them).
BODYLESS_POSTS = frozenset(
    {
        "/sdapi/v1/interrupt",
        "/sdapi/v1/skip",
        "/requests/{request_id}/cancel",
        "/v1/jobs/{job_id}/cancel",
        *a1111_lists.BODYLESS,
    }
)


# Routes that take other bodies beside JSON: OpenAI's edits (multipart, as its SDK sends files), and
# Hugging Face's POST / (an image's bytes, as InferenceClient.image_to_image sends one without
# parameters: no Content-Type at all).
OTHER_BODIES = {
    "/v1/images/edits": ("multipart/form-data",),
    "/": ("image/", "application/octet-stream", ""),
}


def create_app(settings: Settings | None = None, *, engine: ServingEngine | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    lifecycle = Lifecycle(settings, metrics, engine)

    durable = DurableJobs()  # jobs that outlive their request (service/web/jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle.begin()
        await durable.open(app, settings, lifecycle, metrics)
        yield
        await durable.close()
        await lifecycle.stop()

    app = FastAPI(
        title="Stable Diffusion endpoint",
        version=routes.package_version(),
        description=DESCRIPTION,
        openapi_url="/swagger.json",
        docs_url=None,  # /docs and /redoc come from service/web/docs.py, with local assets
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.image_links = links.links_from(settings)  # OpenAI's url answers
    app.state.jobs = Jobs()  # requests in flight, to follow and stop by id (service/web/clients/)

    # Errors: one table (service/web/errors.py) for the server's, the engine's and routing's exceptions.
    async def handle(request: Request, error: Exception) -> Response:
        return scope_error_response(error, request.scope)  # in the shape of the route's client

    for error_type in (ServiceError, EngineError, HTTPException):
        app.add_exception_handler(error_type, handle)

    # Middleware: the last added runs first. Ids and metrics, security headers, Host, the origin of a
    # state-changing request, HEAD, slashes, then keys, then the media type and the body.
    routers = (routes.router, ui.router, openai.router, jobs_routes.router, docs.router, *CLIENT_ROUTERS)
    api_routes = [route for router in routers for route in router.routes if isinstance(route, APIRoute)]
    app.add_middleware(RespondAsync)  # Prefer: respond-async, once the request passed every check
    app.add_middleware(
        BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s
    )
    posts = {route.path_format for route in api_routes if "POST" in (route.methods or ())}
    json_paths = frozenset(posts - BODYLESS_POSTS)
    app.add_middleware(JsonOnlyMiddleware, json_paths=json_paths, also=OTHER_BODIES)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_key_list)
    route_paths = frozenset([app.openapi_url or ""] + [route.path_format for route in api_routes])
    # Starlette's own trailing-slash redirect builds an absolute URL from the Host header; ours is
    # relative (and runs before the key check, like routing's 404 would).
    app.router.redirect_slashes = False
    app.add_middleware(SlashRedirectMiddleware, route_paths=route_paths)
    app.add_middleware(HeadMiddleware)
    app.add_middleware(CrossOriginMiddleware)
    app.add_middleware(HostCheckMiddleware, allowed=settings.allowed_host_list, exempt_paths=PROBE_PATHS)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, route_paths=route_paths)

    for router in routers:
        app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request models of the routes that read their bodies themselves (to
    parse them off the loop, and answer 400 vs 422): every reference in it resolves."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(request_components())
        app.openapi_schema = schema
    return app.openapi_schema
