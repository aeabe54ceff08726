"""The pipelined runner: the engine generates batch after batch in this thread while a small
thread pool encodes PNGs and writes images and records, so the device never waits for storage.

Backpressure: at most ``max_pending_writes`` rows may wait for the pool; past that the engine
waits for the oldest write, so a slow store slows the job instead of filling memory.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from service.batch.errors import ErrorThresholdExceeded, threshold_stop
from service.batch.files.inputs import InputRow
from service.batch.files.records import Record, UnwrittenRecord
from service.batch.params import JobParams
from service.batch.plan import JobPlan
from service.batch.process import RetryPolicy, generate_batch, write_failure, write_success
from service.runtime.engines import ServingEngine
from service.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    batch_size: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    error_threshold: int = -1  # failed rows allowed in this run; -1: no limit
    write_workers: int = 4

    @property
    def max_pending_writes(self) -> int:
        return 2 * self.batch_size + self.write_workers


@dataclass
class RunResult:
    """What a run did, in counts: its records are in the output (finalize reads them back), so that
    memory does not grow with the rows."""

    seconds: float
    stopped: str = ""  # why the run ended early; empty when every pending row was attempted
    generated: int = 0  # rows whose image and record were written
    failed: int = 0  # rows that failed (their record says why)
    # Records that storage would not take, by (file key, row): finalize reports them as failed.
    unwritten: dict[tuple[str, int], Record] = field(default_factory=dict)


def run_job(
    engine: ServingEngine,
    plan: JobPlan,
    config: RunConfig,
    on_record: Callable[[Record], None] = lambda record: None,
) -> RunResult:
    """Process every pending row of ``plan``; ``on_record`` sees each record as it is written."""
    return run_rows(engine, plan.pending(), plan.output, plan.params, config, on_record, images=plan.input)


def process_rows(
    engine: ServingEngine,
    rows: Sequence[InputRow],
    output: Storage,
    params: JobParams,
    config: RunConfig,
    images: Storage | None = None,
) -> list[Record]:
    """Generate and write ``rows``; their records in the same order (for schedulers such as Ray Data).
    ``images``: the input folder, where image cells that are paths are read.

    Raises ErrorThresholdExceeded when ``config.error_threshold`` stops the work early.
    """
    records: list[Record] = []
    result = run_rows(engine, rows, output, params, config, on_record=records.append, images=images)
    if result.stopped:
        raise ErrorThresholdExceeded(result.stopped)
    by_row = {(r.input_file, r.row): r for r in records}
    return [by_row[(row.file, row.row)] for row in rows]


def run_rows(
    engine: ServingEngine,
    rows: Iterable[InputRow],
    output: Storage,
    params: JobParams,
    config: RunConfig,
    on_record: Callable[[Record], None] = lambda record: None,
    images: Storage | None = None,
) -> RunResult:
    """Generate ``rows`` in engine batches while a pool writes finished ones (the pipelined loop).
    ``images`` is the input folder, where image cells that are paths are read (None: such a cell
    fails its row).

    ``rows`` is consumed as it goes, one engine batch ahead at most: a job's rows are never all
    in memory (``JobPlan.pending()`` reads them from the input files as they are needed)."""
    started = time.perf_counter()
    run = _Run(config, on_record)
    source = iter(rows)
    with ThreadPoolExecutor(max_workers=config.write_workers, thread_name_prefix="batch-write") as pool:
        run.pool = pool
        try:
            # Rows that failed but have attempts left go round again, first, in their order.
            queue: deque[tuple[InputRow, int]] = deque()
            while not run.stopped:
                # 1) fill one engine batch; rows that cannot run become failed records, no engine
                while len(queue) < config.batch_size and (row := next(source, None)) is not None:
                    if row.error:
                        run.submit(write_failure, output, row, row.error, 0, config.retry)
                    else:
                        queue.append((row, 1))
                if not queue or run.stopped:
                    break
                # 2) generate it; each row is written, retried or failed
                batch = [queue.popleft() for _ in range(min(config.batch_size, len(queue)))]
                outcomes = generate_batch(engine, [row for row, _ in batch], params, images)
                again: list[tuple[InputRow, int]] = []
                for (row, attempts), outcome in zip(batch, outcomes, strict=True):
                    if outcome.result is not None:
                        run.submit(write_success, output, row, outcome.result, attempts, config.retry)
                    elif outcome.retryable and attempts <= config.retry.max_retries:
                        again.append((row, attempts + 1))
                    else:
                        run.submit(write_failure, output, row, outcome.error, attempts, config.retry)
                queue.extendleft(reversed(again))
                run.collect(block=False)
        except KeyboardInterrupt:
            run.stop("interrupted")
        # 3) every submitted write finishes, even when stopping: those rows are done
        run.collect(block=True)
    seconds = time.perf_counter() - started
    return RunResult(seconds, run.stopped, run.generated, run.failed, run.unwritten)


class _Run:
    """Book-keeping of one run: outstanding writes, records, the error threshold."""

    def __init__(self, config: RunConfig, on_record: Callable[[Record], None]) -> None:
        self.config, self.on_record = config, on_record
        self.pool: ThreadPoolExecutor | None = None
        self.writes: deque[Future[Record]] = deque()
        self.generated, self.failed = 0, 0
        self.unwritten: dict[tuple[str, int], Record] = {}
        self.stopped = ""

    def submit(self, fn: Callable[..., Record], *args: object) -> None:
        assert self.pool is not None
        self.writes.append(self.pool.submit(fn, *args))
        while len(self.writes) > self.config.max_pending_writes:
            self._take(self.writes.popleft())

    def collect(self, block: bool) -> None:
        while self.writes and (block or self.writes[0].done()):
            self._take(self.writes.popleft())

    def stop(self, reason: str) -> None:
        if not self.stopped:
            self.stopped = reason
            log.error("stopping: %s", reason)

    def _take(self, future: Future[Record]) -> None:
        record = future.result()
        self.on_record(record)
        if isinstance(record, UnwrittenRecord):
            self.unwritten[(record.key, record.row)] = record
        if record.ok:
            self.generated += 1
        else:
            self.failed += 1
            reason = threshold_stop(
                self.failed, self.config.error_threshold, record.error, len(self.unwritten)
            )
            if reason:
                self.stop(reason)
