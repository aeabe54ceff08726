"""Jobs at start-up and shutdown: the store opened (SQLite under SD_DATA_DIR, or Redis), the webhook
policy read, and the runner started; a store that cannot be opened leaves the server serving
requests, with the jobs routes answering 503 that say why."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from fastapi import FastAPI

from service.jobstore import open_store
from service.jobstore.webhooks import Deliveries
from service.runtime.lifecycle import Lifecycle
from service.runtime.metrics import Metrics
from service.settings import Settings
from service.web.jobs.runner import Runner
from service.web.jobs.service import JobService, webhook_policy

log = logging.getLogger(__name__)


@dataclass
class DurableJobs:
    service: JobService | None = None
    runner: Runner | None = None

    async def open(self, app: FastAPI, settings: Settings, lifecycle: Lifecycle, metrics: Metrics) -> None:
        app.state.job_service = None
        app.state.job_service_problem = (
            "this server keeps no jobs (SD_JOB_STORE=off); send the request itself"
        )
        if settings.job_store == "off":
            return
        try:
            policy = webhook_policy(settings)
            store = await asyncio.to_thread(open_store, settings.job_store, settings.jobs_folder)
        except Exception as error:  # a bad secret, an unreachable Redis, an unwritable folder
            problem = " ".join(str(error).split())[:300] or type(error).__name__
            log.error("jobs are unavailable: %s", problem)
            app.state.job_service_problem = (
                f"the job store could not be opened ({problem}); check SD_JOB_STORE, SD_DATA_DIR and "
                "SD_WEBHOOK_SECRET, and restart"
            )
            return
        deliveries = Deliveries(
            policy, on_attempt=lambda event, outcome: metrics.webhook_deliveries.labels(event, outcome).inc()
        )
        self.service = JobService(settings, store, deliveries, policy)
        app.state.job_service = self.service
        self.runner = Runner(app, self.service, lifecycle, metrics)
        self.runner.start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.stop()
        if self.service is not None:
            await self.service.close()
