"""diffusers' Stable Diffusion safety checker, run on the batch's device without PIL.

The reference path converts images to PIL, lets CLIPImageProcessor resize (bicubic, shortest
edge), centre-crop and normalise, then calls the checker, which copies scores to the host per
image. Here the same steps run on tensors for the whole batch, and flags stay on the device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _edge(value: Any, key: str) -> int | None:
    """A field of an image processor's size: a plain int, a dict, or transformers' SizeDict."""
    if isinstance(value, int | float):
        return int(value)
    field = value.get(key) if hasattr(value, "get") else getattr(value, key, None)
    return None if field is None else int(field)


def preprocess(images: torch.Tensor, feature_extractor: Any) -> torch.Tensor:
    """Bx3xHxW images in [0,1] -> CLIP pixel values, as CLIPImageProcessor computes them.

    Steps: 1) quantise to 8-bit as the PIL path does, 2) resize the shortest edge (bicubic,
    antialiased like PIL), 3) centre crop, 4) rescale and normalise.
    """
    config = feature_extractor
    pixels = (images.float() * 255).round()
    # 2) shortest edge -> size, the other edge keeps the aspect ratio (truncated, as transformers does)
    short = _edge(config.size, "shortest_edge") or _edge(config.size, "height") or 224
    height, width = pixels.shape[-2:]
    if height <= width:
        new_size = (short, int(short * width / height))
    else:
        new_size = (int(short * height / width), short)
    pixels = F.interpolate(pixels, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    pixels = pixels.round().clamp(0, 255)
    # 3) centre crop
    crop_h = _edge(config.crop_size, "height") or short
    crop_w = _edge(config.crop_size, "width") or short
    top = (pixels.shape[-2] - crop_h) // 2
    left = (pixels.shape[-1] - crop_w) // 2
    pixels = pixels[..., top : top + crop_h, left : left + crop_w]
    # 4) rescale + normalise
    # float32 as stated, not the default dtype: a model loading in the background changes that
    mean = torch.tensor(config.image_mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    result: torch.Tensor = (pixels * float(config.rescale_factor) - mean) / std
    return result


def _cosine(image_embeds: torch.Tensor, concept_embeds: torch.Tensor) -> torch.Tensor:
    return F.normalize(image_embeds, dim=-1) @ F.normalize(concept_embeds, dim=-1).T


@torch.no_grad()
def nsfw_flags(checker: Any, clip_input: torch.Tensor) -> torch.Tensor:
    """Per-image boolean flags with the checker's own thresholds (its forward(), vectorised).

    A "special care" concept above its threshold lowers every concept threshold by 0.01; scores
    are rounded to 3 decimals before comparison, as diffusers does.
    """
    pooled = checker.vision_model(clip_input.to(checker.dtype))[1]
    image_embeds = checker.visual_projection(pooled).float()
    special = _cosine(image_embeds, checker.special_care_embeds.float())
    special_scores = torch.round(special - checker.special_care_embeds_weights.float(), decimals=3)
    adjustment = (special_scores > 0).any(dim=1, keepdim=True).float() * 0.01
    concepts = _cosine(image_embeds, checker.concept_embeds.float())
    concept_scores = torch.round(concepts - checker.concept_embeds_weights.float() + adjustment, decimals=3)
    flags: torch.Tensor = (concept_scores > 0).any(dim=1)
    return flags
