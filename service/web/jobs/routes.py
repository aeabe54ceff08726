"""The jobs API: ``POST /v1/jobs``, ``GET /v1/jobs`` (the caller's, paged), ``GET /v1/jobs/{id}``,
``GET /v1/jobs/{id}/result`` (the route's own answer, as it would have been sent), ``POST
/v1/jobs/{id}/cancel`` and ``DELETE /v1/jobs/{id}``; and cog's convention on every generation
route: ``Prefer: respond-async`` answers 202 with the job instead of waiting (``RespondAsync``).

A job belongs to the caller's key: another key's id is 404, as an unknown one. ``Idempotency-Key``
makes a retried submit return the job the first one made."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.fields import ScoreLimits
from service.jobstore import is_job_id
from service.runtime.errors import ContractError
from service.runtime.scoring import parse_body_off_loop
from service.settings import Settings
from service.web.clients.common import caller, caller_of_scope
from service.web.errors import JobsUnavailableError, error_responses, json_body, scope_error_response
from service.web.jobs.bodies import SEED_PLACES, job_body, job_document
from service.web.jobs.service import JobService, Submission, events_of, view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MAX_PAGE = 100
PREFER_ASYNC = "respond-async"
_ERRORS = error_responses(
    {
        404: "No job of yours has that id.",
        422: "The job's route, body or webhook is off the contract (the message says which).",
        501: "This server keeps no jobs (SD_JOB_STORE=off).",
    }
)
SAMPLE_JOB: dict[str, Any] = {
    "route": "/v1/images/generations",
    "body": {"prompt": "a lighthouse at dusk", "n": 1, "num_inference_steps": 30},
    "webhook": "https://example.com/hooks/sd",
    "webhook_events_filter": ["start", "completed"],
}


class JobRequest(BaseModel):
    """The body of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [SAMPLE_JOB]})

    route: str = Field(description=f"One of {', '.join(r for r in SEED_PLACES if r != '/v1/images/edits')}.")
    body: dict[str, Any] = Field(description="That route's own request body.")
    webhook: str | None = Field(default=None, max_length=2048, description="Called as the job goes.")
    webhook_events_filter: list[str] | None = Field(
        default=None, description='Of "start", "progress", "completed"; default: completed only.'
    )


def _limits(settings: Settings) -> ScoreLimits:
    """The operator's request limits, which a job's body is held to as the route's own would be."""
    return ScoreLimits(settings.max_prompts, settings.max_prompt_chars, settings.max_steps)


def service_of(request: Request) -> JobService:
    service: JobService | None = request.app.state.job_service
    if service is None:
        raise JobsUnavailableError(request.app.state.job_service_problem)
    return service


def _accepted(record_view: dict[str, Any], created: bool) -> JSONResponse:
    headers = {"Location": record_view["urls"]["get"]}
    return JSONResponse(record_view, status_code=202 if created else 200, headers=headers)


@router.post(
    "",
    summary="Submit a job: any generation route's body, answered later (202 with the job)",
    status_code=202,
    responses=_ERRORS,
    openapi_extra=json_body(JobRequest, SAMPLE_JOB),
)
async def submit(request: Request) -> JSONResponse:
    service = service_of(request)
    limits = _limits(request.app.state.settings)
    parsed = await parse_body_off_loop(await request.body(), JobRequest, limits, expected="a job object")
    if parsed.route == "/v1/images/edits":
        raise_edits()
    prepared = await asyncio.to_thread(job_document, parsed.route, parsed.body)  # serialises it
    submission = Submission(
        prepared,
        caller(request),
        parsed.webhook,
        events_of(parsed.webhook_events_filter),
        request.headers.get("idempotency-key"),
    )
    record, created = await service.submit(submission)
    return _accepted(view(record), created)


def raise_edits() -> None:
    raise ContractError(
        "route: /v1/images/edits takes its image as a file; send the form to /v1/images/edits itself "
        "with the header Prefer: respond-async"
    )


@router.get("", summary="Your jobs, newest first (paged: before=<the last id of a page>)", responses=_ERRORS)
async def list_jobs(request: Request, limit: int = 20, before: str | None = None) -> dict[str, Any]:
    service = service_of(request)
    limit = max(1, min(limit, MAX_PAGE))
    cursor = before if before is not None and is_job_id(before) else None
    records = (
        [] if before is not None and cursor is None else await service.list(caller(request), limit, cursor)
    )
    data = [view(record, with_result=False) for record in records]
    return {"object": "list", "data": data, "next": data[-1]["id"] if len(data) == limit else None}


@router.get(
    "/{job_id}", summary="A job: its state, progress, and the route's answer once done", responses=_ERRORS
)
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    return view(await service_of(request).get(caller(request), job_id))


@router.get(
    "/{job_id}/result", summary="A finished job's answer, as its route would have sent it", responses=_ERRORS
)
async def get_result(job_id: str, request: Request) -> Response:
    record = await service_of(request).get(caller(request), job_id)
    if record.result is None:
        return JSONResponse(
            view(record, with_result=False), status_code=202 if record.state in ("queued", "running") else 200
        )
    return Response(record.result, status_code=record.status or 200, media_type=record.result_type)


@router.post(
    "/{job_id}/cancel", summary="Cancel a job: queued at once, running at its next step", responses=_ERRORS
)
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    record = await service_of(request).cancel(caller(request), job_id)
    for job in request.app.state.jobs.find(job_id, caller(request)):  # running here: out at its next step
        job.cancel()
    return view(record)


@router.delete(
    "/{job_id}", summary="Delete a job and its result (a running one is stopped)", responses=_ERRORS
)
async def delete_job(job_id: str, request: Request) -> dict[str, Any]:
    await service_of(request).delete(caller(request), job_id)
    for job in request.app.state.jobs.find(job_id, caller(request)):
        job.cancel()
    return {"id": job_id, "object": "job", "deleted": True}


class RespondAsync:
    """``Prefer: respond-async`` on a generation route (cog's convention): the request becomes a job
    and is answered 202 with it at once. Runs after the key, Host, origin, media type and size
    checks, so a job is only ever made of a request the route itself would have taken in.
    ``Idempotency-Key``, ``Webhook`` and ``Webhook-Events`` (comma-separated) headers apply."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in SEED_PLACES:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if PREFER_ASYNC not in [item.strip().lower() for item in headers.get("prefer", "").split(",")]:
            await self.app(scope, receive, send)
            return
        try:
            response = await self._submit(scope, receive, headers)
        except Exception as error:  # refused: in the route's client's shape
            response = scope_error_response(error, scope)
        await response(scope, receive, send)

    async def _submit(self, scope: Scope, receive: Receive, headers: Headers) -> Response:
        app = scope["app"]
        service: JobService | None = app.state.job_service
        if service is None:
            raise JobsUnavailableError(app.state.job_service_problem)
        body = await _read(receive)
        limits = _limits(app.state.settings)
        # parsed (up to SD_MAX_BODY_BYTES of JSON) in a worker thread: the event loop keeps serving
        prepared = await asyncio.to_thread(
            job_body, scope["path"], body, headers.get("content-type", ""), limits
        )
        webhook_events = headers.get("webhook-events")
        events = tuple(e.strip() for e in webhook_events.split(",")) if webhook_events else ("completed",)
        submission = Submission(
            prepared, caller_of_scope(scope), headers.get("webhook"), events, headers.get("idempotency-key")
        )
        record, created = await service.submit(submission)
        return _accepted(view(record), created)


async def _read(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
