"""Processing rows: generate a batch with the engine, then write each image and its record.

The building blocks of the runner (service/batch/runner.py), which pipelines them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from model.errors import InvalidRequestError
from model.types import BatchKey, GenerationItem, GenerationResult
from service.batch.files.images import picture as row_picture
from service.batch.files.inputs import InputRow
from service.batch.files.records import Record, UnwrittenRecord, image_path, record_path
from service.batch.params import JobParams
from service.images_in import ImageInputError
from service.runtime.batching.oom import generate_isolating_failures
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


def generate_batch(
    engine: ServingEngine, rows: Sequence[InputRow], params: JobParams, images: Storage | None = None
) -> list[Outcome]:
    """Generate one engine batch. Never raises for the engine's errors, and one row's failure
    never fails its neighbours: each row is validated alone first (what the engine refuses, and a
    bad image, fails that row, for good), and a batch that fails anyway is retried row by row.

    A row's image and mask are read here, from their cells (base64, or a path in ``images``, the
    input folder): the images of one batch are in memory, never those of every row. Rows with
    images may differ in size, so the valid rows run as one engine batch per size."""
    # 1. Items and validation, row by row: an invalid row fails alone and is never retried.
    outcomes: dict[int, Outcome] = {}
    valid: list[tuple[int, GenerationItem]] = []
    for index, row in enumerate(rows):
        try:
            picture = row_picture(row.image, row.mask_image, images)
            item = params.item(row.prompt, row.negative_prompt, _seed(row), engine.info, picture)
            engine.validate([item])
        except ImageInputError as error:
            outcomes[index] = Outcome(row, error=str(error))  # "image: ..." or "mask_image: ..."
            continue
        except InvalidRequestError as error:
            outcomes[index] = Outcome(row, error=f"invalid request: {error}")
            continue
        except StorageError as error:  # the store failed, not the row: a later attempt may read it
            log.warning("cannot read the image of row %d of %s: %s", row.row, row.file, error)
            outcomes[index] = Outcome(row, error=f"cannot read the image: {error}", retryable=True)
            continue
        valid.append((index, item))
    # 2. The valid rows together, one batch per batch key (size, steps, scheduler); out of memory
    #    halves, any other failure isolates the culprit.
    groups: dict[BatchKey, list[tuple[int, GenerationItem]]] = {}
    for index, item in valid:
        groups.setdefault(item.batch_key, []).append((index, item))
    for group in groups.values():
        results = generate_isolating_failures(engine, [item for _, item in group])
        for (index, _), result in zip(group, results, strict=True):
            row = rows[index]
            if isinstance(result, GenerationResult):
                outcomes[index] = Outcome(row, result=result)
            elif isinstance(result, InvalidRequestError):
                outcomes[index] = Outcome(row, error=f"invalid request: {result}")
            else:  # the engine failed for this row; it may succeed on a later attempt
                log.warning("engine failed on row %d of %s: %s", row.row, row.file, result)
                outcomes[index] = Outcome(row, error=f"engine error: {result}", retryable=True)
    return [outcomes[index] for index in range(len(rows))]


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
    record = _record_of(row, attempts, "ok", seed=result.seed)
    record = dataclasses.replace(
        record, generated_image=path, nsfw_content_detected=result.nsfw_content_detected
    )
    return _write_record(output, record, retry)


def write_failure(output: Storage, row: InputRow, error: str, attempts: int, retry: RetryPolicy) -> Record:
    """Record that ``row`` failed; returned even when the record itself cannot be written."""
    record = dataclasses.replace(_record_of(row, attempts, "failed", seed=row.seed), error=error)
    return _write_record(output, record, retry)


def _record_of(row: InputRow, attempts: int, status: Literal["ok", "failed"], *, seed: int | None) -> Record:
    """The record of ``row`` without its outcome's details: what the row asked for is copied in one
    place for successes and failures alike, so that both always describe the row the same way."""
    return Record(
        input_file=row.file,
        row=row.row,
        prompt=row.prompt,
        negative_prompt=row.negative_prompt,
        seed=seed,
        status=status,
        attempts=attempts,
    )


def _write_record(output: Storage, record: Record, retry: RetryPolicy) -> Record:
    path = record_path(record.key, record.row)
    data = record.to_json()
    try:
        with_retries(lambda: output.write(path, data), retry, f"writing {path}")
    except StorageError as error:
        # Without a record the row counts as unfinished: the next run generates it again.
        log.error("row %d of %s has no record: %s", record.row, record.input_file, error)
        fields = dataclasses.asdict(record) | {
            "status": "failed",
            "generated_image": "",
            "nsfw_content_detected": None,
            "error": f"{record.error + '; ' if record.error else ''}{error}",
        }
        return UnwrittenRecord(**fields)
    return record


def with_retries(action: Callable[[], T], retry: RetryPolicy, what: str) -> T:
    """Run ``action``; on StorageError try again up to ``retry.max_retries`` times, waiting
    ``retry.delay_s`` * 2**n between attempts (on top of the storage SDK's own retries of each
    request, so that a row outlives a store that is away for longer than those)."""

    def warn(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        attempts = retry.max_retries + 1
        log.warning("%s failed (attempt %d of %d), retrying: %s", what, state.attempt_number, attempts, error)

    retrying = Retrying(
        retry=retry_if_exception_type(StorageError),
        stop=stop_after_attempt(retry.max_retries + 1),
        wait=wait_exponential(multiplier=retry.delay_s, exp_base=2),
        before_sleep=warn,
        reraise=True,  # the last StorageError itself, not tenacity's RetryError
    )
    return retrying(action)


def _seed(row: InputRow) -> int:
    if row.seed is None:
        raise ValueError(f"row {row.row} of {row.file} has no seed: {row.error}")
    return row.seed
