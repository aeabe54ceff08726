"""The HTTP routes: scoring, health, model info and metrics."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from schemas.score import (
    MAX_IMAGES_PER_PROMPT,
    MAX_SIZE,
    MIN_SIZE,
    SAMPLE_REQUEST,
    SAMPLE_RESPONSE,
    ErrorResponse,
    ImageRecord,
    InfoResponse,
    ScoreRequest,
)
from service.runtime.errors import RequestTimeoutError
from service.runtime.jobs import Job
from service.runtime.lifecycle import Lifecycle, Runtime
from service.runtime.metrics import CONTENT_TYPE, Metrics
from service.web.clients.common import JOB_SCOPE, followed
from service.web.errors import error_json, error_response, error_responses, json_body
from service.web.middleware import CLIENT_CLOSED_STATUS

log = logging.getLogger(__name__)
router = APIRouter()
T = TypeVar("T")

_ERRORS = error_responses(
    {
        400: "The body is not JSON.",
        422: "The JSON does not follow the contract (the message says where and why).",
    },
    ErrorResponse,
)


def _lifecycle(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


async def _until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _race(request: Request, work: Awaitable[T], timeout_s: float) -> T | None:
    """``work``'s result; None when the client left first; TimeoutError when time ran out.

    Either way ``work`` is cancelled, which takes its images out of the queue.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, timeout=max(timeout_s, 0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if not task.cancelled():
        return task.result()
    if watcher.done() and not watcher.cancelled():
        return None
    raise TimeoutError


@router.post(
    "/score",
    summary="Generate images (Azure ML model-catalog text-to-image contract)",
    responses={
        200: {
            "model": list[ImageRecord],
            "description": "One record per image, in input order.",
            "content": {"application/json": {"example": SAMPLE_RESPONSE}},
        },
        **_ERRORS,
    },
    openapi_extra=json_body(ScoreRequest, SAMPLE_REQUEST),
)
async def score(request: Request) -> Response:
    return await answer_generation(request, lambda runtime, body, job: runtime.scorer.score(body, job=job))


async def answer_generation(
    request: Request,
    work: Callable[[Runtime, bytes, Job], Awaitable[Any]],
    *,
    client: str = "score",
    answer: Callable[[Any], Response] = JSONResponse,
) -> Response:
    """``answer(work(runtime, body, job))``, JSON by default, within SD_REQUEST_TIMEOUT_S and only while
    the client waits: the one way every generating route is answered. The job (runtime/jobs.py) lets
    the caller follow and stop it by its request id (service/web/clients/control.py)."""
    started = time.monotonic()
    lifecycle = _lifecycle(request)
    # A job's request (run in process, service/web/jobs/) has the jobs' deadline, not a client's.
    settings = lifecycle.settings
    timeout_s = settings.job_timeout_s if JOB_SCOPE in request.scope else settings.request_timeout_s
    async with lifecycle.serving() as runtime, followed(request, client) as job:
        body = await request.body()
        try:
            records = await _race(request, work(runtime, body, job), timeout_s - (time.monotonic() - started))
        except TimeoutError:
            lifecycle.metrics.timeouts.inc()
            raise RequestTimeoutError.after(timeout_s) from None
    if records is None:
        log.info("client disconnected; its queued images were dropped")
        return error_json(CLIENT_CLOSED_STATUS, "client_closed_request", "the client closed the connection")
    return answer(records)


def _health(request: Request) -> Response:
    try:
        _lifecycle(request).require_ready()
    except Exception as error:
        return error_response(error)
    return PlainTextResponse("Healthy")


# The probes and the scrape answer text, and the OpenAPI document says so.
_READINESS: dict[str, Any] = {
    "response_class": PlainTextResponse,
    "responses": {
        200: {"content": {"text/plain": {"example": "Healthy"}}, "description": "Ready."},
        503: {"model": ErrorResponse, "description": "Loading, failed, or shutting down."},
    },
    "tags": ["health"],
}


@router.get("/", summary="Readiness (Azure ML probes): 200 Healthy once the model is warm", **_READINESS)
def root(request: Request) -> Response:
    return _health(request)


@router.get("/health/ready", summary="Readiness: same as GET /", **_READINESS)
def ready(request: Request) -> Response:
    return _health(request)


@router.get("/health/live", summary="Liveness: 200 while the process runs", tags=["health"])
def live() -> dict[str, str]:
    return {"status": "live"}


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    tags=["health"],
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4."}},
)
def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=CONTENT_TYPE)


@router.get("/info", summary="The loaded model and the request limits", response_model=InfoResponse)
def info(request: Request) -> InfoResponse:
    lifecycle = _lifecycle(request)
    runtime = lifecycle.require_ready()
    model = runtime.engine.info
    settings = lifecycle.settings
    return InfoResponse.model_validate(
        {
            "name": model.name,
            "architecture": model.architecture,
            "native_height": model.native_height,
            "native_width": model.native_width,
            "schedulers": list(model.schedulers),
            "default_scheduler": model.default_scheduler,
            "safety_checker": model.safety_checker,
            "random_weights": model.random_weights,
            "device": model.device,
            "dtype": model.dtype,
            "version": package_version(),
            "limits": {
                "max_prompts": settings.max_prompts,
                "max_prompt_chars": settings.max_prompt_chars,
                "max_steps": settings.max_steps,
                "max_images_per_prompt": MAX_IMAGES_PER_PROMPT,
                "min_size": MIN_SIZE,
                "max_size": MAX_SIZE,
                "max_batch_size": settings.max_batch_size,
            },
            "engines": engines_info(runtime),
            "adapters": list(model.adapters),
            "models": models_info(runtime),
        }
    )


def models_info(runtime: Runtime) -> list[dict[str, Any]]:
    """/info's "models": the default model, then the library's, each as the catalog describes it."""
    library, default = runtime.scorer.library, runtime.engine.info
    described = [library.info(name, default) for name in library.names]
    # each engine's models on its device now (an engine of one model: that one, always)
    on = [list(getattr(engine, "resident", None) or [library.default]) for engine in runtime.engines]
    return [
        {
            "name": each.name,
            "architecture": each.architecture,
            "inpainting": each.inpainting,
            "native_height": each.native_height,
            "native_width": each.native_width,
            "default": position == 0,
            "engines": [index for index, names in enumerate(on) if each.name in names],
        }
        for position, each in enumerate(described)
    ]


def engines_info(runtime: Runtime) -> list[dict[str, Any]]:
    """/info's "engines": each engine's device and state."""
    return [
        {
            "engine": str(engine.index),
            "device": engine.device,
            "dtype": engine.dtype,
            "running": engine.running,
            "max_running": engine.max_running,
            "serving": engine.serving,
            "failures": engine.failures,
        }
        for engine in runtime.step_loop.engines()
    ]


def package_version() -> str:
    try:
        return importlib.metadata.version("sd-endpoint")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
