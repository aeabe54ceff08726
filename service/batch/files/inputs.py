"""Input files: which ones a URI names, and their rows.

A URI is a folder (prefix) of ``.csv`` and ``.jsonl`` files, searched recursively, or one such
file. CSV files need a header with a ``prompt`` column; ``negative_prompt`` and ``seed`` are
optional and other columns (such as the unnamed index column pandas writes) are ignored. JSONL
files hold one object per line with the same keys. Rows are numbered from 0 within each file,
in file order (blank lines are not rows), which is Azure ML's ``row_number_per_file``.

A row that cannot be generated (empty prompt, bad seed) is still a row: it carries its error
and ends as a failed record. A file that cannot be read at all stops the job before it starts.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

from model.types import MAX_SEED
from service.batch.errors import BatchConfigError
from service.batch.files.records import file_key
from service.batch.params import derive_seed
from service.storage import Storage, StorageError, StorageOptions, open_storage

INPUT_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class InputFile:
    """One input file; ``path`` is relative to the input root and names the file in every output."""

    path: str

    @property
    def key(self) -> str:
        """The path without its suffix: the folder of this file's images and records."""
        return file_key(self.path)

    @property
    def is_jsonl(self) -> bool:
        return self.path.lower().endswith(".jsonl")


@dataclass(frozen=True)
class InputRow:
    """One prompt. ``error`` is set (and ``seed`` is None) when the row cannot be generated."""

    file: str
    key: str
    row: int
    prompt: str
    negative_prompt: str
    seed: int | None
    error: str = ""


@dataclass(frozen=True)
class Inputs:
    """The storage holding the input files, and the files, sorted by path."""

    storage: Storage
    files: list[InputFile]
    single_file: bool  # the URI named one file (the storage is then its folder)


def open_inputs(uri: str, options: StorageOptions | None = None) -> Inputs:
    """The input files that ``uri`` names. Raises BatchConfigError when there are none."""
    # 1) a single file, or a folder to search
    try:
        storage = open_storage(uri, options)
        if storage.is_file():
            storage, name = storage.as_folder_of_file()
            if not name.lower().endswith(INPUT_SUFFIXES):
                raise BatchConfigError(f"input {uri} is neither a .csv nor a .jsonl file")
            return Inputs(storage, [InputFile(name)], single_file=True)
        names = storage.list()
    except StorageError as error:
        raise BatchConfigError(f"cannot read the input: {error}") from error
    if not names:
        raise BatchConfigError(
            f"input {uri} does not exist or is empty; give a folder of .csv/.jsonl files or one file"
        )
    # 2) prompt files only; hidden files and markers such as _SUCCESS are not inputs
    files = [
        InputFile(name)
        for name in names
        if name.lower().endswith(INPUT_SUFFIXES) and not posixpath.basename(name).startswith((".", "_"))
    ]
    if not files:
        raise BatchConfigError(f"no .csv or .jsonl files under {uri}")
    # 3) two files must not share an output folder (a.csv and a.jsonl)
    seen: dict[str, str] = {}
    for file in files:
        if file.key in seen:
            raise BatchConfigError(
                f"input files {seen[file.key]} and {file.path} would write to the same output folder "
                f"{file.key}/; rename one of them"
            )
        seen[file.key] = file.path
    return Inputs(storage, files, single_file=False)


def read_rows(storage: Storage, files: list[InputFile], job_seed: int | None) -> list[InputRow]:
    """Every row of every file, in order. Raises BatchConfigError for a file that cannot be used."""
    contents = storage.read_many(file.path for file in files)
    rows: list[InputRow] = []
    for file in files:
        data = contents[file.path]
        if isinstance(data, StorageError):
            raise BatchConfigError(f"cannot read input file: {data}")
        rows.extend(parse_file(file, data, job_seed, storage.describe(file.path)))
    return rows


def parse_file(file: InputFile, data: bytes, job_seed: int | None, source: str) -> list[InputRow]:
    """The rows of one file's bytes; ``source`` names the file in errors."""
    try:
        text = data.decode("utf-8-sig")  # -sig: Excel starts its CSV files with a byte-order mark
    except UnicodeDecodeError as error:
        raise BatchConfigError(f"{source} is not UTF-8 text ({error}); save it as UTF-8") from error
    records = _jsonl_records(text) if file.is_jsonl else _csv_records(text, source)
    return [_row(file, number, record, job_seed) for number, record in enumerate(records)]


def _csv_records(text: str, source: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in (reader.fieldnames or [])]
        if "prompt" not in header:
            found = ", ".join(repr(name) for name in header) or "no header"
            raise BatchConfigError(
                f"{source} has no 'prompt' column (found {found}); add a header row with prompt"
            )
        reader.fieldnames = header
        return [dict(record) for record in reader]
    except csv.Error as error:
        raise BatchConfigError(f"{source} is not valid CSV ({error}); check its quoting") from error


def _jsonl_records(text: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            value = {"_error": f"line is not valid JSON ({error.msg})"}
        records.append(value if isinstance(value, dict) else {"_error": "line is not a JSON object"})
    return records


def _row(file: InputFile, number: int, record: dict[str, Any], job_seed: int | None) -> InputRow:
    prompt, negative = record.get("prompt"), record.get("negative_prompt")

    def row(seed: int | None, error: str = "") -> InputRow:
        return InputRow(
            file=file.path,
            key=file.key,
            row=number,
            prompt=prompt if isinstance(prompt, str) else "",
            negative_prompt=negative if isinstance(negative, str) else "",
            seed=seed,
            error=error,
        )

    # The first problem found is the row's error; the engine never sees the row.
    if "_error" in record:
        return row(None, str(record["_error"]))
    if prompt is not None and not isinstance(prompt, str):
        return row(None, f"prompt must be a string, got {prompt!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        return row(None, "empty prompt: give the row a non-empty prompt")
    if negative is not None and not isinstance(negative, str):
        return row(None, f"negative_prompt must be a string, got {negative!r}")
    seed, seed_error = _seed(record.get("seed"))
    if seed_error:
        return row(None, seed_error)
    return row(seed if seed is not None else derive_seed(file.path, number, job_seed))


def _seed(value: object) -> tuple[int | None, str]:
    """The row's own seed (None: absent) or an error. Accepts 42, "42" and 42.0 (pandas writes those)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, ""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            number = int(text)
        except ValueError:
            number = _integral_float(text)
    if number is None or not 0 <= number <= MAX_SEED:
        return None, f"bad seed {value!r}: a seed is an integer between 0 and {MAX_SEED}"
    return number, ""


def _integral_float(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None
