"""What every client's routes share: the server's lifecycle, the names it answers to, who the
caller is, what each caller chose (``CallerChoices``), and the job that follows its request."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Scope

from service.logs import request_id_var
from service.runtime.jobs import Job, Jobs, caller_of
from service.runtime.lifecycle import Lifecycle
from service.web.middleware import presented_key


def lifecycle_of(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


def served_names(lifecycle: Lifecycle) -> tuple[str, ...]:
    """The model names this server answers to (OpenAI model ids, A1111 checkpoint titles):
    SD_SERVED_MODEL_NAMES, so that clients that always send "dall-e-3" work unchanged, else the
    default model's own name (which needs the model loaded)."""
    return lifecycle.settings.served_model_name_list or (lifecycle.require_ready().scorer.library.default,)


def library_names(lifecycle: Lifecycle) -> tuple[str, ...]:
    """The library's models (SD_MODELS) besides the default one, in the library's order."""
    return tuple(lifecycle.require_ready().scorer.library.entries)


def jobs_of(request: Request) -> Jobs:
    jobs: Jobs = request.app.state.jobs
    return jobs


# The scope key of a job's request, run in process (service/web/jobs/inprocess.py): {"caller": the
# submitter's digest, "id": the job's id}. Only the server sets it: no client's request carries it.
JOB_SCOPE = "sd.job"


def caller(request: Request) -> str:
    """Whose request this is: a digest of its API key (checked by the middleware already), or ""
    on a server without keys, where every caller is the same one; a job's, its submitter's."""
    return caller_of_scope(request.scope)


def caller_of_scope(scope: Scope) -> str:
    """``caller`` from an ASGI scope (the middleware's view of a request)."""
    job = scope.get(JOB_SCOPE)
    if isinstance(job, dict):
        return str(job["caller"])
    if not scope["app"].state.settings.api_key_list:
        return ""
    return caller_of(presented_key(Headers(scope=scope)))


@asynccontextmanager
async def followed(request: Request, client: str, preview_every: int = 0) -> AsyncIterator[Job]:
    """A job for this request, known by its request id for as long as it runs."""
    jobs = jobs_of(request)
    job = jobs.open(Job(request_id_var.get(), caller(request), client, preview_every))
    try:
        yield job
    finally:
        jobs.close(job)


T = TypeVar("T")
MAX_CALLERS = 10_000  # callers whose choices are kept; the least recently active one goes first


class CallerChoices(Generic[T]):
    """What each caller chose (A1111's checkpoint of POST /sdapi/v1/options), by ``caller``: one
    caller never reads nor changes another's. In memory, least recently used out past ``limit``
    (a forgotten caller has the server's default again); safe from any thread."""

    def __init__(self, limit: int = MAX_CALLERS) -> None:
        self._limit = limit
        self._choices: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, who: str) -> T | None:
        with self._lock:
            if who not in self._choices:
                return None
            self._choices.move_to_end(who)
            return self._choices[who]

    def set(self, who: str, choice: T | None) -> None:
        """``choice`` None: the caller is back on the server's default."""
        with self._lock:
            self._choices.pop(who, None)
            if choice is not None:
                self._choices[who] = choice
                while len(self._choices) > self._limit:
                    self._choices.popitem(last=False)

    def __len__(self) -> int:
        return len(self._choices)


_STATE_LOCK = threading.Lock()


def app_state(request: Request, name: str, make: Callable[[], T]) -> T:
    """``request.app.state.<name>``, made with ``make()`` the first time it is asked for."""
    state = request.app.state
    with _STATE_LOCK:
        if not hasattr(state, name):
            setattr(state, name, make())
        value: T = getattr(state, name)
    return value
