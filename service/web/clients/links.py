"""OpenAI's ``url`` answers: each image kept for a bounded time in a bounded store, behind a link
nobody can guess, served by ``GET /v1/images/files/{token}.png``.

Clients built for DALL-E read ``data[0].url`` (LangChain's DallEAPIWrapper, LiteLLM users) or fetch
it (Open WebUI). OpenAI's links last 60 minutes; so do these by default (SD_IMAGE_LINK_TTL_S). The
store holds at most SD_IMAGE_LINK_MAX_BYTES of PNGs, the least recently used leaving first, in
memory or, with SD_IMAGE_LINK_DIR, in files (one per image, removed when it leaves). The token is
256 random bits: the link itself is the permission to read the image (as OpenAI's signed links
are), so it works from a browser or a client that sends no key; it is never logged (the access log
writes the route's template, not the path).
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.settings import Settings
from service.web.errors import LinkNotFoundError

PREFIX = "/v1/images/files/"
TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
router = APIRouter(tags=["openai"])


@dataclass
class _Entry:
    expires: float
    size: int
    data: bytes | None  # in memory; None when the file in the store's folder holds it


class ImageLinks:
    """Tokens -> PNGs, each until ``ttl_s`` after it was stored, at most ``max_bytes`` in all (the
    least recently read or stored leaves first); thread-safe (the event loop and encoders share it)."""

    def __init__(
        self,
        ttl_s: float,
        max_bytes: int,
        folder: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.max_bytes, self.folder, self._clock = ttl_s, max_bytes, folder, clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        if folder is not None:  # links of an earlier process are gone with its tokens
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.png"):
                if TOKEN.fullmatch(stale.stem):
                    stale.unlink(missing_ok=True)

    def put(self, png: bytes) -> str:
        """Keep ``png``; its token. An image larger than the whole store is kept by none."""
        token = secrets.token_urlsafe(32)
        if len(png) > self.max_bytes:
            raise ValueError(f"an image of {len(png)} bytes exceeds SD_IMAGE_LINK_MAX_BYTES")
        if self.folder is not None:
            self._write(token, png)
        with self._lock:
            self._expire()
            while self._entries and self._bytes + len(png) > self.max_bytes:
                self._drop(next(iter(self._entries)))
            data = None if self.folder is not None else png
            self._entries[token] = _Entry(self._clock() + self.ttl_s, len(png), data)
            self._bytes += len(png)
        return token

    def get(self, token: str) -> tuple[bytes, float] | None:
        """The PNG of ``token`` and its seconds left; None when it is unknown or expired."""
        with self._lock:
            self._expire()
            entry = self._entries.get(token)
            if entry is None:
                return None
            self._entries.move_to_end(token)
            left = entry.expires - self._clock()
        data = entry.data if entry.data is not None else self._read(token)
        return (data, left) if data is not None else None

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ internals (under the lock)
    def _expire(self) -> None:
        now = self._clock()
        for token in [token for token, entry in self._entries.items() if entry.expires <= now]:
            self._drop(token)

    def _drop(self, token: str) -> None:
        entry = self._entries.pop(token)
        self._bytes -= entry.size
        if self.folder is not None:
            (self.folder / f"{token}.png").unlink(missing_ok=True)

    def _write(self, token: str, png: bytes) -> None:
        """Atomically: a reader sees the whole file or none."""
        assert self.folder is not None
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".part")
        with os.fdopen(handle, "wb") as file:
            file.write(png)
        os.replace(temporary, self.folder / f"{token}.png")

    def _read(self, token: str) -> bytes | None:
        assert self.folder is not None
        try:
            return (self.folder / f"{token}.png").read_bytes()
        except FileNotFoundError:  # dropped between the lookup and the read
            return None


def links_from(settings: Settings) -> ImageLinks:
    return ImageLinks(settings.image_link_ttl_s, settings.image_link_max_bytes, settings.image_link_dir)


def links_of(request: Request) -> ImageLinks:
    links: ImageLinks = request.app.state.image_links
    return links


def link_url(request: Request, token: str) -> str:
    """The absolute link, on the scheme and host the client reached this server by."""
    return f"{str(request.base_url).rstrip('/')}{PREFIX}{token}.png"


@router.get(
    PREFIX + "{name}",
    summary="An image of a url answer (open: the link is the permission), until it expires",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "Unknown or expired."}},
)
def image_file(name: str, request: Request) -> Response:
    token = name.removesuffix(".png")
    found = links_of(request).get(token) if TOKEN.fullmatch(token) and name.endswith(".png") else None
    if found is None:
        raise LinkNotFoundError(
            "this image link is unknown or expired (links last SD_IMAGE_LINK_TTL_S seconds, and the "
            "oldest leave first when the store is full); generate the image again"
        )
    png, left = found
    headers = {"Cache-Control": f"private, max-age={max(int(left), 0)}", "Referrer-Policy": "no-referrer"}
    return Response(png, media_type="image/png", headers=headers)
