"""What every client's routes share: who the caller is, and the job that follows its request."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.datastructures import Headers
from starlette.requests import Request

from service.logs import request_id_var
from service.runtime.jobs import Job, Jobs
from service.web.middleware import presented_key


def jobs_of(request: Request) -> Jobs:
    jobs: Jobs = request.app.state.jobs
    return jobs


def caller(request: Request) -> str:
    """Whose request this is: a digest of its API key (checked by the middleware already), or ""
    on a server without keys, where every caller is the same one."""
    if not request.app.state.settings.api_key_list:
        return ""
    return hashlib.sha256(presented_key(Headers(scope=request.scope)).encode()).hexdigest()[:32]


@asynccontextmanager
async def followed(request: Request, client: str, preview_every: int = 0) -> AsyncIterator[Job]:
    """A job for this request, known by its request id for as long as it runs."""
    jobs = jobs_of(request)
    job = jobs.open(Job(request_id_var.get(), caller(request), client, preview_every))
    try:
        yield job
    finally:
        jobs.close(job)
