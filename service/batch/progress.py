"""Progress of a job: a tqdm bar (images/s, ETA) on a terminal, a log line now and then otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from service.batch.files.records import Record

log = logging.getLogger(__name__)


class Progress:
    """Counts records as they are written; ``close()`` when the run ends."""

    def __init__(self, total: int, *, stream: TextIO | None = None, log_interval_s: float = 30.0) -> None:
        stream = stream or sys.stderr
        self.total, self.done, self.failed = total, 0, 0
        self.started = time.monotonic()
        self.log_interval_s = log_interval_s
        self.next_log = self.started + log_interval_s
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", file=stream, dynamic_ncols=True, smoothing=0.1)

    def __call__(self, record: Record) -> None:
        self.done += 1
        self.failed += 0 if record.ok else 1
        if self.bar is not None:
            self.bar.update(1)
            if not record.ok:
                self.bar.set_postfix(failed=self.failed, refresh=False)
            return
        now = time.monotonic()
        if now >= self.next_log or self.done == self.total:
            self.next_log = now + self.log_interval_s
            self._log_line(now)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _log_line(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done
        eta = f"{left / rate:.0f} s" if rate > 0 else "unknown"
        log.info(
            "%d/%d rows (%d failed), %.2f images/s, ETA %s", self.done, self.total, self.failed, rate, eta
        )
