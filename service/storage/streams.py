"""Listing and writing without holding a whole folder or file in memory.

``iter_find`` yields the files below a path page by page: os.scandir locally, S3's
list-objects-v2 pages (s3fs) and Azure's list-blobs pages (the SDK adlfs uses), where fsspec's
``find`` returns every name (with its details) at once.

``AtomicWriter`` writes one file from chunks: locally a hidden temporary file renamed over the
target when complete; remotely a multipart upload (S3) or staged blocks (Azure) that the service
commits as a unit on close, so readers see the old file or the new one, never a part. Memory is
one upload block, whatever the file's size.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

PAGE = 1000  # names fetched per round trip to the event loop (S3 and Azure list up to 1,000 a page)
# One upload block: S3's smallest multipart part (every part but the last must be at least this).
BLOCK_BYTES = 5 * 2**20


def iter_find(fs: AbstractFileSystem, base: str) -> Iterator[str]:
    """The backend paths of every file below the folder ``base``, unsorted, one page at a time.
    FileNotFoundError when there is nothing there to list (locally)."""
    if isinstance(fs, LocalFileSystem):
        yield from _walk_local(base)
        return
    kind = type(fs).__module__.split(".")[0]
    if kind == "s3fs":
        yield from _pages(fs, _s3_names(fs, base))
    elif kind == "adlfs":
        yield from _pages(fs, _azure_names(fs, base))
    else:  # another fsspec backend: its own listing, all at once
        yield from fs.find(base)


def _walk_local(base: str) -> Iterator[str]:
    """Regular files below ``base``; folders are walked with a stack of their own, links to
    folders are not followed."""
    if not os.path.isdir(base):
        raise FileNotFoundError(base)
    pending = [base]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file():
                    yield entry.path


def _pages(fs: AbstractFileSystem, names: AsyncIterator[str]) -> Iterator[str]:
    """Drive the async generator ``names`` on the filesystem's event loop, ``PAGE`` names a call."""

    async def next_page() -> tuple[list[str], bool]:
        page: list[str] = []
        try:
            while len(page) < PAGE:
                page.append(await names.__anext__())
        except StopAsyncIteration:
            return page, True
        return page, False

    done = False
    while not done:
        page, done = sync(fs.loop, next_page)
        yield from page


async def _s3_names(fs: Any, base: str) -> AsyncIterator[str]:
    bucket, key, _ = fs.split_path(base)
    prefix = f"{key.strip('/')}/" if key.strip("/") else ""
    # No delimiter: every object below the prefix, in pages of list-objects-v2.
    async for info in fs._iterdir(bucket, delimiter="", prefix=prefix):
        if info.get("type") == "file":
            yield str(info["name"])


async def _azure_names(fs: Any, base: str) -> AsyncIterator[str]:
    container, path, _ = fs.split_path(base)
    prefix = f"{path.strip('/')}/" if path.strip("/") else None
    from azure.core.exceptions import ResourceNotFoundError

    client = fs.service_client.get_container_client(container)
    try:
        async for blob in client.list_blobs(name_starts_with=prefix, include=["metadata"]):
            # A hierarchical namespace lists its folders as empty blobs marked as such.
            if (blob.metadata or {}).get("hdi_isfolder") != "true":
                yield f"{container}/{blob.name}"
    except ResourceNotFoundError:
        return  # no such container: nothing listed, as fsspec's find says (a write then says why)


class AtomicWriter:
    """One file written from chunks and committed by ``commit()``; ``discard()`` leaves the old
    file (or none) in place. Raises the backend's own errors (the caller words them)."""

    def __init__(self, fs: AbstractFileSystem, full: str, temporary_marker: str) -> None:
        self.fs, self.full = fs, full
        self.written = 0
        self.local = isinstance(fs, LocalFileSystem)
        if self.local:
            folder, name = os.path.split(full)
            os.makedirs(folder or ".", exist_ok=True)
            self.temporary = os.path.join(folder, f".{name}{temporary_marker}{uuid.uuid4().hex[:12]}")
            self.handle: Any = open(self.temporary, "wb")  # noqa: SIM115 (closed by commit/discard)
        else:
            self.handle = fs.open(full, "wb", block_size=BLOCK_BYTES)

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.written += len(data)

    def commit(self) -> None:
        if self.local:
            self.handle.close()
            os.replace(self.temporary, self.full)
        elif self.written == 0:
            # An empty object: one plain upload (an empty block list or part list is not portable).
            self._abandon()
            self.fs.pipe_file(self.full, b"")
        else:
            self.handle.close()  # completes the multipart upload / commits the block list

    def discard(self) -> None:
        """Throw the partial file away; never raises."""
        try:
            if self.local:
                self.handle.close()
                if os.path.exists(self.temporary):
                    os.unlink(self.temporary)
            else:
                self._abandon()
        except Exception:
            pass  # an upload never committed is invisible, and expires

    def _abandon(self) -> None:
        """Close a remote handle without committing: abort S3's multipart upload; Azure's staged
        blocks are never committed (the service drops them within a week)."""
        self.handle.discard()
        self.handle.forced = True  # fsspec's close() then skips its final flush, which would commit
        self.handle.close()
