"""A job's identity: what its output was made from, so that a run never resumes another job.

job.json keeps each input file's path, size and SHA-256 next to the parameters. A run whose input
differs (a file changed, added or gone) is refused, since the output's records would otherwise
count as rows of the new input that were never drawn from it. The user may instead ask to:
- ``continue``: keep the rows of unchanged files; the results of files that changed or are gone
  are removed (records first, so that a run killed half-way still sees those rows unfinished), and
  changed and new files are generated;
- ``start-over``: remove every result of this output (records, images, predictions, summary and
  job.json last) and start anew.
Only files of this project's own layout are ever removed.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from service.batch.errors import BatchConfigError
from service.batch.files.inputs import FileIdentity
from service.batch.files.records import (
    DETAILED_FILE,
    IMAGES_DIR,
    JOB_FILE,
    PREDICTIONS_FILE,
    RECORDS_DIR,
    SUMMARY_FILE,
    chunked,
    file_key,
    parse_record_path,
)
from service.storage import Storage

OnChange = Literal["refuse", "continue", "start-over"]
NAMED = 5  # changed files named in the refusal
_IMAGE = re.compile(r"\d+\.png")
HOW = (
    "run with --continue to keep the rows of unchanged files and generate the rest anew, or with "
    "--start-over to discard this output's results, or choose a new output"
)


def input_changes(theirs: Any, mine: Sequence[FileIdentity]) -> list[str]:
    """How the input differs from the one job.json records: 'a.csv changed', 'b.csv new'..."""
    recorded: dict[str, tuple[Any, Any]] = {}
    for entry in theirs if isinstance(theirs, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            recorded[entry["path"]] = (entry.get("size"), entry.get("sha256"))
    now = {file.path: (file.size, file.sha256) for file in mine}
    changes = [f"{path} changed" for path in sorted(now) if path in recorded and recorded[path] != now[path]]
    changes += [f"{path} new" for path in sorted(set(now) - set(recorded))]
    changes += [f"{path} gone" for path in sorted(set(recorded) - set(now))]
    return changes


def check_input(
    output: Storage, job: dict[str, Any] | None, mine: Sequence[FileIdentity], on_change: OnChange
) -> None:
    """Refuse (BatchConfigError) an output made from another input, unless ``on_change`` says
    ``continue``: then remove the results of files that changed or are gone. ``job`` is job.json's
    content (None: there is none)."""
    # 1) what differs
    if job is None:
        if next(output.iter_list(RECORDS_DIR), None) is None:
            return  # a new output
        problem, changes = "holds results but no job.json saying what they were made from", None
    elif "inputs" not in job:
        problem, changes = "records no inputs (it was written by an earlier version)", None
    else:
        changes = input_changes(job["inputs"], mine)
        if not changes:
            return
        more = f", and {len(changes) - NAMED} more" if len(changes) > NAMED else ""
        problem = f"was made from another input ({', '.join(changes[:NAMED])}{more})"
    if on_change != "continue":
        raise BatchConfigError(f"the output {output.uri} {problem}: {HOW}")
    # 2) --continue: the results of changed and gone files go; unchanged ones stay finished
    stale = {change.rpartition(" ")[0] for change in changes or [] if not change.endswith(" new")}
    remove_results(output, {file_key(path) for path in stale})


def remove_results(output: Storage, keys: set[str] | None = None) -> int:
    """Remove the records and then the images of the files ``keys`` (all, when None); how many.
    Listed and removed a page at a time, so that memory does not grow with the rows."""
    records = (
        path
        for path in output.iter_list(RECORDS_DIR)
        if (where := parse_record_path(path)) and (keys is None or where[0] in keys)
    )
    images = (
        path
        for path in output.iter_list(IMAGES_DIR)
        if _IMAGE.fullmatch(posixpath.basename(path))
        and (keys is None or posixpath.dirname(path)[len(IMAGES_DIR) + 1 :] in keys)
    )
    return _remove_in_chunks(output, records) + _remove_in_chunks(output, images)


def _remove_in_chunks(output: Storage, paths: Iterable[str], chunk: int = 1000) -> int:
    removed = 0
    for batch in chunked(paths, chunk):
        output.remove(batch)
        removed += len(batch)
    return removed


def start_over(output: Storage) -> int:
    """Remove every result of the job in ``output``; job.json last, so that a run killed half-way
    is still refused next time rather than taken for a new job."""
    removed = remove_results(output)
    output.remove([PREDICTIONS_FILE, DETAILED_FILE, SUMMARY_FILE, JOB_FILE])
    return removed
