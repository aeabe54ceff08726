"""A stored request run through its own route, in process: the route's parsing, generation path,
answer and errors, exactly as if the client had sent it now.

The call enters below the middleware (the request was checked when it was submitted: key, Host,
origin, media type, size) and above the routing, with the scope marked as a job's (``JOB_SCOPE``):
the routes then take the job's caller for the fair share and SD_JOB_TIMEOUT_S as the deadline.
Errors are rendered by the one table, as the exception middleware would."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import Message

from model.errors import EngineError
from service.logs import request_id_var
from service.runtime.errors import ServiceError
from service.web.clients.common import JOB_SCOPE
from service.web.errors import error_response


@dataclass(frozen=True)
class Answer:
    status: int
    media_type: str
    body: bytes


async def call_route(
    app: FastAPI, route: str, body: bytes, content_type: str, *, caller: str, job_id: str
) -> Answer:
    """``POST route`` with ``body``, answered by the app's routes; the request id is the job's id, so
    the request's progress and cancel are found by it (service/runtime/jobs.py)."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": route,
        "raw_path": route.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("job", 0),
        "server": ("job", 0),
        "app": app,
        "state": {},
        JOB_SCOPE: {"caller": caller, "id": job_id},
    }
    sent = False
    never = asyncio.Event()

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # a job's client never leaves; the call ends when its work does
        return {"type": "http.disconnect"}

    status, media_type, chunks = 500, "application/json", []

    async def send(message: Message) -> None:
        nonlocal status, media_type
        if message["type"] == "http.response.start":
            status = int(message["status"])
            headers = {
                key.decode("latin-1").lower(): value.decode("latin-1") for key, value in message["headers"]
            }
            media_type = headers.get("content-type", media_type)
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))

    token = request_id_var.set(job_id)
    try:
        # FastAPI's own middleware keeps an exit stack for the request's files (a form's uploads)
        async with contextlib.AsyncExitStack() as stack:
            scope["fastapi_middleware_astack"] = stack
            await app.router(scope, receive, send)
    except (ServiceError, EngineError, HTTPException) as error:
        response = error_response(error, path=route, method="POST")
        return Answer(response.status_code, "application/json", bytes(response.body))
    finally:
        request_id_var.reset(token)
    return Answer(status, media_type, b"".join(chunks))
