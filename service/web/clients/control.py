"""Stop one request by its id, whatever client sent it: ``POST /requests/{id}/cancel``.

The id is the request's ``x-request-id`` (the client's own, or the one the server answered with).
Its images leave the queue at once and their engine at its next step; the request itself is
answered 499 ``cancelled``. Only the caller that sent it (the same API key) can cancel it: any
other id, finished, unknown or someone else's, is 404.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from schemas.score import ErrorResponse
from service.web.clients.common import caller, jobs_of
from service.web.errors import RequestNotFoundError

router = APIRouter(tags=["requests"])


class Cancelled(BaseModel):
    request_id: str
    cancelled: int = Field(description="Requests with that id that were running (clients may reuse an id).")


@router.post(
    "/requests/{request_id}/cancel",
    summary="Cancel a running request by its x-request-id; it answers 499 cancelled",
    response_model=Cancelled,
    responses={
        401: {"model": ErrorResponse, "description": "Missing or unknown API key (when SD_API_KEYS is set)."},
        404: {"model": ErrorResponse, "description": "No running request of yours has that id."},
    },
)
def cancel(request_id: str, request: Request) -> Cancelled:
    jobs = jobs_of(request).find(request_id, caller(request))
    if not jobs:
        raise RequestNotFoundError(
            "no running request of yours has that id (it finished, never ran, or was sent with another key); "
            "the id is the x-request-id header of the request"
        )
    for job in jobs:
        job.cancel()
    return Cancelled(request_id=request_id, cancelled=len(jobs))
