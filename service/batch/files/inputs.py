"""Input files: which ones a URI names, and their rows.

A URI is a folder (prefix) of prompt files, searched recursively, or one such file; the formats
are in formats.py (``.csv``, ``.jsonl``, ``.parquet``/``.pqt``, ``.txt``). Every other file in the
folder is skipped and named, with the reason, in the log and in summary.json. Rows are numbered
from 0 within each file, in file order, which is Azure ML's ``row_number_per_file``.

A row that cannot be generated (empty prompt, bad seed) is still a row: it carries its error
and ends as a failed record. A file that cannot be read at all stops the job before it starts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from model.types import MAX_SEED
from schemas.fields import is_text
from service.batch.errors import BatchConfigError
from service.batch.files import images
from service.batch.files.formats import MAX_JOB_ROWS, SUFFIX_LIST, file_format, parse_records
from service.batch.files.images import IMAGE_COLUMNS
from service.batch.files.records import file_key
from service.batch.params import derive_seed
from service.storage import Storage, StorageError, StorageOptions, open_storage
from service.storage.names import printable, unsafe_name_reason

log = logging.getLogger(__name__)
LOGGED_SKIPS = 20  # skipped files named one by one in the log; summary.json has them all
# Files that rows may name as their images: skipped as prompt files, but named in the log only at
# debug level (a folder of a thousand images is what an image-to-image job looks like)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
IMAGE_FILE = "an image, not a prompt file"
MAX_PROMPT_CHARS = 2000  # SD_MAX_PROMPT_CHARS' default; plan_job passes the setting
# One input file is held in memory while its rows are read (twice: planning counts them, running
# reads them again); larger files are refused, so that memory never depends on what a store holds.
MAX_INPUT_FILE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class InputFile:
    """One input file; ``path`` is relative to the input root and names the file in every output."""

    path: str

    @property
    def key(self) -> str:
        """The path without its suffix: the folder of this file's images and records."""
        return file_key(self.path)

    @property
    def format(self) -> str:
        return file_format(self.path) or "csv"


@dataclass(frozen=True)
class SkippedFile:
    """A file of the input folder that is not a prompt file, and why."""

    path: str
    reason: str


@dataclass(frozen=True, slots=True)  # slots: a Ray job sends its pending rows as a list
class InputRow:
    """One prompt. ``error`` is set (and ``seed`` is None) when the row cannot be generated."""

    file: str
    key: str
    row: int
    prompt: str
    negative_prompt: str
    seed: int | None
    error: str = ""
    # The cells of ``image`` and ``mask_image`` as written: base64, or a path in the input folder
    # (files/images.py reads them when the row's item is built); '' for none.
    image: str = ""
    mask_image: str = ""


@dataclass(frozen=True)
class Inputs:
    """The storage holding the input files, the files (sorted by path), and the files skipped."""

    storage: Storage
    files: list[InputFile]
    single_file: bool  # the URI named one file (the storage is then its folder)
    skipped: list[SkippedFile] = field(default_factory=list)


def skip_reason(path: str) -> str:
    """Why the file at ``path`` is not read as prompts; '' for a prompt file."""
    unsafe = unsafe_name_reason(path)
    if unsafe:
        return f"{unsafe}: it cannot name an output folder"
    name = posixpath.basename(path)
    if name.startswith((".", "_")):
        return "hidden file or marker (its name starts with '.' or '_')"
    if file_format(name) is None:
        suffix = posixpath.splitext(name)[1] or "no suffix"
        if suffix.lower() in IMAGE_SUFFIXES:
            return f"{IMAGE_FILE} ({suffix}): rows may name it in their image or mask_image cells"
        return f"not a prompt file ({suffix}); prompt files end in {SUFFIX_LIST}"
    return ""


def open_inputs(uri: str, options: StorageOptions | None = None) -> Inputs:
    """The input files that ``uri`` names. Raises BatchConfigError when there are none."""
    # 1) a single file, or a folder to search
    try:
        storage = open_storage(uri, options)
        if storage.is_file():
            storage, name = storage.as_folder_of_file()
            if unsafe_name_reason(name):
                raise BatchConfigError(f"input {printable(uri)}: {skip_reason(name)}; rename it")
            if file_format(name) is None:
                raise BatchConfigError(f"input {uri} is not a prompt file: use a {SUFFIX_LIST} file")
            return Inputs(storage, [InputFile(name)], single_file=True)
        names, refused = storage.list_files()
    except StorageError as error:
        raise BatchConfigError(
            f"cannot read the input: {error}; check the URI, that the store is reachable, and the credentials"
        ) from error
    if not names and not refused:
        raise BatchConfigError(
            f"input {uri} does not exist or is empty; give a folder of {SUFFIX_LIST} files or one file"
        )
    # 2) prompt files; every other file is named, with the reason, and so is every name that could
    #    lead out of the output folder or a link out of the input folder (never read)
    files: list[InputFile] = []
    skipped = [
        SkippedFile(printable(name), skip_reason(name) if unsafe_name_reason(name) else reason)
        for name, reason in refused
    ]
    for name in names:
        reason = skip_reason(name)
        if reason:
            skipped.append(SkippedFile(name, reason))
        else:
            files.append(InputFile(name))
    images = [skip for skip in skipped if skip.reason.startswith(IMAGE_FILE)]
    if images:
        log.info("%d image file(s) in the input folder (not prompt files; rows may name them)", len(images))
    others = [skip for skip in skipped if not skip.reason.startswith(IMAGE_FILE)]
    for skip in others[:LOGGED_SKIPS]:
        log.warning("skipping %s: %s", printable(storage.describe(skip.path)), skip.reason)
    if len(others) > LOGGED_SKIPS:
        log.warning("skipping %d more files that are not prompt files", len(others) - LOGGED_SKIPS)
    if not files:
        shown = "; ".join(f"{s.path} ({s.reason})" for s in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise BatchConfigError(
            f"no prompt files under {uri}: found {len(skipped)} other file(s): {shown}{more}; "
            f"give {SUFFIX_LIST} files"
        )
    # 3) two files must not share an output folder (a.csv and a.jsonl)
    seen: dict[str, str] = {}
    for file in files:
        if file.key in seen:
            raise BatchConfigError(
                f"input files {seen[file.key]} and {file.path} would write to the same output folder "
                f"{file.key}/; rename one of them"
            )
        seen[file.key] = file.path
    return Inputs(storage, files, single_file=False, skipped=skipped)


@dataclass(frozen=True)
class FileIdentity:
    """What one input file was when a job read it: its path, size and SHA-256 (job.json keeps these)."""

    path: str
    size: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class ScannedFile:
    """An input file as planning found it: what it was (its identity) and how many rows it holds."""

    file: InputFile
    identity: FileIdentity
    rows: int


def read_input(storage: Storage, file: InputFile) -> bytes:
    """One input file's bytes; more than MAX_INPUT_FILE_BYTES is refused before any is read."""
    source = printable(storage.describe(file.path))
    # 1) the size first: a read bounded by the cap would still allocate the whole cap locally
    #    (Storage refuses a name that could lead out of the input, in this call as in every other)
    try:
        size = storage.size(file.path)
    except FileNotFoundError as error:
        raise BatchConfigError(f"cannot read input file: {source} does not exist") from error
    except StorageError as error:
        raise BatchConfigError(f"cannot read input file: {error}") from error
    except Exception as error:  # the backends' own types; their text may hold a credential
        raise BatchConfigError(
            f"cannot read input file {source}: its size cannot be read ({type(error).__name__}); "
            "check that the store is reachable, and the credentials"
        ) from error
    if size > MAX_INPUT_FILE_BYTES:
        raise BatchConfigError(
            f"{source} is larger than {MAX_INPUT_FILE_BYTES // 2**20} MiB ({size:,} bytes), the "
            "most one input file may hold; split it into several files"
        )
    # 2) the bytes; a file that grew or shrank since is not the one measured
    try:
        data = storage.read(file.path, limit=size + 1)
    except StorageError as error:
        raise BatchConfigError(f"cannot read input file: {error}") from error
    if len(data) != size:
        raise BatchConfigError(f"input file {source} changed while it was read; run the job again")
    return data


def scan_inputs(
    storage: Storage, files: list[InputFile], job_seed: int | None, max_chars: int = MAX_PROMPT_CHARS
) -> list[ScannedFile]:
    """Read and parse every file, one at a time, counting its rows (none is kept): planning's
    memory is one file's bytes, whatever the number of rows. Raises BatchConfigError for a file
    that cannot be used, or for more than MAX_JOB_ROWS rows in all."""
    scanned: list[ScannedFile] = []
    total = 0
    for file in files:
        data = read_input(storage, file)
        source = printable(storage.describe(file.path))
        count = sum(1 for _ in parse_file(file, data, job_seed, source, max_chars, MAX_JOB_ROWS - total))
        total += count
        scanned.append(ScannedFile(file, FileIdentity(file.path, len(data), _sha256(data)), count))
    return scanned


def iter_rows(
    storage: Storage, scanned: list[ScannedFile], job_seed: int | None, max_chars: int = MAX_PROMPT_CHARS
) -> Iterator[InputRow]:
    """The rows of the scanned files, read again file by file as they are consumed. A file whose
    bytes are no longer those planned raises BatchConfigError: its rows could not be the job's."""
    for item in scanned:
        data = read_input(storage, item.file)
        if len(data) != item.identity.size or _sha256(data) != item.identity.sha256:
            raise BatchConfigError(
                f"input file {printable(storage.describe(item.file.path))} changed while the job ran; "
                "run the job again (with --continue to keep the rows of unchanged files)"
            )
        source = printable(storage.describe(item.file.path))
        yield from parse_file(item.file, data, job_seed, source, max_chars)
        del data


def read_rows(
    storage: Storage, files: list[InputFile], job_seed: int | None, max_chars: int = MAX_PROMPT_CHARS
) -> list[InputRow]:
    """Every row of every file, in order, as a list (for small inputs and tests). Raises
    BatchConfigError for a file that cannot be used."""
    return list(iter_rows(storage, scan_inputs(storage, files, job_seed, max_chars), job_seed, max_chars))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_file(
    file: InputFile,
    data: bytes,
    job_seed: int | None,
    source: str,
    max_chars: int = MAX_PROMPT_CHARS,
    max_rows: int = MAX_JOB_ROWS,
) -> Iterator[InputRow]:
    """The rows of one file's bytes, one by one; ``source`` names the file in errors. A prompt (or
    negative prompt) longer than ``max_chars`` fails its row; more than ``max_rows`` rows fail the file."""
    records = parse_records(file.format, data, source, max_rows)
    return (_row(file, number, record, job_seed, max_chars) for number, record in enumerate(records))


def _valid_unicode(text: object) -> tuple[object, bool]:
    """``text`` made safe to write anywhere, and whether it was valid: a lone surrogate (JSON can
    carry one, as "\\ud800") is written back as its escape, and the row fails."""
    if not isinstance(text, str) or is_text(text):
        return text, True
    return text.encode("utf-8", "backslashreplace").decode("utf-8"), False


def _row(
    file: InputFile, number: int, record: dict[str, Any], job_seed: int | None, max_chars: int
) -> InputRow:
    prompt, prompt_ok = _valid_unicode(record.get("prompt"))
    negative, negative_ok = _valid_unicode(record.get("negative_prompt"))
    (image, image_error), (mask, mask_error) = (images.cell(name, record.get(name)) for name in IMAGE_COLUMNS)

    def row(seed: int | None, error: str = "") -> InputRow:
        return InputRow(
            file=file.path,
            key=file.key,
            row=number,
            prompt=prompt if isinstance(prompt, str) else "",
            negative_prompt=negative if isinstance(negative, str) else "",
            seed=seed,
            error=error,
            image=image if not error else "",  # a failed row never reads its images
            mask_image=mask if not error else "",
        )

    # The first problem found is the row's error; the engine never sees the row.
    if "_error" in record:
        return row(None, str(record["_error"]))
    if prompt is not None and not isinstance(prompt, str):
        return row(None, f"prompt must be a string, got {_short(prompt)}")
    if not isinstance(prompt, str) or not prompt.strip():
        return row(None, "empty prompt: give the row a non-empty prompt")
    if negative is not None and not isinstance(negative, str):
        return row(None, f"negative_prompt must be a string, got {_short(negative)}")
    if not (prompt_ok and negative_ok):
        return row(
            None,
            "the prompt is not valid text (bytes that are not UTF-8, or a lone surrogate); "
            "fix the input file",
        )
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if isinstance(text, str) and len(text) > max_chars:
            return row(
                None,
                f"{name} has {len(text)} characters, more than the {max_chars} a prompt may have "
                "(SD_MAX_PROMPT_CHARS); shorten it",
            )
    if image_error or mask_error:
        return row(None, image_error or mask_error)
    if mask and not image:
        return row(None, "mask_image without an image: give the image to repaint in the image column")
    seed, seed_error = _seed(record.get("seed"))
    if seed_error:
        return row(None, seed_error)
    return row(seed if seed is not None else derive_seed(file.path, number, job_seed))


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _seed(value: object) -> tuple[int | None, str]:
    """The row's own seed (None: absent) or an error. Accepts 42, "42" and 42.0 (pandas writes those);
    an empty cell, null or NaN (pandas' missing value) is no seed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, ""
    if isinstance(value, float) and math.isnan(value):
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
        return None, f"bad seed {_short(value)}: a seed is an integer between 0 and {MAX_SEED}"
    return number, ""


def _integral_float(text: str) -> int | None:
    try:
        value = float(text)
    except (ValueError, OverflowError):
        return None
    return int(value) if math.isfinite(value) and value.is_integer() else None
