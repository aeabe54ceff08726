"""A job's record and the contract every job store keeps (SQLite on one machine, Redis for several).

Stores know nothing of HTTP: the web layer turns a request into a ``JobRecord`` (its body with the
seeds already pinned, so that a job run twice draws the same images) and a runner claims, renews
and finishes it. Times are always passed in (``now``) so that tests, and replicas whose clocks
agree, decide leases the same way.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

if TYPE_CHECKING:  # typing.Unpack is 3.11+; the package still runs on 3.10
    from typing_extensions import Unpack

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
EVENTS = ("start", "progress", "completed")

# "job_" + 24 url-safe characters: 18 random bytes (144 bits), so ids cannot be guessed. Every id
# a caller hands in is matched against this before it reaches SQL, a Redis key or a file name.
_ID_BYTES = 18
_ID_PATTERN = re.compile(r"job_[A-Za-z0-9_-]{24}")
# The error a job cancelled before or while running carries.
CANCELLED_ERROR: dict[str, Any] = {"code": "cancelled", "message": "the job was cancelled by its caller"}


def new_job_id() -> str:
    return "job_" + secrets.token_urlsafe(_ID_BYTES)


def is_job_id(value: object) -> bool:
    """Whether ``value`` has the shape of an id this package makes. Anything else (``../x``, a huge
    or non-ASCII string) is simply "not found": no store looks it up."""
    return isinstance(value, str) and _ID_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True)
class JobRecord:
    id: str  # new_job_id()
    caller: str  # the caller's digest ("" without keys); another caller's id is "not found"
    route: str  # e.g. "/score", "/v1/images/generations", "/sdapi/v1/txt2img"
    body: bytes  # the request body as submitted (seeds already pinned by the caller of create)
    content_type: str  # the body's media type, e.g. "application/json"
    state: str
    created_at: float  # unix seconds
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    steps: int = 0
    status: int | None = None  # the route's HTTP status when finished
    result: bytes | None = None  # the route's answer body (JSON bytes, or PNG bytes)
    result_type: str | None = None
    error: dict[str, Any] | None = None  # {"code", "message"} when failed or cancelled
    webhook: str | None = None
    events: tuple[str, ...] = ("completed",)  # which webhook events: "start", "progress", "completed"
    idempotency_key: str | None = None
    owner: str | None = None  # the replica running it (kept after it finished: who ran it)
    lease_until: float | None = None
    cancel_requested: bool = False
    attempts: int = 0  # times it was claimed (a replica that died makes it run again)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


def check_new(record: JobRecord) -> None:
    """What ``create`` accepts: a fresh queued record with an id of ours. A ValueError says what to fix
    (these are programming errors of the web layer, never a caller's)."""
    if not is_job_id(record.id):
        raise ValueError("a job's id must come from new_job_id(); make the record with that id")
    if record.state != "queued":
        raise ValueError(f"a new job must be queued, not {record.state!r}; create it with state='queued'")
    unknown = [e for e in record.events if e not in EVENTS]
    if unknown:
        raise ValueError(f"unknown webhook events {unknown}; use some of {list(EVENTS)}")


class Outcome(TypedDict, total=False):
    """What ``finish`` stores beside the state, each left out (or None) when there is none. Spelled
    once here so that the contract and every store take the same keywords."""

    status: int | None
    result: bytes | None
    result_type: str | None
    error: dict[str, Any] | None


def may_finish(job_id: str, state: str) -> bool:
    """What every store's ``finish`` checks first: a state that is not a finished one is a
    programming error (ValueError); an id not of our shape is simply not found (False)."""
    if state not in FINISHED:
        raise ValueError(f"a job finishes as one of {sorted(FINISHED)}, not {state!r}")
    return is_job_id(job_id)


class JobStore(Protocol):
    """Every method is synchronous and thread-safe: the asyncio app calls them through threads.

    Listing: ``list`` returns records without their body and result (``body=b""``, ``result=None``)
    to keep pages light; ``get`` returns the whole record.

    Deleting: ``delete`` drops the record and its result at once, whatever the job's state. A running
    job's runner learns it at its next ``renew`` (False) and stops; its ``finish`` then returns False
    and stores nothing, so a deleted job's result is never kept.

    Crashes: a runner that stops renewing loses its job when the lease passes; the next ``claim``
    takes it over (``attempts`` counts the claims; a runner may fail a job claimed too often). An
    expired job whose cancel was requested is not run again: ``claim`` finishes it cancelled.
    """

    def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        """Stores a queued job: (the stored record, True). With an idempotency_key this caller already
        used (and whose job still exists): (that job, False), and nothing is stored."""
        ...

    def get(self, caller: str, job_id: str) -> JobRecord | None:
        """The whole record; None when unknown, malformed, or another caller's."""
        ...

    def list(self, caller: str, *, limit: int = 20, before: str | None = None) -> list[JobRecord]:
        """This caller's jobs, newest first, at most ``limit``, bodies and results left out. ``before``
        is the id of the last record of the previous page (that record excluded); an unknown or
        expired cursor gives an empty page."""
        ...

    def claim(self, replica: str, lease_s: float, now: float) -> JobRecord | None:
        """Atomically: a running job whose lease expired (its owner died), else the oldest queued
        job, becomes running, owned by ``replica`` until ``now + lease_s``, attempts + 1."""
        ...

    def renew(self, job_id: str, replica: str, lease_s: float, now: float, step: int, steps: int) -> bool:
        """Extends the lease and records progress. False when this replica no longer owns the job
        (taken over, deleted) or a cancel was requested (the lease is still extended then, so that
        the runner can stop and finish it cancelled)."""
        ...

    def finish(
        self, job_id: str, replica: str, *, state: str, now: float, **outcome: Unpack[Outcome]
    ) -> bool:
        """Only by its owner: False (nothing stored) when another replica took it over or it was
        deleted."""
        ...

    def cancel(self, caller: str, job_id: str, now: float) -> JobRecord | None:
        """A queued job is cancelled at once; a running one gets cancel_requested (its runner stops it
        and finishes it cancelled); a finished one is returned unchanged. None when not found."""
        ...

    def delete(self, caller: str, job_id: str) -> bool:
        """Drops the record and its result, whatever its state (see the class docstring)."""
        ...

    def expire(self, now: float, ttl_s: float) -> int:
        """Drops the jobs that finished more than ``ttl_s`` ago; returns how many."""
        ...

    def counts(self) -> dict[str, int]:
        """Jobs per state, every state named (0 included)."""
        ...

    def queued_for(self, caller: str) -> int:
        """This caller's queued and running jobs."""
        ...

    def size_bytes(self) -> int:
        """Bytes of the bodies and results held."""
        ...

    def close(self) -> None: ...
