"""Names that come from storage (object keys, blob names, local file names), checked before any of
them becomes a path.

A batch job turns each input file's name into output paths (``images/<name>/<row>.png``), so a name
is only used when it provably stays below the root it came from: relative, of plain segments
(no ``..``, ``.`` or empty ones), '/' as the only separator, and printable text. Anyone who can
write to an input bucket can choose its keys; this is what stops them writing anywhere else.

Local folders are listed here too, without following a symbolic link out of the folder: a link
to /etc/passwd in a prompt folder must not become a prompt.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator

from schemas.fields import is_text

# Unicode categories refused in a name: control characters (NUL, tab, newline, ESC, C1 controls),
# surrogates (what a name that is not UTF-8 decodes to) and line/paragraph separators.
_REFUSED_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}


def unsafe_name_reason(path: str) -> str:
    """Why the relative path ``path`` cannot name anything below a root; '' when it can."""
    if not path:
        return "the name is empty"
    if not is_text(path):
        return "the name is not valid UTF-8 text"
    if any(unicodedata.category(char) in _REFUSED_CATEGORIES for char in path):
        return "the name holds control characters"
    if "\\" in path:
        return "the name holds a backslash"
    if path.startswith("/") or (len(path) > 1 and path[1] == ":" and path[0].isalpha()):
        return "the name is an absolute path"
    if any(segment in ("", ".", "..") for segment in path.split("/")):
        return "the name holds '..', '.' or empty segments"
    return ""


def printable(name: str) -> str:
    """``name`` for a message, a log line or summary.json: control characters and undecodable bytes
    escaped (as Python writes them), everything else as it is."""
    return "".join(
        char if unicodedata.category(char) not in _REFUSED_CATEGORIES else ascii(char)[1:-1] for char in name
    )


def within(path: str, root: str) -> bool:
    """Whether the absolute ``path`` is ``root`` or lies below it (both already resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def walk_local(root: str) -> Iterator[tuple[str, str]]:
    """(relative path, reason) of every entry below the local folder ``root``; the reason is ''
    for a regular file that may be read.

    Symbolic links are followed only while they resolve inside ``root``, and each real folder is
    walked once (a link into a folder already walked, such as one that holds it, is not followed:
    links cannot loop or multiply the walk). Others, and anything that is not a regular file or
    folder (a FIFO would block a read forever), come with the reason they are not read. The walk
    keeps its own stack, so no nesting depth can exhaust Python's.
    """
    real_root = os.path.realpath(root)
    visited = {real_root}
    pending: list[tuple[str, str]] = [(real_root if os.path.isdir(real_root) else root, "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name, reverse=True)
        except OSError as error:
            yield prefix.rstrip("/") or ".", f"the folder cannot be listed ({error.strerror})"
            continue
        for entry in entries:
            relative = prefix + entry.name
            if entry.is_symlink() and not within(os.path.realpath(entry.path), real_root):
                yield relative, "a symbolic link to a place outside the input folder: not read"
            elif entry.is_dir():
                real = os.path.realpath(entry.path)
                if real in visited:
                    yield relative, "a folder listed already under another name (a link): not walked twice"
                else:
                    visited.add(real)
                    pending.append((entry.path, relative + "/"))
            elif entry.is_file():
                yield relative, ""
            else:
                yield relative, "not a regular file (a broken link, a device, a pipe or a socket)"
