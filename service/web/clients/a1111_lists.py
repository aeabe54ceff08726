"""The AUTOMATIC1111 routes scripts probe before or beside txt2img, in A1111's shapes: the lists of
what this server does not have are empty (face restorers, styles, hypernetworks, embeddings,
scripts), the refreshes are no-ops (the served checkpoint and adapters are fixed at start-up), and
cmd-flags and memory say what they can. ``webuiapi``'s ``refresh_checkpoints``, ``get_scripts``,
``get_memory``... and the Krita plugin's handshake read these; a 404 there ended the script.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request

from service.web.clients.common import lifecycle_of

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])
# POSTs without a body (the media-type rule skips them).
BODYLESS = frozenset({"/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-vae"})


@router.post("/refresh-checkpoints", summary="No-op: the served checkpoint is fixed at start-up")
def refresh_checkpoints() -> None:
    return None


@router.post("/refresh-loras", summary="No-op: SD_ADAPTERS is read at start-up (GET /sdapi/v1/loras)")
def refresh_loras() -> None:
    return None


@router.post("/refresh-vae", summary="No-op: the model's own VAE is used")
def refresh_vae() -> None:
    return None


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
