"""Files under one root (a local folder, a blob prefix), with atomic writes.

The whole interface is list / read / write / exists; fsspec does the talking to each backend.
``iter_list`` and ``writing`` do the same for more files or bytes than memory should hold
(streams.py).
Atomicity: locally a write goes to a hidden temporary file in the target's folder, then
``os.replace`` (a rename within one filesystem is atomic). Remotely one upload of the whole
object is committed by the service as a unit (Azure's put-blob or put-block-list, S3's put-object
or complete-multipart-upload), so readers never see part of it.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from service.storage.names import printable, unsafe_name_reason, walk_local, within
from service.storage.streams import AtomicWriter, iter_find

# Temporary files of local writes: hidden, and recognisable so that a resumed job can remove the
# ones a killed process left behind.
PARTIAL_MARKER = ".partial-"
Names = list[str]
Refusals = list[tuple[str, str]]  # (name, why it is not read)


class StorageError(Exception):
    """A storage operation failed; the message names the URI and what to check."""


class MissingFileError(StorageError):
    """The file (or folder) does not exist."""


class Storage:
    """Files below ``root`` of one fsspec filesystem; paths given to methods are relative, '/'-separated."""

    def __init__(self, fs: AbstractFileSystem, root: str, uri: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.uri = uri.rstrip("/")
        self.is_local = isinstance(fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    # ------------------------------------------------------------------ naming
    def _full(self, path: str) -> str:
        """The backend's path of the relative ``path``; StorageError for a name that could leave the
        root (every read, write and removal goes through here)."""
        if not path:
            return self.root
        reason = unsafe_name_reason(path)
        if reason:
            raise StorageError(f"refusing the path {printable(path)!r} below {self.uri}: {reason}")
        full = f"{self.root}/{path}"
        if self.is_local and not within(os.path.normpath(full), os.path.normpath(self.root)):
            raise StorageError(f"refusing the path {printable(path)!r}: it leads out of {self.uri}")
        return full

    def describe(self, path: str = "") -> str:
        """The URI of ``path``, for messages."""
        return f"{self.uri}/{path}" if path else self.uri

    def as_folder_of_file(self) -> tuple[Storage, str]:
        """When the root is a file: the storage of its folder and the file's name."""
        parent, name = posixpath.split(self.root)
        uri_parent = self.uri[: -len(name)].rstrip("/") if self.uri.endswith(name) else parent
        return Storage(self.fs, parent, uri_parent or "."), name

    # ------------------------------------------------------------------ queries
    def exists(self, path: str = "") -> bool:
        try:
            return bool(self.fs.exists(self._full(path)))
        except Exception as error:
            raise StorageError(f"cannot check {self.describe(path)}: {_reason(error)}") from error

    def size(self, path: str) -> int:
        """The size in bytes of the file at ``path`` (the backend's own error when there is none)."""
        return int(self.fs.size(self._full(path)))

    def is_file(self, path: str = "") -> bool:
        try:
            return bool(self.fs.isfile(self._full(path)))
        except Exception as error:
            raise StorageError(f"cannot check {self.describe(path)}: {_reason(error)}") from error

    def list(self, prefix: str = "") -> list[str]:
        """Relative paths of every file below ``prefix`` (recursively), sorted; partial writes excluded."""
        base = self._full(prefix.strip("/"))
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        except Exception as error:
            raise StorageError(f"cannot list {self.describe(prefix)}: {_reason(error)}") from error
        start = len(self.root) + 1
        paths = (self.fs._strip_protocol(p)[start:] for p in found)
        return sorted(p for p in paths if p and PARTIAL_MARKER not in posixpath.basename(p))

    def iter_list(self, prefix: str = "") -> Iterator[str]:
        """Relative paths of every file below ``prefix`` (recursively), unsorted, partial writes
        excluded, fetched a page at a time: memory does not grow with the number of files."""
        base = self._full(prefix.strip("/"))
        start = len(self.root) + 1
        try:
            for found in iter_find(self.fs, base):
                path = self.fs._strip_protocol(found)[start:]
                if path and PARTIAL_MARKER not in posixpath.basename(path):
                    yield path
        except FileNotFoundError:
            return
        except Exception as error:
            raise StorageError(f"cannot list {self.describe(prefix)}: {_reason(error)}") from error

    def list_files(self) -> tuple[Names, Refusals]:
        """Every file below the root that may be read, sorted, and (name, reason) of every one that
        may not: a name that could leave the root (``..``, absolute, a backslash, control
        characters, not UTF-8), or locally a symbolic link out of the root, a FIFO or a device."""
        if self.is_local:
            if not os.path.isdir(self.root):
                return [], []
            found = [(path, reason) for path, reason in walk_local(self.root)]
            found = [(p, r) for p, r in found if PARTIAL_MARKER not in posixpath.basename(p)]
        else:
            found = [(path, "") for path in self.list()]
        readable: Names = []
        refused: Refusals = []
        for path, reason in sorted(found):
            reason = unsafe_name_reason(path) or reason
            if reason:
                refused.append((path, reason))
            else:
                readable.append(path)
        return readable, refused

    # ------------------------------------------------------------------ reading
    def read(self, path: str = "", limit: int | None = None) -> bytes:
        """The file's bytes (the first ``limit`` bytes when given)."""
        full = self._full(path)
        try:
            data = self.fs.cat_file(full, start=0, end=limit) if limit is not None else self.fs.cat_file(full)
        except FileNotFoundError as error:
            raise MissingFileError(f"{self.describe(path)} does not exist") from error
        except Exception as error:
            raise StorageError(f"cannot read {self.describe(path)}: {_reason(error)}") from error
        return bytes(data)

    def read_many(self, paths: Iterable[str]) -> dict[str, bytes | StorageError]:
        """Read several files; remote backends fetch them concurrently. Failures are returned, not raised."""
        wanted = list(paths)
        if not wanted:
            return {}
        try:
            full = {self._full(p): p for p in wanted}
        except StorageError as error:
            return dict.fromkeys(wanted, error)
        try:
            found = self.fs.cat(list(full), on_error="return")
        except Exception as error:
            failure = StorageError(f"cannot read below {self.uri}: {_reason(error)}")
            return dict.fromkeys(wanted, failure)
        # fsspec keys the answer by its own spelling of each path.
        by_stripped = {self.fs._strip_protocol(k): v for k, v in found.items()}
        out: dict[str, bytes | StorageError] = {}
        for full_path, rel in full.items():
            value = by_stripped.get(self.fs._strip_protocol(full_path))
            if isinstance(value, bytes | bytearray):
                out[rel] = bytes(value)
            else:
                out[rel] = StorageError(f"cannot read {self.describe(rel)}: {_reason(value)}")
        return out

    # ------------------------------------------------------------------ writing
    def write(self, path: str, data: bytes) -> None:
        """Write the whole file atomically: readers see the old content or the new, never a part."""
        full = self._full(path)
        try:
            if self.is_local:
                _write_local_atomically(full, data)
            else:
                self.fs.pipe_file(full, data)
        except Exception as error:
            raise StorageError(f"cannot write {self.describe(path)}: {_reason(error)}") from error

    @contextmanager
    def writing(self, path: str) -> Iterator[Writer]:
        """A file written in chunks (``with output.writing(path) as out: out.write(data)``) and
        committed atomically when the block ends without an error; on an error the old file (or
        none) stays. Memory is one upload block, whatever the file's size."""
        full = self._full(path)
        try:
            writer = AtomicWriter(self.fs, full, PARTIAL_MARKER)
        except Exception as error:
            raise StorageError(f"cannot write {self.describe(path)}: {_reason(error)}") from error
        try:
            yield Writer(writer, self.describe(path))
        except BaseException:  # the caller's error (or Writer's StorageError), passed on as it is
            writer.discard()
            raise
        try:
            writer.commit()
        except Exception as error:
            writer.discard()
            raise StorageError(f"cannot write {self.describe(path)}: {_reason(error)}") from error

    def remove(self, paths: Iterable[str]) -> None:
        """Remove the files ``paths`` (missing ones are no error)."""
        full = [self._full(path) for path in paths]
        if not full:
            return
        try:
            try:
                self.fs.rm(full)
            except FileNotFoundError:  # one was gone already: the others one by one
                for path in full:
                    if self.fs.exists(path):
                        self.fs.rm_file(path)
        except Exception as error:
            raise StorageError(f"cannot remove files below {self.uri}: {_reason(error)}") from error

    def discard_partial_writes(self, prefix: str = "", *, recursive: bool = True) -> int:
        """Remove temporary files that a killed writer left below ``prefix`` (in ``prefix`` itself
        only, unless ``recursive``); returns how many."""
        if not self.is_local:
            return 0  # remote uploads that never committed are invisible and expire on their own
        removed = 0
        pending = [self._full(prefix.strip("/"))]
        while pending:  # os.scandir, not os.walk: a folder of a million records is not listed at once
            try:
                entries = os.scandir(pending.pop())
            except (FileNotFoundError, NotADirectoryError):
                continue
            with entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.extend([entry.path] if recursive else [])
                    elif entry.name.startswith(".") and PARTIAL_MARKER in entry.name:
                        os.unlink(entry.path)
                        removed += 1
        return removed


class Writer:
    """What ``Storage.writing`` yields: ``write(bytes)``, with the backend's errors as StorageError."""

    def __init__(self, writer: AtomicWriter, uri: str) -> None:
        self._writer, self._uri = writer, uri

    def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except Exception as error:
            raise StorageError(f"cannot write {self._uri}: {_reason(error)}") from error


def _write_local_atomically(full: str, data: bytes) -> None:
    folder, name = os.path.split(full)
    os.makedirs(folder or ".", exist_ok=True)
    temporary = os.path.join(folder, f".{name}{PARTIAL_MARKER}{uuid.uuid4().hex[:12]}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, full)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


# Secrets an SDK's message can carry: a SAS token's signature, an account key, a presigned URL's.
_SECRETS = re.compile(
    r"((?:sig|AccountKey|SharedAccessSignature|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token)=)"
    r"[^&;\s\"']+",
    re.IGNORECASE,
)


def _reason(error: object) -> str:
    """One line: the exception's type and first line, without the SDKs' multi-line dumps and with
    any credential in it replaced by ***."""
    if isinstance(error, BaseException):
        text = str(error).strip().splitlines()
        line = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    else:
        line = repr(error)
    return _SECRETS.sub(r"\1***", line)
