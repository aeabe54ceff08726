"""Weights as users bring them: folders written by diffusers' own ``save_pretrained`` (no marker
file, nothing of this project's), and single checkpoint files converted from them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


def save_with_diffusers(out: Path, arch: str = "tiny", seed: int = 0, **save: Any) -> Path:
    """random:<arch>:<seed>'s components, saved by ``StableDiffusionPipeline.save_pretrained``.

    ``save`` goes to save_pretrained as is (``variant="fp16"``, ...).
    """
    from diffusers import StableDiffusionPipeline

    from model.architectures import build_components

    parts = build_components(arch, seed)
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=parts["safety_checker"] is not None)
    if save.get("variant") == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=save.pop("safe_serialization", True), **save)
    return out


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
