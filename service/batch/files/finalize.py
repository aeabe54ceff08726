"""Finalizing a job: predictions.csv, predictions-detailed.csv and summary.json, rebuilt from
every record in the output.

Rebuilding (instead of appending) is what keeps the output exactly-once: whatever runs came
before, each row appears once, and a run killed while finalizing is repaired by the next one.

Both tables are streamed: the records are listed a page at a time into one bit per row, then read
back a chunk at a time in input order, each chunk's lines written to both files as they come
(Storage.writing: committed whole at the end). Memory is a chunk of records and one upload block
per file, whatever the number of rows.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from service.batch.files.finished import FinishedRows
from service.batch.files.inputs import SkippedFile
from service.batch.files.records import (
    DETAILED_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    Record,
    chunked,
    csv_line,
    detailed_header,
    detailed_line,
    parameter_cells,
    parse_record_path,
    record_path,
)
from service.batch.plan import READ_CHUNK, discard_partial_writes, iter_records, scan_finished
from service.storage import Storage, StorageError

if TYPE_CHECKING:
    from service.batch.runner import RunResult  # imports the engine's types, hence torch

log = logging.getLogger(__name__)
LISTED = 100  # failed rows and skipped files named in summary.json; predictions-detailed.csv has every row


def finalize(
    output: Storage,
    counts: Mapping[str, int],
    *,
    model: str,
    parameters: dict[str, Any],
    run: RunResult | None = None,
    skipped: int = 0,
    skipped_files: Sequence[SkippedFile] = (),
) -> dict[str, Any]:
    """Write predictions.csv, predictions-detailed.csv and summary.json (each atomically) and return
    the summary.

    ``counts``: rows per input file key (the job's rows are those numbered below it); ``run``:
    this run's result (its records that storage would not take are reported from memory);
    ``skipped``: rows an earlier run had finished; ``skipped_files``: input files that are not
    prompt files. Raises StorageError when the output cannot be listed, read or written.
    """
    # 1) which rows have a record (one bit each); the run's unwritten records count as such
    unwritten = run.unwritten if run else {}
    finished = scan_finished(output)
    for key, row in unwritten:
        finished.add(key, row)
    # 2) both tables, in input order, written as the records are read back; the counts on the way
    tally = _Tally(counts)
    shared = parameter_cells(parameters)
    with output.writing(PREDICTIONS_FILE) as predictions, output.writing(DETAILED_FILE) as detailed:
        detailed.write(f"{detailed_header()}\n".encode())
        for chunk in chunked(records_in_order(output, finished, unwritten), READ_CHUNK):
            ok = [record for record in chunk if record.ok]
            predictions.write("".join(f"{csv_line(r.prediction_row())}\n" for r in ok).encode("utf-8"))
            detailed.write("".join(f"{detailed_line(r, shared)}\n" for r in chunk).encode("utf-8"))
            for record in chunk:
                tally.add(record)
    # 3) the counts
    total = sum(counts.values())
    generated = run.generated if run else 0
    seconds = run.seconds if run else 0.0
    summary: dict[str, Any] = {
        "total": total,
        "done": tally.mine - tally.failed,
        "flagged": tally.flagged,
        "failed": tally.failed,
        "skipped": skipped,
        "missing": total - tally.mine,
        "generated": generated,
        "seconds": round(seconds, 3),
        "images_per_s": round(generated / seconds, 4) if seconds > 0 else 0.0,
        "complete": tally.mine == total,
        "stopped": (run.stopped or None) if run else None,
        "model": model,
        "parameters": parameters,
        "failed_rows": tally.failed_rows,
        "skipped_files": [{"path": f.path, "reason": f.reason} for f in skipped_files[:LISTED]],
        "skipped_files_count": len(skipped_files),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    output.write(SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False).encode("utf-8"))
    # 4) temporary files of a writer killed while this run went on (one job, one writer at a time:
    #    every write of this run has finished by now)
    discard_partial_writes(output)
    return summary


class _Tally:
    """The summary's counts over the job's records (those numbered below their file's count)."""

    def __init__(self, counts: Mapping[str, int]) -> None:
        self.counts = counts
        self.mine = self.failed = self.flagged = 0
        self.failed_rows: list[dict[str, Any]] = []  # the first LISTED

    def add(self, record: Record) -> None:
        if record.row >= self.counts.get(record.key, 0):
            return
        self.mine += 1
        self.flagged += record.flagged
        if not record.ok:
            self.failed += 1
            if len(self.failed_rows) < LISTED:
                where = {"input_csv_name": record.input_file, "row_number_per_file": record.row}
                self.failed_rows.append({**where, "error": record.error})


def records_in_order(
    output: Storage, finished: FinishedRows, known: Mapping[tuple[str, int], Record] | None = None
) -> Iterator[Record]:
    """The records of ``finished`` rows, by input file then row number (the order of both tables),
    read back a chunk at a time; ``known`` records (by file key and row) are not read. A damaged
    record is left out with a warning."""
    known = known or {}
    # 1) the files in order of their names: a key's first record names its input file
    keys = finished.keys()
    names: dict[str, str] = {}
    for chunk in chunked(keys, READ_CHUNK):
        for record in _read(output, [(key, next(finished.rows(key))) for key in chunk], known):
            names[record.key] = record.input_file
    # 2) each file's rows, ascending
    for key in sorted(keys, key=lambda k: (names.get(k, k), k)):
        for rows in chunked(finished.rows(key), READ_CHUNK):
            yield from _read(output, [(key, row) for row in rows], known)


def _read(
    output: Storage, rows: Sequence[tuple[str, int]], known: Mapping[tuple[str, int], Record]
) -> Iterator[Record]:
    """The records of ``rows``, in that order (StorageError when one cannot be read)."""
    found = output.read_many(record_path(*where) for where in rows if where not in known)
    for where in rows:
        if where in known:
            yield known[where]
            continue
        path = record_path(*where)
        data = found[path]
        if isinstance(data, StorageError):
            raise data
        try:
            yield Record.from_json(data)
        except ValueError as error:
            # Only a crash of the machine (not of the process) can leave one; --retry-failed redoes it.
            log.warning("ignoring damaged record %s: %s", output.describe(path), error)


def last_model(output: Storage) -> tuple[str, dict[str, Any]] | None:
    """The model and resolved parameters in summary.json, for a run that generates nothing; None
    when there is no readable summary."""
    try:
        summary = json.loads(output.read(SUMMARY_FILE))
        model, parameters = summary["model"], summary["parameters"]
    except (StorageError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(model, str) or not isinstance(parameters, dict):
        return None
    return model, parameters


def collect_records(output: Storage, *, keys: Iterable[str] | None = None) -> dict[tuple[str, int], Record]:
    """Every record in ``output`` (of the files ``keys`` only, when given) keyed by (file key, row):
    for a few files (an Azure ML mini-batch); a whole job goes through ``records_in_order``."""
    started = time.perf_counter()
    paths = {path: where for path in iter_records(output, keys) if (where := parse_record_path(path))}
    records = {(r.key, r.row): r for r in _read(output, list(paths.values()), {})}
    log.debug("collected %d records in %.1f s", len(records), time.perf_counter() - started)
    return records
