"""The runner of one replica: it claims queued jobs from the store (and jobs whose replica died),
runs each through its own route in process, renews its lease while it runs, and keeps the answer.

Steps of one job (``_run``): 1) the start webhook, 2) the route called in process, its progress
read from the request's runtime job and written with each lease renewal, 3) a cancel or a lost
lease stops it at its next step, 4) the answer kept (only by the replica that still owns it), 5)
the completed webhook. A replica killed in the middle stops renewing; when the lease passes,
another claim takes the job over and runs it again from its pinned seeds: the images are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from typing import Any

from fastapi import FastAPI

from service.jobstore import JobRecord
from service.runtime.jobs import Job
from service.runtime.lifecycle import Lifecycle
from service.runtime.metrics import Metrics
from service.web.jobs.inprocess import Answer, call_route
from service.web.jobs.service import JobService, webhook_payload

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.5  # how often an idle replica looks for jobs (another replica's, or one whose owner died)
RENEW_EVERY_S = 1.0
EXPIRE_EVERY_S = 60.0
# A finished job's answer is offered to a store that cannot be reached (Redis restarting) this long.
FINISH_RETRY_S = 60.0
MAX_ATTEMPTS = 5  # a job that took its replica down this often is failed rather than run again


class Runner:
    def __init__(self, app: FastAPI, service: JobService, lifecycle: Lifecycle, metrics: Metrics) -> None:
        self.app = app
        self.service = service
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.active: set[asyncio.Task[None]] = set()
        self.background: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._store_down = False  # one warning per outage, not one a poll

    def start(self) -> None:
        self._loops = [asyncio.create_task(self._claim_loop()), asyncio.create_task(self._expire_loop())]

    async def stop(self) -> None:
        """Stop claiming; jobs still running stop where they are (their lease passes and they run
        again, here after a restart or on another replica)."""
        for task in [*self._loops, *self.active]:
            task.cancel()
        await asyncio.gather(*self._loops, *self.active, return_exceptions=True)
        if self.background:  # webhooks on their way get a moment, then stop (their retries with them)
            await asyncio.wait(self.background, timeout=2)
            for task in self.background:
                task.cancel()
            await asyncio.gather(*self.background, return_exceptions=True)

    # ------------------------------------------------------------------ claiming
    async def _claim_loop(self) -> None:
        settings, store = self.service.settings, self.service.store
        while True:
            if len(self.active) >= settings.job_concurrency or not self.lifecycle.is_ready:
                await asyncio.sleep(IDLE_POLL_S)
                continue
            try:
                record = await asyncio.to_thread(store.claim, self.replica, settings.job_lease_s, time.time())
            except Exception as error:  # the store is down (Redis restarting): try again, never crash
                if not self._store_down:
                    log.warning(
                        "could not claim a job from the store (%s); retrying every 2 s", type(error).__name__
                    )
                self._store_down = True
                await asyncio.sleep(IDLE_POLL_S * 4)
                continue
            if self._store_down:
                log.info("the job store answers again")
                self._store_down = False
            if record is None:
                await self._idle()
                continue
            task = asyncio.create_task(self._run(record))
            self.active.add(task)
            task.add_done_callback(self.active.discard)

    async def _idle(self) -> None:
        """Wait for a local submission, or a while (another replica's jobs, expired leases)."""
        self.service.submitted.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.service.submitted.wait(), IDLE_POLL_S)

    async def _expire_loop(self) -> None:
        while True:
            try:
                dropped = await asyncio.to_thread(
                    self.service.store.expire, time.time(), self.service.settings.job_ttl_s
                )
                if dropped:
                    log.info("dropped %d finished jobs older than SD_JOB_TTL_S", dropped)
                self._count()
            except Exception:
                log.exception("could not expire finished jobs; trying again later")
            await asyncio.sleep(EXPIRE_EVERY_S)

    def _count(self) -> None:
        store = self.service.store
        for state, count in store.counts().items():
            self.metrics.jobs.labels(state=state).set(count)
        self.metrics.job_store_bytes.set(store.size_bytes())

    # ------------------------------------------------------------------ one job
    async def _run(self, record: JobRecord) -> None:
        if record.attempts > MAX_ATTEMPTS:
            message = (
                f"the job was started {MAX_ATTEMPTS} times and never finished (its replica stopped each "
                "time); submit it again if it should run"
            )
            error = {"code": "too_many_attempts", "message": message}
            await self._finish(record, "failed", None, error)
            return
        # 1. started
        self._webhook(record, "start")
        log.info("job %s started (attempt %d) on %s", record.id, record.attempts, record.route)
        # 2. the route, in process, with its lease renewed while it runs
        work = asyncio.create_task(
            call_route(
                self.app,
                record.route,
                record.body,
                record.content_type,
                caller=record.caller,
                job_id=record.id,
            )
        )
        followed = await self._runtime_job(record, work)
        stopped = await self._follow(record, work, followed)
        if stopped == "lost":
            return  # another replica owns it now (or it was deleted): nothing of ours is kept
        try:
            answer = await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s failed unexpectedly", record.id)
            answer = Answer(500, "application/json", b'{"error": {"code": "internal_error"}}')
        # 3. kept, by its owner only
        if stopped == "cancelled":
            await self._finish(
                record, "cancelled", answer, {"code": "cancelled", "message": "cancelled by its caller"}
            )
        elif 200 <= answer.status < 300:
            await self._record_progress(record, followed)  # the last steps, done after the last renewal
            await self._finish(record, "succeeded", answer, None)
        else:
            await self._finish(record, "failed", answer, _error_of(answer))

    async def _runtime_job(self, record: JobRecord, work: asyncio.Task[Answer]) -> list[Job]:
        """The request's runtime job (its images' steps), as soon as the route opens it: kept, so that
        its progress is known even after it closed (a job done within its first renewal)."""
        for _ in range(40):
            found = self.app.state.jobs.find(record.id, record.caller)
            if found or work.done():
                return list(found)
            await asyncio.sleep(0.025)
        return []

    async def _record_progress(self, record: JobRecord, followed: list[Job]) -> None:
        step, steps = _steps_of(followed)
        if steps:
            with contextlib.suppress(Exception):  # progress only: a store that does not answer loses nothing
                await asyncio.to_thread(
                    self.service.store.renew,
                    record.id,
                    self.replica,
                    self.service.settings.job_lease_s,
                    time.time(),
                    step,
                    steps,
                )

    async def _follow(self, record: JobRecord, work: asyncio.Task[Answer], followed: list[Job]) -> str:
        """Renew the lease and record progress until the work is done: "done", "cancelled" (its
        caller asked) or "lost" (the store says another replica owns it, or it was deleted).

        A store that cannot be reached (Redis restarting) decides nothing: the work goes on and the
        next renewal that reaches the store says whether the job is still ours. Had the lease passed
        and another replica claimed the job meanwhile, that renewal says "lost" (and ``finish`` is
        the owner's only, so an answer is never kept twice)."""
        store, settings = self.service.store, self.service.settings
        last_progress = 0.0
        outcome = "done"
        unreachable_since: float | None = None
        while not work.done():
            await asyncio.wait({work}, timeout=RENEW_EVERY_S)
            followed = followed or self.app.state.jobs.find(record.id, record.caller)
            step, steps = _steps_of(followed)
            try:
                owned = await asyncio.to_thread(
                    store.renew, record.id, self.replica, settings.job_lease_s, time.time(), step, steps
                )
                current = (
                    await asyncio.to_thread(store.get, record.caller, record.id)
                    if not owned and outcome == "done"
                    else None
                )
            except Exception as error:
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                    log.warning(
                        "job %s: could not renew its lease (%s); it goes on, renewing again every %g s",
                        record.id,
                        _describe(error),
                        RENEW_EVERY_S,
                    )
                continue
            if unreachable_since is not None:
                log.info(
                    "job %s: the store answers again after %.1f s",
                    record.id,
                    time.monotonic() - unreachable_since,
                )
                unreachable_since = None
            if not owned and outcome == "done":
                outcome = "cancelled" if current is not None and current.cancel_requested else "lost"
                for job in self.app.state.jobs.find(record.id, record.caller):  # out at its next step
                    job.cancel()
                if outcome == "lost":
                    work.cancel()
            if (
                owned
                and "progress" in record.events
                and time.monotonic() - last_progress >= settings.webhook_progress_s
            ):
                last_progress = time.monotonic()
                self._webhook(record, "progress", {"step": step, "steps": steps})
        return outcome

    async def _finish(
        self, record: JobRecord, state: str, answer: Answer | None, error: dict[str, Any] | None
    ) -> None:
        store = self.service.store
        kept = await self._keep(record, state, answer, error)
        if kept is None:
            return  # the store stayed away: the job runs again once its lease has passed
        self.metrics.jobs_finished.labels(state=state).inc()
        log.info("job %s %s%s", record.id, state, "" if kept else " (not kept: another replica owns it now)")
        if kept:
            try:
                finished = await asyncio.to_thread(store.get, record.caller, record.id)
            except Exception as failure:
                log.warning(
                    "job %s: no completed webhook, the store did not answer (%s)",
                    record.id,
                    _describe(failure),
                )
                return
            if finished is not None:
                self._webhook(finished, "completed")

    async def _keep(
        self, record: JobRecord, state: str, answer: Answer | None, error: dict[str, Any] | None
    ) -> bool | None:
        """``store.finish``, tried again while the store cannot be reached (Redis restarting), for
        FINISH_RETRY_S at most: whether the answer was kept, or None when the store never answered."""
        deadline = time.monotonic() + FINISH_RETRY_S
        pause = RENEW_EVERY_S / 2
        while True:
            try:
                kept: bool = await asyncio.to_thread(
                    self.service.store.finish,
                    record.id,
                    self.replica,
                    state=state,
                    now=time.time(),
                    status=answer.status if answer is not None else None,
                    result=answer.body if answer is not None else None,
                    result_type=answer.media_type if answer is not None else None,
                    error=error,
                )
                return kept
            except Exception as failure:
                if time.monotonic() + pause > deadline:
                    log.error(
                        "job %s %s, but the store did not take its answer within %g s (%s); it runs "
                        "again once its lease has passed",
                        record.id,
                        state,
                        FINISH_RETRY_S,
                        _describe(failure),
                    )
                    return None
                log.warning(
                    "job %s %s; the store did not take its answer (%s), trying again",
                    record.id,
                    state,
                    _describe(failure),
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _webhook(self, record: JobRecord, event: str, progress: dict[str, int] | None = None) -> None:
        """Send an event the job asked for, in the background (retries never hold the job)."""
        if record.webhook is None or event not in record.events:
            return
        payload = webhook_payload(record)
        if progress is not None:
            payload["progress"] = progress
            payload["state"] = "running"
        if event == "start":
            payload["state"] = "running"
        task = asyncio.create_task(self.service.deliveries.send(record.webhook, f"job.{event}", payload))
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def _describe(error: BaseException) -> str:
    """An exception in a log line: its type and first line (a store's URL may hold a password, and
    redis' errors name only the host and port)."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _steps_of(followed: list[Job]) -> tuple[int, int]:
    """Steps done and to do over a request's images, from its runtime job (0, 0 before it began)."""
    if not followed or not followed[0].totals:
        return 0, 0
    # an image's step count is its UNet calls, one more than its steps for PNDM's warm-up: capped
    job = followed[0]
    return sum(min(done, total) for done, total in zip(job.steps, job.totals, strict=False)), sum(job.totals)


def _error_of(answer: Answer) -> dict[str, Any]:
    """A failed answer's error as {"code", "message"}, whichever client's shape it came in."""
    try:
        body = json.loads(answer.body)
    except ValueError:
        return {"code": "failed", "message": f"the route answered {answer.status}"}
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):  # ours, OpenAI's
        return {"code": str(error.get("code", "failed")), "message": str(error.get("message", ""))}
    if isinstance(body, dict) and "detail" in body:  # AUTOMATIC1111's
        return {"code": str(body.get("error", "failed")), "message": str(body["detail"])}
    if isinstance(error, str):  # Hugging Face's
        return {"code": str(body.get("error_type", "failed")), "message": error}
    return {"code": "failed", "message": f"the route answered {answer.status}"}
