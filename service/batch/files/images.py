"""The images of a row: its ``image`` and ``mask_image`` cells -> the picture its item starts from.

A cell holds the image file's base64 (with or without line breaks or a ``data:image/...;base64,``
prefix, as /score takes it), or the relative path of an image file inside the input folder
(``pictures/cat.png``, read through the job's input storage). Which of the two a cell is, is plain
from its text: base64 never holds a ``.``, a space or a backslash, and the base64 of any image is
longer than ``MIN_BASE64`` characters; a cell holding any of those, or shorter, is a path.

URLs are not fetched in a batch job (it has no list of hosts it may fetch from, and a job's input
is whoever can write to its bucket): a URL cell fails its row, saying so. A path is read only when
it provably names a file of the input folder: a relative name of plain segments (the storage
layer's own rule: no ``..``, no absolute path, no backslash), not a prompt file, and locally not
a symbolic link that leads out of the folder, nor anything but a regular file. A file over
``MAX_IMAGE_BYTES`` is refused from its size, before it is read.

Cells are checked for their form when rows are read (``cell``: a row error, before planning ends);
the image itself is read and decoded only when the row's item is built (``picture``), so a job
holds the images of one engine batch at a time, never those of every row.
"""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING

from service.batch.files.formats import file_format
from service.images_in import ImageInputError
from service.images_in.payload import MAX_IMAGE_BYTES, too_large
from service.storage import MissingFileError, Storage, StorageError
from service.storage.names import printable, unsafe_name_reason, within

if TYPE_CHECKING:
    from service.runtime.items import Picture

IMAGE_COLUMNS = ("image", "mask_image")
MIN_BASE64 = 64  # the smallest PNG is 67 bytes (92 characters of base64)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=_-]+")
_HOW = "give the image file's base64, or its path inside the input folder"


def cell(name: str, value: object) -> tuple[str, str]:
    """A row's ``image`` or ``mask_image`` cell -> (its text, '' when empty; the row's error, or '').

    An empty cell, null or NaN (pandas' missing value) is no image."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", ""
    if not isinstance(value, str):
        return "", f"{name} must be text ({_HOW}), got a {type(value).__name__}"
    text = value.strip()
    if not text:
        return "", ""
    if _URL.match(text):
        return "", (
            f"{name}: image URLs are not fetched in batch jobs; {_HOW} (download the image into the "
            "input folder and name its path)"
        )
    if text[:5].lower() != "data:" and is_path(text):
        reason = path_problem(text)
        if reason:
            return "", f"{name}: the path {shown(text)} {reason}; {_HOW}"
    return text, ""


def is_path(text: str) -> bool:
    """Whether a cell's (stripped) text is a path rather than base64."""
    if text[:5].lower() == "data:":
        return False
    compact = text.replace("\r", "").replace("\n", "")  # base64 may be broken into lines
    return len(compact) < MIN_BASE64 or _BASE64_TEXT.fullmatch(compact) is None


def path_problem(path: str) -> str:
    """Why ``path`` cannot name an image of the input folder ('' when it may)."""
    unsafe = unsafe_name_reason(path)
    if unsafe:
        return f"is refused ({unsafe.removeprefix('the name ')}): only a file inside the input folder is read"
    if file_format(path) is not None:
        return "names a prompt file, not an image"
    return ""


def picture(image: str, mask_image: str, storage: Storage | None) -> Picture | None:
    """The picture of a row's cells (None without an image), its files read from ``storage``.

    Raises ImageInputError for a file that cannot be the row's image, and StorageError when the
    store fails (which a later attempt may not)."""
    from service.runtime.items import Picture

    if not image:
        return None
    mask = _content(mask_image, "mask_image", storage) if mask_image else None
    return Picture(_content(image, "image", storage), "image", mask=mask, mask_field="mask_image")


def _content(text: str, field: str, storage: Storage | None) -> str | bytes:
    """A cell's base64 as it is (read_image decodes it), or the bytes of the file it names."""
    if not is_path(text):
        return text
    problem = path_problem(text)
    if problem:
        raise ImageInputError(f"the path {shown(text)} {problem}; {_HOW}", field=field)
    if storage is None:
        raise ImageInputError(
            f"{shown(text)} is a path, and this job reads no input folder; "
            "put the image's base64 in the cell",
            field=field,
        )
    if storage.is_local:
        _check_local(storage, text, field)
    try:
        size = storage.size(text)
    except FileNotFoundError:
        raise _missing(text, field) from None
    except StorageError:
        raise
    except Exception as error:  # the backends' own types; their text may hold a credential
        raise StorageError(
            f"cannot read the size of {printable(storage.describe(text))} ({type(error).__name__})"
        ) from error
    if size > MAX_IMAGE_BYTES:
        raise too_large(field, MAX_IMAGE_BYTES)
    try:
        data = storage.read(text, limit=MAX_IMAGE_BYTES + 1)
    except MissingFileError:
        raise _missing(text, field) from None
    if len(data) > MAX_IMAGE_BYTES:  # it grew since its size was read
        raise too_large(field, MAX_IMAGE_BYTES)
    return data


def _check_local(storage: Storage, path: str, field: str) -> None:
    """A local path must stay in the folder once links are followed, and be a regular file (a FIFO
    would block the read forever)."""
    full = os.path.join(storage.root, *path.split("/"))
    real, root = os.path.realpath(full), os.path.realpath(storage.root)
    if not within(real, root):
        raise ImageInputError(
            f"the path {shown(path)} is a symbolic link out of the input folder: not read; {_HOW}",
            field=field,
        )
    if os.path.lexists(full) and not os.path.isfile(real):
        raise ImageInputError(
            f"{shown(path)} is not a regular file (a folder, a broken link, a device or a pipe); {_HOW}",
            field=field,
        )


def _missing(path: str, field: str) -> ImageInputError:
    return ImageInputError(f"no file {shown(path)} in the input folder; {_HOW}", field=field)


def shown(path: str, most: int = 80) -> str:
    """A path for a message: quoted, escaped, and cut short (a cell may hold megabytes)."""
    return repr(printable(path if len(path) <= most else f"{path[: most - 3]}..."))
