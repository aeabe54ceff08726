"""Finalizing a job: predictions.csv, predictions-detailed.csv and summary.json, rebuilt from
every record in the output.

Rebuilding (instead of appending) is what keeps the output exactly-once: whatever runs came
before, each row appears once, and a run killed while finalizing is repaired by the next one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from service.batch.files.inputs import SkippedFile
from service.batch.files.records import (
    DETAILED_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    Record,
    detailed_csv,
    in_order,
    parse_record_path,
    predictions_csv,
)
from service.batch.plan import discard_partial_writes, list_records
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
    this run's result (its records need not be read back); ``skipped``: rows an earlier
    run had finished; ``skipped_files``: input files that are not prompt files. Raises StorageError
    when the output cannot be listed or written.
    """
    # 1) every record: this run's from memory, earlier ones from the output
    records = collect_records(output, run.records if run else [])
    ordered = in_order(records.values())
    # 2) the tables, in input order
    output.write(PREDICTIONS_FILE, predictions_csv(ordered))
    output.write(DETAILED_FILE, detailed_csv(ordered, parameters))
    # 3) the counts
    total = sum(counts.values())
    mine = [record for record in ordered if record.row < counts.get(record.key, 0)]
    failed = [record for record in mine if not record.ok]
    generated = run.generated if run else 0
    seconds = run.seconds if run else 0.0
    summary: dict[str, Any] = {
        "total": total,
        "done": len(mine) - len(failed),
        "flagged": sum(1 for r in mine if r.flagged),
        "failed": len(failed),
        "skipped": skipped,
        "missing": total - len(mine),
        "generated": generated,
        "seconds": round(seconds, 3),
        "images_per_s": round(generated / seconds, 4) if seconds > 0 else 0.0,
        "complete": len(mine) == total,
        "stopped": (run.stopped or None) if run else None,
        "model": model,
        "parameters": parameters,
        "failed_rows": [
            {"input_csv_name": r.input_file, "row_number_per_file": r.row, "error": r.error}
            for r in failed[:LISTED]
        ],
        "skipped_files": [{"path": f.path, "reason": f.reason} for f in skipped_files[:LISTED]],
        "skipped_files_count": len(skipped_files),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    output.write(SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False).encode("utf-8"))
    # 4) temporary files of a writer killed while this run went on (one job, one writer at a time:
    #    every write of this run has finished by now)
    discard_partial_writes(output)
    return summary


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


def collect_records(
    output: Storage, known: Sequence[Record] = (), *, keys: Iterable[str] | None = None
) -> dict[tuple[str, int], Record]:
    """Every record in ``output`` (of the files ``keys`` only, when given) keyed by (file key, row).

    ``known`` records (this run's, in memory) are not read again.
    """
    started = time.perf_counter()
    records = {(r.key, r.row): r for r in known}
    paths = {path: where for path in list_records(output, keys) if (where := parse_record_path(path))}
    unread = [path for path, where in paths.items() if where not in records]
    for path, data in output.read_many(unread).items():
        if isinstance(data, StorageError):
            raise data
        try:
            record = Record.from_json(data)
        except ValueError as error:
            # Only a crash of the machine (not of the process) can leave one; --retry-failed redoes it.
            log.warning("ignoring damaged record %s: %s", output.describe(path), error)
            continue
        records[paths[path]] = record
    log.debug(
        "collected %d records (%d read) in %.1f s", len(records), len(unread), time.perf_counter() - started
    )
    return records
