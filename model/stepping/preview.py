"""Previews of running items, decoded cheaply from their latents.

With a tiny decoder (diffusers' ``AutoencoderTiny``, the TAESD family: SD_PREVIEW_DECODER) a
preview is the image at full size, for a few milliseconds of the device. The default is a linear
map of the latent channels to RGB (no weights, a few multiply-adds per latent pixel: well under a
millisecond), at the latents' own resolution, 1/8 of the image's side. Its coefficients are the
least-squares fit of Stable Diffusion 1.x/2.x's VAE that AUTOMATIC1111's "Approx cheap" preview
uses; a model with another number of latent channels shows its first three.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from model.errors import ModelLoadError

# rows: the four latent channels; columns: their weight in R, G and B (output in about [-1, 1])
SD_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


def linear_preview(latents: torch.Tensor) -> np.ndarray:
    """1 x C x h x w latents -> h x w x 3 uint8 RGB."""
    sample = latents[0].float()
    if sample.shape[0] == len(SD_LATENT_RGB):
        weights = torch.tensor(SD_LATENT_RGB, dtype=torch.float32, device=sample.device)
        rgb = torch.einsum("chw,cr->rhw", sample, weights)
    else:
        rgb = sample[:3] if sample.shape[0] >= 3 else sample[:1].expand(3, -1, -1)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())


def load_tiny_decoder(folder: str, device: torch.device, dtype: torch.dtype) -> Any:
    """An AutoencoderTiny saved with ``save_pretrained`` in ``folder``; ModelLoadError if there is none."""
    from diffusers import AutoencoderTiny

    try:
        decoder = AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(
            "SD_PREVIEW_DECODER: no AutoencoderTiny could be loaded from that folder "
            f"({type(error).__name__}); give a folder an AutoencoderTiny was saved to, or unset it"
        ) from None
    return decoder.to(device).eval()


def tiny_preview(decoder: Any, latents: torch.Tensor) -> np.ndarray:
    """1 x C x h x w latents -> the image's H x W x 3 uint8, through the tiny decoder (it takes the
    scaled latents as the UNet leaves them)."""
    images: torch.Tensor = decoder.decode(latents.to(decoder.dtype), return_dict=False)[0]
    pixels = ((images[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy())
