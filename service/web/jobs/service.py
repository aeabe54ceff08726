"""The jobs of one server: submitting (bounds, idempotency, webhook checks), reading them back in
the answer's shape, and the runner that carries them out. The routes (routes.py) only parse and
answer; the store (service/jobstore) keeps everything, so any replica answers for any job."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from service.jobstore.records import EVENTS, FINISHED, JobRecord, JobStore, new_job_id
from service.jobstore.webhooks import Deliveries, WebhookError, WebhookPolicy, check_url
from service.runtime.errors import ContractError, QueueFullError, ServiceError
from service.settings import Settings
from service.web.errors import JobNotFoundError, JobsUnavailableError
from service.web.jobs.bodies import JobBody

log = logging.getLogger(__name__)
MAX_IDEMPOTENCY_KEY_CHARS = 255
# A webhook's payload carries the result when it is at most this large; else GET /v1/jobs/{id} has it.
MAX_WEBHOOK_RESULT_BYTES = 1 << 20
RETRY_AFTER_S = 5


class InvalidWebhookError(ContractError):
    """A webhook URL the server may not call (SSRF guard), or an unknown event."""

    param = "webhook"


class JobStoreFullError(QueueFullError):
    """Too many jobs queued (per key or in all), or the store holds its SD_JOB_STORE_MAX_BYTES."""


@dataclass(frozen=True)
class Submission:
    body: JobBody
    caller: str
    webhook: str | None = None
    events: tuple[str, ...] = ("completed",)
    idempotency_key: str | None = None


def webhook_policy(settings: Settings) -> WebhookPolicy:
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret is not None else None
    return WebhookPolicy.parse(secret, settings.webhook_allowed_hosts)


class JobService:
    """Submit, read, cancel and delete the caller's jobs; the store is opened by ``open``."""

    def __init__(
        self, settings: Settings, store: JobStore, deliveries: Deliveries, policy: WebhookPolicy
    ) -> None:
        self.settings = settings
        self.store = store
        self.deliveries = deliveries
        self.policy = policy
        self.submitted = asyncio.Event()  # pokes the runner: a job is waiting

    async def submit(self, submission: Submission) -> tuple[JobRecord, bool]:
        """The stored job (queued) and whether it is new (False: the same Idempotency-Key again)."""
        # 1. What cannot be stored: a webhook the server may not call, unknown events, a long key.
        if submission.webhook is not None:
            try:
                await asyncio.to_thread(check_url, submission.webhook, self.policy)
            except WebhookError as error:
                raise InvalidWebhookError(f"webhook: {error}") from None
        unknown = [event for event in submission.events if event not in EVENTS]
        if unknown or not submission.events:
            raise InvalidWebhookError(f"webhook_events_filter must list some of: {', '.join(EVENTS)}")
        key = submission.idempotency_key
        if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS and key.isprintable()):
            raise ContractError(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable characters"
            )
        # 2. The bounds: the caller's queued jobs, everyone's, the store's bytes.
        await self._store(self._check_room, submission.caller, len(submission.body.body))
        # 3. Stored (or the one this Idempotency-Key made before), and the runner told.
        record = JobRecord(
            id=new_job_id(),
            caller=submission.caller,
            route=submission.body.route,
            body=submission.body.body,
            content_type=submission.body.content_type,
            state="queued",
            created_at=time.time(),
            webhook=submission.webhook,
            events=tuple(dict.fromkeys(submission.events)),
            idempotency_key=key,
        )
        stored, created = await self._store(self.store.create, record)
        if created:
            self.submitted.set()
        return stored, created

    def _check_room(self, caller: str, size: int) -> None:
        settings = self.settings
        if self.store.queued_for(caller) >= settings.max_jobs_per_key:
            raise _full(
                f"this key has {settings.max_jobs_per_key} jobs queued or running (SD_MAX_JOBS_PER_KEY)"
            )
        counts = self.store.counts()
        if counts.get("queued", 0) + counts.get("running", 0) >= settings.max_jobs:
            raise _full(f"the server has {settings.max_jobs} jobs queued or running (SD_MAX_JOBS)")
        if self.store.size_bytes() + size > settings.job_store_max_bytes:
            raise _full(
                "the job store holds SD_JOB_STORE_MAX_BYTES; finished jobs leave it after SD_JOB_TTL_S"
            )

    async def get(self, caller: str, job_id: str) -> JobRecord:
        record: JobRecord | None = await self._store(self.store.get, caller, job_id)
        if record is None:
            raise _not_found()
        return record

    async def list(self, caller: str, limit: int, before: str | None) -> list[JobRecord]:
        records: list[JobRecord] = await self._store(self.store.list, caller, limit=limit, before=before)
        return records

    async def cancel(self, caller: str, job_id: str) -> JobRecord:
        record: JobRecord | None = await self._store(self.store.cancel, caller, job_id, time.time())
        if record is None:
            raise _not_found()
        return record

    async def delete(self, caller: str, job_id: str) -> None:
        if not await self._store(self.store.delete, caller, job_id):
            raise _not_found()

    async def _store(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store call in a worker thread; a store that does not answer (Redis down, a locked disk)
        is a 503 that says so, never a 500."""
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except ServiceError:
            raise
        except Exception as error:
            log.warning("the job store failed: %s", type(error).__name__)
            raise JobsUnavailableError(
                f"the job store does not answer ({type(error).__name__}); retry in a few seconds"
            ) from None

    async def close(self) -> None:
        await self.deliveries.aclose()
        await asyncio.to_thread(self.store.close)


def _full(message: str) -> JobStoreFullError:
    error = JobStoreFullError(f"{message}; retry later, or collect or delete finished jobs")
    error.retry_after_s = RETRY_AFTER_S
    return error


def _not_found() -> JobNotFoundError:
    return JobNotFoundError(
        "no job of yours has that id (it never existed, expired after SD_JOB_TTL_S, was deleted, or was "
        "submitted with another key); GET /v1/jobs lists yours"
    )


def result_of(record: JobRecord) -> Any:
    """The route's own answer: its JSON, or for a binary one (Hugging Face's PNG) the bytes' base64
    with their media type."""
    if record.result is None:
        return None
    media = (record.result_type or "").partition(";")[0].strip()
    if media == "application/json":
        try:
            return json.loads(record.result)
        except ValueError:
            pass
    return {
        "content_type": media or "application/octet-stream",
        "base64": base64.b64encode(record.result).decode(),
    }


def view(record: JobRecord, *, with_result: bool = True) -> dict[str, Any]:
    """A job as the API shows it."""
    answer: dict[str, Any] = {
        "id": record.id,
        "object": "job",
        "route": record.route,
        "state": record.state,
        "progress": {"step": record.step, "steps": record.steps},
        "status": record.status,
        "result": result_of(record) if with_result and record.state in FINISHED else None,
        "error": record.error,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "attempts": record.attempts,
        "cancel_requested": record.cancel_requested,
        "webhook": record.webhook,
        "webhook_events_filter": list(record.events),
        "urls": {"get": f"/v1/jobs/{record.id}", "cancel": f"/v1/jobs/{record.id}/cancel"},
    }
    return answer


def webhook_payload(record: JobRecord) -> dict[str, Any]:
    """A webhook's data: the job, with its result when small enough to send."""
    small = record.result is None or len(record.result) <= MAX_WEBHOOK_RESULT_BYTES
    return view(record, with_result=small)


def events_of(value: Any) -> tuple[str, ...]:
    """``webhook_events_filter`` as sent: a list of event names (None: completed only)."""
    if value is None:
        return ("completed",)
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not all(isinstance(v, str) for v in value)
    ):
        raise InvalidWebhookError(f"webhook_events_filter must be a list of: {', '.join(EVENTS)}")
    return tuple(value)
