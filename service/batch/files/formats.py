"""The formats of prompt files, and what each row of them holds.

Every parser turns one file's bytes into one mapping per row, with the keys ``prompt`` and, when
the file has them, ``negative_prompt``, ``seed``, ``image`` and ``mask_image`` (inputs.py checks
the values row by row; an image cell holds base64 or a path in the input folder: images.py):

- ``.csv``: a header with a ``prompt`` column, in any position; ``negative_prompt``, ``seed``,
  ``image`` and ``mask_image`` are optional; other columns (such as the unnamed index column
  pandas writes) are ignored.
- ``.jsonl``: one JSON object per line with the same keys; blank lines are not rows.
- ``.parquet`` / ``.pqt``: a table with a ``prompt`` column (and the same optional ones).
- ``.txt``: one prompt a line; blank lines are not rows.

A file that cannot be read as its format at all (no ``prompt`` column, one of the columns above
twice, not Parquet)
raises BatchConfigError: the job stops before it starts. A row that is wrong is the row's problem.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterator
from typing import Any

from service.batch.errors import BatchConfigError

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet", ".pqt": "parquet", ".txt": "txt"}
ROW_KEYS = ("prompt", "negative_prompt", "seed", "image", "mask_image")
# The rows of one job, all input files together: a job's rows are planned in memory (about 1 kB
# each), so this bounds what planning can take whatever the files claim.
MAX_JOB_ROWS = 1_000_000
PARQUET_BATCH_ROWS = 65_536
SUFFIX_LIST = ".csv, .jsonl, .parquet, .pqt or .txt"


def file_format(path: str) -> str | None:
    """The format of a file by its suffix (case-insensitive); None for anything else."""
    return FORMATS.get(posixpath.splitext(path)[1].lower())


def parse_records(
    fmt: str, data: bytes, source: str, max_rows: int = MAX_JOB_ROWS
) -> Iterator[dict[str, Any]]:
    """The rows of one file's bytes, one by one; ``source`` names the file in errors. More than
    ``max_rows`` rows is a BatchConfigError, raised before the rows past it are made (for Parquet, before any:
    its footer holds the count), so that memory stays bounded whatever the file claims."""
    records: Iterator[dict[str, Any]]
    if fmt == "parquet":
        records = _parquet_records(data, source, max_rows)
    else:
        records = {"csv": _csv_records, "jsonl": _jsonl_records}.get(fmt, _txt_records)(data, source)
    for count, record in enumerate(records):
        if count == max_rows:
            raise too_many_rows(source)
        yield record


def too_many_rows(source: str) -> BatchConfigError:
    return BatchConfigError(
        f"{source} takes the job past {MAX_JOB_ROWS:,} rows (all files together), the most one job "
        "holds; split the input into several jobs"
    )


def _text(data: bytes, newline: str | None) -> io.TextIOWrapper:
    """The file's text, decoded as it is read (never a second copy of the whole file). -sig: Excel
    starts its CSV files with a byte-order mark. Bytes that are not UTF-8 become lone surrogates,
    which fail the rows that hold them (inputs.py), not the whole file."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _missing_prompt(source: str, header: list[str]) -> BatchConfigError:
    found = ", ".join(repr(name) for name in header[:20]) or "no header"
    more = f" and {len(header) - 20} more" if len(header) > 20 else ""
    return BatchConfigError(f"{source} has no 'prompt' column (found {found}{more}); add a prompt column")


def _check_header(source: str, header: list[str]) -> None:
    """A ``prompt`` column, and each column this project reads at most once (which of two would
    be meant cannot be known)."""
    if "prompt" not in header:
        raise _missing_prompt(source, header)
    for key in ROW_KEYS:
        if header.count(key) > 1:
            raise BatchConfigError(f"{source} has {header.count(key)} {key!r} columns; keep one")


def _csv_records(data: bytes, source: str) -> Iterator[dict[str, Any]]:
    # No field can be longer than the file: the csv module's own limit (131,072 characters) would
    # end the whole file at one long cell, whereas an over-long prompt is that row's problem.
    csv.field_size_limit(max(csv.field_size_limit(), len(data) + 1))
    reader = csv.DictReader(_text(data, newline=""))
    try:
        header = [(name or "").strip() for name in (reader.fieldnames or [])]
    except csv.Error as error:
        raise BatchConfigError(f"{source} is not valid CSV ({error}); check its quoting") from error
    _check_header(source, header)
    reader.fieldnames = header
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # this row only; the reader goes on at the next line
            yield {"_error": f"the row is not valid CSV ({error})"}
            continue
        yield {key: record.get(key) for key in ROW_KEYS if key in header}


def _jsonl_records(data: bytes, source: str) -> Iterator[dict[str, Any]]:
    # Lines end at \n (or \r\n) only, as JSON Lines says: U+2028, U+0085 and the other breaks that
    # str.splitlines() knows are valid inside a JSON string, written raw by ensure_ascii=False.
    for line in _text(data, newline="\n"):
        line = line.removesuffix("\n").removesuffix("\r")
        if line.strip():
            yield _json_object(line)


def _json_object(line: str) -> dict[str, Any]:
    """One JSON Lines row; a row that cannot be one carries its ``_error`` instead."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        return {"_error": f"line is not valid JSON ({error.msg})"}
    except RecursionError:
        return {"_error": "line is nested too deeply to read"}
    except ValueError:  # Python converts integers of at most 4,300 digits
        return {"_error": "line holds an integer of more than 4,300 digits"}
    return value if isinstance(value, dict) else {"_error": "line is not a JSON object"}


def _txt_records(data: bytes, source: str) -> Iterator[dict[str, Any]]:
    # Universal newlines only (\n, \r\n, \r): other Unicode line breaks stay inside the prompt.
    lines = (line.strip() for line in _text(data, newline=None))
    return ({"prompt": line} for line in lines if line)


def _parquet_records(data: bytes, source: str, max_rows: int) -> Iterator[dict[str, Any]]:
    """Rows batch by batch (a dictionary-encoded column of millions of rows is a few kB on disk);
    a file whose footer counts more than ``max_rows`` rows is refused before any is read."""
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(pyarrow.BufferReader(data))
        names = list(parquet.schema_arrow.names)
        _check_header(source, names)
        if parquet.metadata.num_rows > max_rows:
            raise too_many_rows(source)
        wanted = [name for name in ROW_KEYS if name in names]
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            columns = {name: batch.column(name).to_pylist() for name in wanted}
            yield from ({name: columns[name][i] for name in wanted} for i in range(batch.num_rows))
    except BatchConfigError:
        raise
    except (pyarrow.ArrowException, OSError, ValueError, KeyError, TypeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise BatchConfigError(
            f"{source} is not a readable Parquet file ({first_line}); write it with pandas.to_parquet "
            "or pyarrow"
        ) from error
