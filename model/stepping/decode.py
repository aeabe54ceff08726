"""Retirement: finished latents -> VAE decode (padded to a decoder bucket) -> safety checker ->
images, with flagged ones exactly black; then one device-to-host copy for the whole batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from model.errors import EngineFailure
from model.safety import nsfw_flags, preprocess
from model.stepping.rows import new_graph_step, padded, plan
from model.types import GenerationResult


def decode(
    vae: Any,
    latents: torch.Tensor,
    buckets: Sequence[int] | None,
    check_finite: bool,
    cuda_graphs: bool,
) -> torch.Tensor:
    """Latents of one size to images in [0,1]; a non-finite pixel is an engine failure, never an
    image."""
    parts = []
    for start, stop, size in plan(latents.shape[0], buckets):
        if cuda_graphs:
            new_graph_step()
        rows = padded(latents[start:stop], size) / vae.config.scaling_factor
        decoded: torch.Tensor = vae.decode(rows, return_dict=False)[0][: stop - start]
        if check_finite and not bool(torch.isfinite(decoded).all()):
            raise EngineFailure("the model produced NaN or Inf values; no image was returned")
        parts.append((decoded / 2 + 0.5).clamp(0, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def safety(components: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The safety checker's flags; flagged images become exactly black."""
    if components.safety_checker is None:
        return images, None
    flags = nsfw_flags(components.safety_checker, preprocess(images, components.feature_extractor))
    return images.masked_fill(flags.view(-1, 1, 1, 1), 0.0), flags


def to_results(
    images: list[torch.Tensor], flags: list[torch.Tensor | None], seeds: Sequence[int]
) -> list[GenerationResult]:
    """Images (groups of Bx3xHxW in [0,1], any sizes) and flags -> results, in order, with one
    device-to-host copy: pixels and flags travel in one uint8 buffer."""
    pixels = [(group * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous() for group in images]
    flag_bytes = [f.to(torch.uint8) for f in flags if f is not None]
    host = torch.cat([p.flatten() for p in pixels] + flag_bytes).cpu().numpy()
    arrays: list[np.ndarray] = []
    offset = 0
    for group in pixels:
        count = group.numel()
        arrays.extend(host[offset : offset + count].reshape(group.shape))
        offset += count
    host_flags: list[bool | None] = []
    for group, group_flags in zip(pixels, flags, strict=True):
        if group_flags is None:
            host_flags.extend([None] * group.shape[0])
        else:
            host_flags.extend(bool(f) for f in host[offset : offset + group.shape[0]])
            offset += group.shape[0]
    return [
        GenerationResult(image=np.ascontiguousarray(array), nsfw_content_detected=flag, seed=seed)
        for array, flag, seed in zip(arrays, host_flags, seeds, strict=True)
    ]
