"""Planning a job: the inputs, the output, and which rows are already finished.

Everything here runs before the model is loaded, so that every mistake in the input, the output
or the parameters is reported before any GPU work. Every input file is read and parsed, one at a
time, to check it and count its rows (exact progress); no row is kept. Running reads the files
again, one at a time, and refuses one whose bytes changed since.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.batch.errors import BatchConfigError
from service.batch.files.finished import FinishedRows
from service.batch.files.identity import OnChange, check_input, start_over
from service.batch.files.inputs import (
    MAX_PROMPT_CHARS,
    FileIdentity,
    InputRow,
    ScannedFile,
    SkippedFile,
    iter_rows,
    open_inputs,
    scan_inputs,
)
from service.batch.files.records import IMAGES_DIR, JOB_FILE, RECORDS_DIR, Record, chunked, parse_record_path
from service.batch.params import JobParams
from service.runtime.items import random_seed, seed_in_range
from service.storage import Storage, StorageError, StorageOptions, open_storage

log = logging.getLogger(__name__)
READ_CHUNK = 256  # records read at once (concurrently on blob stores) when they are read back
# Parameters that job.json files written before them lack; there they are None (the default)
ADDED_PARAMETERS = ("strength",)


@dataclass
class JobPlan:
    """A job's work. It holds no rows: ``rows()`` reads the input files again, one at a time, as
    the rows are consumed, so that memory depends on one file and the engine batch, not on the
    number of rows; ``files`` holds each file's row count and identity."""

    input: Storage
    output: Storage
    files: list[ScannedFile]
    finished: FinishedRows  # (file key, row) of rows that have a record, one bit each
    params: JobParams  # with the job seed resolved (``--seed``, job.json's, or a new one)
    skipped_files: list[SkippedFile] = field(default_factory=list)  # input files that are not prompts
    max_prompt_chars: int = MAX_PROMPT_CHARS

    @property
    def counts(self) -> dict[str, int]:
        """Rows per file key: the rows of this job are those numbered below their file's count."""
        return {item.file.key: item.rows for item in self.files}

    @property
    def total(self) -> int:
        return sum(item.rows for item in self.files)

    @property
    def skipped(self) -> int:
        """Rows finished by an earlier run of this job."""
        return sum(self.finished.count_below(key, rows) for key, rows in self.counts.items())

    @property
    def pending_count(self) -> int:
        return self.total - self.skipped

    def rows(self) -> Iterator[InputRow]:
        """Every row of the job, in input order, read again from the input files."""
        return iter_rows(self.input, self.files, self.params.seed, self.max_prompt_chars)

    def pending(self) -> Iterator[InputRow]:
        """The rows no earlier run finished, in input order."""
        return (row for row in self.rows() if (row.key, row.row) not in self.finished)


def plan_job(
    input_uri: str,
    output_uri: str,
    params: JobParams,
    *,
    options: StorageOptions | None = None,
    max_steps: int = 150,
    retry_failed: bool = False,
    max_prompt_chars: int = MAX_PROMPT_CHARS,
    on_change: OnChange = "refuse",
) -> JobPlan:
    """Check everything and find the work left. Raises BatchConfigError with a one-line reason.

    ``on_change``: what to do when the output holds a job of another input or other parameters
    (files/identity.py): refuse, ``continue`` (inputs only) or ``start-over``."""
    # 1) parameters
    params.check(max_steps)
    # 2) inputs: the prompt files (every other file is reported)
    inputs = open_inputs(input_uri, options)
    # 3) output: not inside the input, not holding another job; the job seed
    try:
        output = open_storage(output_uri, options)
    except StorageError as error:
        raise BatchConfigError(f"cannot use the output: {error}") from error
    folder = inputs.storage
    same_kind = type(output.fs) is type(folder.fs)
    inside = same_kind and (output.root == folder.root or output.root.startswith(folder.root + "/"))
    if inside and not inputs.single_file:
        raise BatchConfigError(
            f"the output {output.uri} is inside the input {folder.uri}; its files would be read as "
            "inputs next time: choose an output elsewhere"
        )
    if on_change == "start-over":
        try:
            log.info("starting over: removed %d result file(s) of the earlier job", start_over(output))
        except StorageError as error:
            raise BatchConfigError(f"cannot start over in the output: {error}") from error
    params = resolve_job(output, params)
    # 4) every row of every file (each CSV with a prompt column); the output must have been made
    #    from these files (or be new); then job.json, which proves the output can be written
    scanned = scan_inputs(folder, inputs.files, params.seed, max_prompt_chars)
    identities = [item.identity for item in scanned]
    try:
        check_input(output, _read_job(output), identities, on_change)
    except StorageError as error:
        raise BatchConfigError(f"cannot read the output: {error}") from error
    write_job(output, params, identities)
    # 5) what earlier runs finished
    finished = find_finished(output, retry_failed=retry_failed)
    plan = JobPlan(folder, output, scanned, finished, params, inputs.skipped, max_prompt_chars)
    log.info(
        "%d input file(s), %d row(s), %d already finished, job seed %s",
        len(plan.files), plan.total, plan.skipped, params.seed,
    )  # fmt: skip
    return plan


def prepare_output(output: Storage, params: JobParams, new_seed: int | None = None) -> JobParams:
    """``resolve_job`` then ``write_job``: the job's parameters, with its seed, recorded in the output."""
    params = resolve_job(output, params, new_seed)
    write_job(output, params)
    return params


def resolve_job(output: Storage, params: JobParams, new_seed: int | None = None) -> JobParams:
    """The job's parameters with its seed: ``params.seed`` when given, else the seed that job.json
    holds (a resume), else ``new_seed`` (default: a random one). Refuses an output that holds a job
    with other parameters, or another seed than the one given."""
    try:
        job = _read_job(output)
        theirs = None if job is None else job["parameters"]
    except StorageError as error:
        raise BatchConfigError(
            f"cannot read the output: {error}; check the path, its permissions or the credentials"
        ) from error
    if theirs is None:
        seed = params.seed if params.seed is not None else (random_seed() if new_seed is None else new_seed)
        return dataclasses.replace(params, seed=seed)
    # a parameter added since the job started (strength) is its default there
    theirs = {**{name: None for name in ADDED_PARAMETERS}, **theirs}
    mine = params.as_dict()
    if params.seed is None:
        mine["seed"] = theirs.get("seed")  # None for jobs started before job seeds were kept
        if mine["seed"] is not None and not seed_in_range(mine["seed"]):
            raise BatchConfigError(
                f"{output.describe(JOB_FILE)} is damaged (seed {json.dumps(mine['seed'])} is not a "
                "seed); remove it or choose a new output"
            )
    if theirs != mine:
        differences = ", ".join(
            f"{name} {json.dumps(theirs.get(name))} there, {json.dumps(mine.get(name))} here"
            for name in sorted(set(theirs) | set(mine))
            if theirs.get(name) != mine.get(name)
        )
        hint = (
            f"; omit --seed (or give --seed {theirs.get('seed')}) to resume it"
            if theirs.get("seed") != mine.get("seed") and params.seed is not None
            else ""
        )
        raise BatchConfigError(
            f"{output.describe(JOB_FILE)} holds a job with other parameters ({differences}){hint}; "
            "resume it with the same parameters, run with --start-over to discard its results, or "
            "choose a new output"
        )
    return dataclasses.replace(params, seed=mine["seed"])


def write_job(output: Storage, params: JobParams, inputs: Sequence[FileIdentity] | None = None) -> None:
    """Write job.json (which proves that the output can be written) and remove the temporary files
    a killed run left. ``inputs``: what each input file was, when the job knows all of them."""
    job: dict[str, Any] = {"parameters": params.as_dict()}
    if inputs is not None:
        job["inputs"] = [identity.as_dict() for identity in inputs]
    try:
        output.write(JOB_FILE, json.dumps(job, indent=2, ensure_ascii=False).encode("utf-8"))
        removed = discard_partial_writes(output)
    except StorageError as error:
        raise BatchConfigError(
            f"cannot write to the output: {error}; check the path, its permissions or the credentials"
        ) from error
    if removed:
        log.info("removed %d unfinished temporary file(s) of an interrupted run", removed)


def discard_partial_writes(output: Storage) -> int:
    """Remove the temporary files of local writes that a killed writer left; they were never results.

    Below images/ and records/, and at the output's root, where a run killed while finalizing
    leaves those of the predictions file and summary.json (the root's other folders are not ours).
    """
    return (
        output.discard_partial_writes(IMAGES_DIR)
        + output.discard_partial_writes(RECORDS_DIR)
        + output.discard_partial_writes("", recursive=False)
    )


def _read_job(output: Storage) -> dict[str, Any] | None:
    """job.json, with its parameters object; None when there is none yet."""
    if not output.exists(JOB_FILE):
        return None
    try:
        job = json.loads(output.read(JOB_FILE))
        if not isinstance(job, dict) or not isinstance(job.get("parameters"), dict):
            raise ValueError("it has no parameters object")
    except (ValueError, RecursionError) as error:
        raise BatchConfigError(
            f"{output.describe(JOB_FILE)} is damaged ({error}); remove it or choose a new output"
        ) from error
    return job


def find_finished(
    output: Storage, *, keys: Iterable[str] | None = None, retry_failed: bool = False
) -> FinishedRows:
    """``scan_finished``, with a storage error as BatchConfigError (planning's one-line refusal)."""
    try:
        return scan_finished(output, keys=keys, retry_failed=retry_failed)
    except StorageError as error:
        raise BatchConfigError(f"cannot list the finished rows: {error}") from error


def scan_finished(
    output: Storage, *, keys: Iterable[str] | None = None, retry_failed: bool = False
) -> FinishedRows:
    """(file key, row) of every row with a record (of the files ``keys`` only, when given).

    With ``retry_failed``, rows whose record says failed count as unfinished. The listing is
    read a page at a time and the records (with ``retry_failed``) a chunk at a time: memory is
    one bit per row. Raises StorageError.
    """
    finished = FinishedRows()
    located = ((path, where) for path in iter_records(output, keys) if (where := parse_record_path(path)))
    for chunk in chunked(located, READ_CHUNK):
        for _, where in chunk:
            finished.add(*where)
        if retry_failed:
            _discard_failed(output, chunk, finished)
    return finished


def _discard_failed(
    output: Storage, chunk: list[tuple[str, tuple[str, int]]], finished: FinishedRows
) -> None:
    """Rows of ``chunk`` whose record says failed (or cannot be read) count as unfinished."""
    where = dict(chunk)
    for path, data in output.read_many(where).items():
        if isinstance(data, StorageError) or not _is_ok(data):
            finished.discard(*where[path])


def iter_records(output: Storage, keys: Iterable[str] | None = None) -> Iterator[str]:
    """Paths of the records in ``output`` (all, or those of the files ``keys``), unsorted, a
    listing page at a time."""
    if keys is None:
        yield from output.iter_list(RECORDS_DIR)
        return
    wanted = set(keys)
    for key in sorted(wanted):
        # records/<key>/ holds those of key/sub too: each path is checked against its own key
        for path in output.iter_list(f"{RECORDS_DIR}/{key}"):
            where = parse_record_path(path)
            if where is not None and where[0] == key:
                yield path


def _is_ok(data: bytes) -> bool:
    try:
        return Record.from_json(data).ok
    except ValueError:
        return False
