"""Content hashes of library entries, as A1111 lists checkpoints (``sha256``, and ``hash``: its
first 10 hex digits), cached so that a restart does not read gigabytes again.

Why these hashes: a single file's is the sha256 of the file, the very value A1111 shows and model
sites index, so a client can match what it knows. A folder has no such convention; its hash covers
the weight files the loader reads (the chosen variant's), each by its path inside the folder, so
that configs, READMEs and other variants never change it. A random model is its spec.

The cache (``model-hashes.json``) holds each weight file's sha256 under its absolute path with
the size and mtime_ns it had: a file replaced or rewritten is hashed again. It is written whole to
a temporary file then renamed over the old one, so a reader never sees half of it; a cache that
does not parse is ignored (and rewritten).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from model.errors import ModelLoadError
from model.library.catalog import ModelEntry, network_files, resolve_folder

log = logging.getLogger(__name__)

CACHE_FILE = "model-hashes.json"
SHORT_HASH_LENGTH = 10
_CHUNK = 1 << 20
# One process's threads write the cache one at a time; other processes may lose an update to a
# race, which costs a hash computed again, never a wrong one (each record carries size and mtime).
_WRITING = threading.Lock()


def short_hash(sha256: str) -> str:
    """A1111's ``hash`` of a checkpoint: the first 10 hex digits of its sha256."""
    return sha256[:SHORT_HASH_LENGTH]


def content_hash(entry: ModelEntry, cache_dir: Path | None) -> str | None:
    """The entry's sha256 (hex); None when one of its files vanished or its folder broke since it
    was scanned. ``cache_dir`` None: computed without a cache."""
    from model.loading import RANDOM_PREFIX

    if entry.spec.startswith(RANDOM_PREFIX):
        return hashlib.sha256(entry.spec.encode("utf-8")).hexdigest()
    cache = _Cache(cache_dir)
    try:
        path = Path(entry.spec)
        digest = cache.file_hash(path) if path.is_file() else _folder_hash(entry, cache)
    except (FileNotFoundError, ModelLoadError):
        return None
    finally:
        cache.save()
    return digest


def _folder_hash(entry: ModelEntry, cache: _Cache) -> str:
    """sha256 over the sorted (path inside the folder, sha256 of the file) of its weight files."""
    folder = resolve_folder(entry.spec)
    files = sorted(
        (file.relative_to(folder).as_posix(), file)
        for _, paths in network_files(folder, entry.variant).values()
        for file in paths
    )
    digest = hashlib.sha256()
    for relative, file in files:
        digest.update(f"{relative}\t{cache.file_hash(file)}\n".encode())
    return digest.hexdigest()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Cache:
    """The hashes of files already read, by absolute path, valid while size and mtime_ns hold."""

    def __init__(self, folder: Path | None) -> None:
        self.path = folder / CACHE_FILE if folder is not None else None
        self.records = self._read()
        self.new: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return {}  # none yet, or damaged: every hash is computed again
        return data if isinstance(data, dict) else {}

    def file_hash(self, path: Path) -> str:
        key = str(path.absolute())
        stat = path.stat()
        record = self.records.get(key)
        if (
            isinstance(record, dict)
            and record.get("size") == stat.st_size
            and record.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(record.get("sha256"), str)
        ):
            return str(record["sha256"])
        digest = _sha256_of(path)
        if path.stat().st_mtime_ns == stat.st_mtime_ns:  # not rewritten while it was read
            self.new[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        return digest

    def save(self) -> None:
        """The new records merged into the file as it is now (another thread or process may have
        written it meanwhile), atomically; a cache that cannot be written only costs time."""
        if self.path is None or not self.new:
            return
        with _WRITING:
            temporary: Path | None = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                records = {**self._read(), **self.new}
                with tempfile.NamedTemporaryFile(
                    "w", dir=self.path.parent, prefix=f".{CACHE_FILE}.", delete=False, encoding="utf-8"
                ) as handle:
                    temporary = Path(handle.name)
                    json.dump(records, handle, indent=0, sort_keys=True)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, self.path)
            except OSError as error:
                log.warning("model hashes: cannot write %s (%s); they are computed again", self.path, error)
                if temporary is not None:
                    temporary.unlink(missing_ok=True)
        self.new = {}
