"""The AUTOMATIC1111 routes scripts probe before or beside txt2img, in A1111's shapes: the served
checkpoints (``sd-models``, with their hashes once computed: ``Checkpoints``), the lists of what this
server does not have are empty (face restorers, styles, hypernetworks, embeddings, scripts), the
refreshes are no-ops (the checkpoints and adapters are fixed at start-up), and cmd-flags and memory
say what they can. ``webuiapi``'s ``refresh_checkpoints``, ``get_scripts``, ``get_memory``... and
the Krita plugin's handshake read these; a 404 there ended the script.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from model.library import ModelEntry, inspect_entry
from model.library.hashes import content_hash, short_hash
from service.runtime.lifecycle import Lifecycle
from service.web.clients.common import app_state, lifecycle_of, served_names

log = logging.getLogger(__name__)

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])
# POSTs without a body (the media-type rule skips them).
BODYLESS = frozenset({"/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-vae"})


@router.post("/refresh-checkpoints", summary="No-op: the served checkpoints are fixed at start-up")
def refresh_checkpoints() -> None:
    return None


@router.post("/refresh-loras", summary="No-op: SD_ADAPTERS is read at start-up (GET /sdapi/v1/loras)")
def refresh_loras() -> None:
    return None


@router.post("/refresh-vae", summary="No-op: the model's own VAE is used")
def refresh_vae() -> None:
    return None


# ----------------------------------------------------------------------------- the checkpoints
@dataclass(frozen=True)
class Checkpoint:
    """One served checkpoint as A1111 lists it: ``name`` is what requests name it by."""

    name: str
    filename: str  # a display name (the name and the file's suffix), never a path of the server
    sha256: str | None  # None until computed (or when it cannot be)

    @property
    def title(self) -> str:
        """A1111's title, "name [hash]" (the name alone until the hash is known): clients send it back."""
        return f"{self.name} [{short_hash(self.sha256)}]" if self.sha256 else self.name

    def listed(self) -> dict[str, Any]:
        """Its entry of GET /sdapi/v1/sd-models."""
        short = short_hash(self.sha256) if self.sha256 else None
        return {
            "title": self.title,
            "model_name": self.name,
            "hash": short,
            "sha256": self.sha256,
            "filename": self.filename,
            "config": None,
        }


DEFAULT = ""  # the default model's key among the hashes (its names are SD_SERVED_MODEL_NAMES' too)


class Checkpoints:
    """The served checkpoints with their content hashes (model/library/hashes.py: A1111's sha256),
    computed once, in a background thread (a folder of gigabytes takes a while; the hashes are
    cached under SD_DATA_DIR for the next start): until then a checkpoint has no hash."""

    def __init__(self) -> None:
        self._hashes: dict[str, str | None] = {}
        self._started = False
        self._lock = threading.Lock()

    def listed(self, lifecycle: Lifecycle) -> list[Checkpoint]:
        """The default model (under each name it answers to), then the library's models."""
        library = lifecycle.require_ready().scorer.library
        self._start(lifecycle)
        spec = lifecycle.settings.model_spec
        default = [
            Checkpoint(name, _filename(name, spec), self._hashes.get(DEFAULT))
            for name in served_names(lifecycle)
        ]
        entries = library.entries.values()
        return default + [
            Checkpoint(e.name, _filename(e.name, e.spec), self._hashes.get(e.name)) for e in entries
        ]

    def of(self, lifecycle: Lifecycle, model: str | None) -> Checkpoint:
        """The checkpoint of a canonical model name (None: the default one)."""
        listed = self.listed(lifecycle)
        return next((each for each in listed if each.name == model), listed[0])

    def _start(self, lifecycle: Lifecycle) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        entries = dict(lifecycle.require_ready().scorer.library.entries)
        settings = lifecycle.settings
        thread = threading.Thread(
            target=self._compute,
            args=(settings, entries, settings.jobs_folder),
            name="checkpoint-hashes",
            daemon=True,
        )
        thread.start()

    def _compute(self, settings: Any, entries: dict[str, ModelEntry], cache: Path) -> None:
        try:
            default = inspect_entry(
                settings.model_spec, config=settings.model_config_dir, variant=settings.model_variant
            )
            self._hashes[DEFAULT] = content_hash(default, cache)
        except Exception as error:  # no hash for the default model: it is listed without one
            log.warning("the default model's hash cannot be computed: %s", error)
        for name, entry in entries.items():
            try:
                self._hashes[name] = content_hash(entry, cache)
            except Exception as error:  # that entry is listed without a hash
                log.warning("model %s: its hash cannot be computed: %s", name, error)


def _filename(name: str, spec: str) -> str:
    """What A1111's ``filename`` shows: the name, with the checkpoint file's suffix when it is one."""
    suffix = Path(spec).suffix
    return name + suffix if suffix in (".safetensors", ".ckpt") and not name.endswith(suffix) else name


def checkpoints_of(request: Request) -> Checkpoints:
    return app_state(request, "a1111_checkpoints", Checkpoints)


@router.get("/sd-models", summary="The served checkpoints: the default one first, then the library's")
def sd_models(request: Request) -> list[dict[str, Any]]:
    return [each.listed() for each in checkpoints_of(request).listed(lifecycle_of(request))]


@router.get("/cmd-flags", summary="A1111's command-line flags, as this server behaves")
def cmd_flags(request: Request) -> dict[str, Any]:
    settings = lifecycle_of(request).settings
    return {"api": True, "nowebui": True, "api_auth": bool(settings.api_key_list), "xformers": False}


@router.get("/scripts", summary="Scripts: none (txt2img runs no scripts here)")
def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/embeddings", summary="Textual-inversion embeddings: none")
def embeddings() -> dict[str, dict[str, Any]]:
    return {"loaded": {}, "skipped": {}}


# What A1111 lists and this server has none of: each answers an empty list.
NOTHING = {
    "/script-info": "Scripts' arguments: none",
    "/face-restorers": "Face restorers: none (restore_faces must be false)",
    "/prompt-styles": "Saved styles: none (styles must be empty)",
    "/hypernetworks": "Hypernetworks: none",
    "/realesrgan-models": "Real-ESRGAN models: none",
    "/extensions": "A1111 extensions: none",
    "/latent-upscale-modes": "Latent upscale modes: none",
    "/sd-vae": "Separate VAEs: none (the model's own is used)",
}


def _nothing() -> list[dict[str, Any]]:
    return []


for _path, _summary in NOTHING.items():
    router.add_api_route(_path, _nothing, methods=["GET"], summary=_summary)


def _ram() -> dict[str, Any]:
    """The machine's memory in bytes, from the kernel's page counts (A1111 reads psutil's)."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports them
        return {"error": "the memory of this machine is not reported"}
    return {"free": free, "used": total - free, "total": total}


@router.get("/memory", summary="The machine's memory (GPU memory: not reported)")
def memory() -> dict[str, Any]:
    return {"ram": _ram(), "cuda": {"error": "GPU memory is not reported by this server"}}
