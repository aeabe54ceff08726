"""The ledger: one small JSON record per finished row, and what is built from the records.

Output layout (all relative to the output URI):
    images/<file-key>/<row>.png      the image (all black when flagged)
    records/<file-key>/<row>.json    the row's record: ok, or failed with its reason
    predictions.csv, summary.json    rebuilt from the records at the end of every run
    job.json                         the parameters, so that a resume cannot mix two jobs

A row is finished exactly when its record exists. The image is written before the record, so a
record never points at a missing image; a row killed between the two is simply generated again.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Literal

IMAGES_DIR = "images"
RECORDS_DIR = "records"
PREDICTIONS_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"
JOB_FILE = "job.json"

# Azure ML's batch columns first, in Azure's order; ours after them.
PREDICTION_COLUMNS = (
    "row_number_per_file",
    "prompt",
    "generated_image",
    "nsfw_content_detected",
    "input_csv_name",
    "seed",
    "status",
    "error",
)


def file_key(input_file: str) -> str:
    """An input file's path without its suffix: the folder of its images and records."""
    return posixpath.splitext(input_file)[0]


def image_path(key: str, row: int) -> str:
    return f"{IMAGES_DIR}/{key}/{row}.png"


def record_path(key: str, row: int) -> str:
    return f"{RECORDS_DIR}/{key}/{row}.json"


def parse_record_path(path: str) -> tuple[str, int] | None:
    """``records/<key>/<row>.json`` -> (key, row); None for anything else."""
    if not path.startswith(f"{RECORDS_DIR}/") or not path.endswith(".json"):
        return None
    key, _, name = path[len(RECORDS_DIR) + 1 : -len(".json")].rpartition("/")
    return (key, int(name)) if key and name.isdigit() else None


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
        flag = "" if self.nsfw_content_detected is None else str(self.nsfw_content_detected)
        seed = "" if self.seed is None else str(self.seed)
        return [
            str(self.row),
            self.prompt,
            self.generated_image,
            flag,
            self.input_file,
            seed,
            self.status,
            self.error,
        ]


def predictions_csv(records: list[Record], header: bool = True) -> bytes:
    """Rows ordered by input file, then row number (so a rebuilt file is the same every time)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(PREDICTION_COLUMNS)
    for record in sorted(records, key=lambda r: (r.input_file, r.row)):
        writer.writerow(record.prediction_row())
    return buffer.getvalue().encode("utf-8")
