"""Processing rows: generate a batch with the engine, then write each image and its record.

The building blocks of the runner (service/batch/runner.py), which pipelines them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from model.errors import InvalidRequestError
from model.types import GenerationResult
from service.batch.files.inputs import InputRow
from service.batch.files.records import Record, image_path, record_path
from service.batch.params import JobParams
from service.runtime.batching.oom import generate_splitting_on_oom
from service.runtime.engines import ServingEngine
from service.runtime.images import encode_png
from service.storage import Storage, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` more attempts after the first, waiting ``delay_s`` * 2**n between them."""

    max_retries: int = 2
    delay_s: float = 0.5


@dataclass(frozen=True)
class Outcome:
    """What generation gave for one row: a result, or the error and whether trying again may help."""

    row: InputRow
    result: GenerationResult | None = None
    error: str = ""
    retryable: bool = False


def generate_batch(engine: ServingEngine, rows: Sequence[InputRow], params: JobParams) -> list[Outcome]:
    """Generate one engine batch (all rows valid, one batch key). Never raises for the engine's errors."""
    items = [params.item(r.prompt, r.negative_prompt, _seed(r), engine.info) for r in rows]
    try:
        results = generate_splitting_on_oom(engine, items)
    except InvalidRequestError as error:
        return [Outcome(row, error=f"invalid request: {error}") for row in rows]
    except Exception as error:  # the engine failed for the whole batch; the rows may succeed later
        log.warning("engine failed on a batch of %d: %s", len(rows), error)
        return [Outcome(row, error=f"engine error: {error}", retryable=True) for row in rows]
    return [
        Outcome(row, result=r)
        if isinstance(r, GenerationResult)
        else Outcome(row, error=str(r), retryable=True)
        for row, r in zip(rows, results, strict=True)
    ]


def write_success(
    output: Storage, row: InputRow, result: GenerationResult, attempts: int, retry: RetryPolicy
) -> Record:
    """Encode and write the image, then the record. A write that keeps failing gives a failed record."""
    path = image_path(row.key, row.row)
    png = encode_png(result.image)
    try:
        with_retries(lambda: output.write(path, png), retry, f"writing {path}")
    except StorageError as error:
        return write_failure(output, row, str(error), attempts, retry)
    record = Record(
        input_file=row.file,
        row=row.row,
        prompt=row.prompt,
        negative_prompt=row.negative_prompt,
        seed=result.seed,
        status="ok",
        generated_image=path,
        nsfw_content_detected=result.nsfw_content_detected,
        attempts=attempts,
    )
    return _write_record(output, record, retry)


def write_failure(output: Storage, row: InputRow, error: str, attempts: int, retry: RetryPolicy) -> Record:
    """Record that ``row`` failed; returned even when the record itself cannot be written."""
    record = Record(
        input_file=row.file,
        row=row.row,
        prompt=row.prompt,
        negative_prompt=row.negative_prompt,
        seed=row.seed,
        status="failed",
        error=error,
        attempts=attempts,
    )
    return _write_record(output, record, retry)


def _write_record(output: Storage, record: Record, retry: RetryPolicy) -> Record:
    path = record_path(record.key, record.row)
    data = record.to_json()
    try:
        with_retries(lambda: output.write(path, data), retry, f"writing {path}")
    except StorageError as error:
        # Without a record the row counts as unfinished: the next run generates it again.
        log.error("row %d of %s has no record: %s", record.row, record.input_file, error)
        return dataclasses.replace(
            record,
            status="failed",
            generated_image="",
            nsfw_content_detected=None,
            error=f"{record.error + '; ' if record.error else ''}{error}",
        )
    return record


def with_retries(action: Callable[[], T], retry: RetryPolicy, what: str) -> T:
    """Run ``action``; on StorageError try again up to ``retry.max_retries`` times, backing off."""
    for attempt in range(retry.max_retries + 1):
        try:
            return action()
        except StorageError as error:
            if attempt == retry.max_retries:
                raise
            log.warning(
                "%s failed (attempt %d of %d), retrying: %s", what, attempt + 1, retry.max_retries + 1, error
            )
            time.sleep(retry.delay_s * 2**attempt)
    raise AssertionError("unreachable")


def _seed(row: InputRow) -> int:
    if row.seed is None:
        raise ValueError(f"row {row.row} of {row.file} has no seed: {row.error}")
    return row.seed
