"""The ledger: one small JSON record per finished row, and what is built from the records.

Output layout (all relative to the output URI):
    images/<file-key>/<row>.png      the image (all black when flagged)
    records/<file-key>/<row>.json    the row's record: ok, or failed with its reason
    predictions.csv                  Azure ML's five columns, no header: one line per image
    predictions-detailed.csv         every row (failed ones too) with its seed, status, error...
    summary.json                     counts, failed rows, skipped files, model and parameters
    job.json                         the parameters and the job seed, so that a resume cannot mix jobs

The three files in the middle are rebuilt from the records at the end of every run. A row is
finished exactly when its record exists. The image is written before the record, so a record
never points at a missing image; a row killed between the two is simply generated again.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

from service.storage.names import unsafe_name_reason

IMAGES_DIR = "images"
RECORDS_DIR = "records"
PREDICTIONS_FILE = "predictions.csv"
DETAILED_FILE = "predictions-detailed.csv"
SUMMARY_FILE = "summary.json"
JOB_FILE = "job.json"
T = TypeVar("T")

# predictions.csv: exactly Azure ML's batch columns, in Azure's order, without a header line (Azure's
# notebooks read it with header=None and these names).
PREDICTION_COLUMNS = (
    "row_number_per_file",
    "prompt",
    "generated_image",
    "nsfw_content_detected",
    "input_csv_name",
)
# predictions-detailed.csv (with a header): Azure's columns, then the rest of the record, then the
# job's generation parameters.
DETAILED_COLUMNS = (
    *PREDICTION_COLUMNS,
    "negative_prompt",
    "seed",
    "status",
    "error",
    "attempts",
)
PARAMETER_COLUMNS = ("num_inference_steps", "guidance_scale", "height", "width", "scheduler")


def file_key(input_file: str) -> str:
    """An input file's path without its suffix: the folder of its images and records."""
    return posixpath.splitext(input_file)[0]


def image_path(key: str, row: int) -> str:
    return f"{IMAGES_DIR}/{key}/{row}.png"


def record_path(key: str, row: int) -> str:
    return f"{RECORDS_DIR}/{key}/{row}.json"


def parse_record_path(path: str) -> tuple[str, int] | None:
    """``records/<key>/<row>.json`` -> (key, row); None for anything else, such as a name that
    could not have been written here (someone else's file in a shared bucket must not stop a job)."""
    if not path.startswith(f"{RECORDS_DIR}/") or not path.endswith(".json") or unsafe_name_reason(path):
        return None
    key, _, name = path[len(RECORDS_DIR) + 1 : -len(".json")].rpartition("/")
    digits = name.isascii() and name.isdigit() and len(name) <= 18  # "²" is a digit; int() refuses it
    return (key, int(name)) if key and digits else None


@dataclass(frozen=True)
class Record:
    """Everything predictions.csv needs about one row."""

    input_file: str
    row: int
    prompt: str
    negative_prompt: str
    seed: int | None
    status: Literal["ok", "failed"]
    generated_image: str = ""  # relative to the output root; empty when failed
    nsfw_content_detected: bool | None = None
    error: str = ""
    attempts: int = 1

    @property
    def key(self) -> str:
        return file_key(self.input_file)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def flagged(self) -> bool:
        return self.ok and self.nsfw_content_detected is True

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Record:
        """Raises ValueError for anything that is not a complete record."""
        try:
            value: Any = json.loads(data)
            record = cls(**value)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
            raise ValueError(f"not a batch record: {error}") from error
        if record.status not in ("ok", "failed") or not isinstance(record.row, int):
            raise ValueError(f"not a batch record: status={record.status!r} row={record.row!r}")
        return record

    def prediction_row(self) -> list[str]:
        """The five cells of predictions.csv (for an ok record: failed rows have no image)."""
        flag = "" if self.nsfw_content_detected is None else str(self.nsfw_content_detected)
        return [str(self.row), self.prompt, self.generated_image, flag, self.input_file]

    def detailed_row(self) -> list[str]:
        seed = "" if self.seed is None else str(self.seed)
        return [
            *self.prediction_row(),
            self.negative_prompt,
            seed,
            self.status,
            self.error,
            str(self.attempts),
        ]


@dataclass(frozen=True)
class UnwrittenRecord(Record):
    """A row's record that storage would not take: the row counts as unfinished in the output
    (the next run generates it again), but this run reports it as failed, with the reason."""


# Cells that a spreadsheet would read as a formula (or, after a tab or CR, split into one) start
# with one of these; OWASP's advice is to prefix such a cell with a single quote. Records keep the
# text exactly; only the two CSV files, made to be opened in spreadsheets, are neutralised.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cells: Iterable[str]) -> list[str]:
    """``cells`` with each one a spreadsheet would take for a formula prefixed with ``'``."""
    return [f"'{cell}" if cell.startswith(FORMULA_STARTS) else cell for cell in cells]


def in_order(records: Iterable[Record]) -> list[Record]:
    """By input file, then row number, so that a rebuilt file is the same every time."""
    return sorted(records, key=lambda r: (r.input_file, r.row))


def csv_line(cells: Iterable[str]) -> str:
    """One CSV line without its line ending, spreadsheet-safe. Written with "\r\n" as the terminator,
    which makes the writer quote every cell holding a \r or a \n (a bare \r ends a line for most
    readers), then dropped."""
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\r\n").writerow(spreadsheet_safe(cells))
    return buffer.getvalue()[:-2]


def prediction_lines(records: Iterable[Record]) -> list[str]:
    """One CSV line (without its line ending) per image, in the given order: failed rows are left out."""
    return [csv_line(record.prediction_row()) for record in records if record.ok]


def predictions_csv(records: Iterable[Record]) -> bytes:
    """predictions.csv: Azure's five columns, no header, one line per image, in input order."""
    return "".join(f"{line}\n" for line in prediction_lines(in_order(records))).encode("utf-8")


def detailed_csv(records: Iterable[Record], parameters: Mapping[str, Any]) -> bytes:
    """predictions-detailed.csv: a header, then every row (failed ones too), in input order."""
    shared = parameter_cells(parameters)
    lines = [detailed_header(), *(detailed_line(record, shared) for record in in_order(records))]
    return "".join(f"{line}\n" for line in lines).encode("utf-8")


def parameter_cells(parameters: Mapping[str, Any]) -> list[str]:
    """The job's generation parameters, the last cells of every predictions-detailed.csv line."""
    return ["" if parameters.get(name) is None else str(parameters.get(name)) for name in PARAMETER_COLUMNS]


def detailed_header() -> str:
    return csv_line([*DETAILED_COLUMNS, *PARAMETER_COLUMNS])


def detailed_line(record: Record, shared: list[str]) -> str:
    """One line of predictions-detailed.csv (without its line ending); ``shared``: parameter_cells."""
    return csv_line([*record.detailed_row(), *shared])


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last may be shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
