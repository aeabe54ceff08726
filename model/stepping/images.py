"""Images in: image to image (SDEdit) and inpainting, prepared at admission as diffusers'
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline prepare one image.

The order of the draws from the item's generator is the pipelines' (the VAE's latent sample of the
image, then the noise, then the masked image's sample), so that a seed gives what diffusers gives.
An inpainting model (a UNet with 9 input channels) runs every item as the inpainting pipeline
does: a text-to-image item there is an inpainting with nothing kept (a mask of ones, strength 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from model.errors import InvalidRequestError
from model.types import GenerationItem

INPAINTING_CHANNELS = 9  # latents, mask, masked-image latents
_HOST = torch.device("cpu")


@dataclass(eq=False)
class Inpainting:
    """What every step of an inpainted item needs beside its latents (mask: 1 where repainted)."""

    mask: torch.Tensor  # 1 x 1 x h x w, 0 or 1, at the latents' size
    masked_latents: torch.Tensor | None  # 9-channel UNets: the kept pixels' latents, UNet input
    image_latents: torch.Tensor | None  # 4-channel UNets: the image's latents, blended back
    noise: torch.Tensor | None  # ... noised with the item's initial noise

    def unet_input(self, scaled: torch.Tensor) -> torch.Tensor:
        """A 9-channel UNet takes the mask and the masked image's latents after the latents."""
        if self.masked_latents is None:
            return scaled
        return torch.cat([scaled, self.mask, self.masked_latents], dim=1)

    def blend(
        self, latents: torch.Tensor, scheduler: Any, next_timestep: torch.Tensor | None
    ) -> torch.Tensor:
        """A 4-channel UNet's step result with the kept region put back: the image's latents noised
        to the next timestep (none after the last step), as the pipeline does after each step."""
        if self.image_latents is None or self.noise is None:
            return latents
        proper = self.image_latents
        if next_timestep is not None:
            proper = scheduler.add_noise(proper, self.noise, next_timestep)
        return (1 - self.mask) * proper + self.mask * latents


def check_images(item: GenerationItem) -> None:
    """InvalidRequestError, naming the field, for image inputs the engine cannot take: arrays of
    another size or type than the item's, a strength outside (0, 1] or one that leaves no step,
    a mask without an image."""
    if not (isinstance(item.strength, int | float) and 0 < item.strength <= 1):
        raise InvalidRequestError(f"strength must be in (0, 1], got {item.strength!r}")
    size = f"{item.height}x{item.width}"
    if item.init_image is not None:
        image = item.init_image
        if not (
            isinstance(image, np.ndarray)
            and image.dtype == np.uint8
            and image.shape == (item.height, item.width, 3)
        ):
            raise InvalidRequestError(
                f"init_image must be a {size}x3 uint8 RGB array (the item's height x width), "
                f"got {_described(image)}"
            )
        if remaining_steps(item.num_inference_steps, item.strength) < 1:
            raise InvalidRequestError(
                f"strength {item.strength} leaves no step of {item.num_inference_steps}: strength times "
                "num_inference_steps must be at least 1"
            )
    if item.mask is not None:
        if item.init_image is None:
            raise InvalidRequestError(
                "mask needs an init_image: it marks which of the image's pixels to repaint"
            )
        mask = item.mask
        if not (
            isinstance(mask, np.ndarray)
            and mask.dtype == np.uint8
            and mask.shape == (item.height, item.width)
        ):
            raise InvalidRequestError(
                f"mask must be a {size} uint8 array (the item's height x width; 255: repaint), "
                f"got {_described(mask)}"
            )


def _described(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"shape {'x'.join(map(str, value.shape))} of {value.dtype}"
    return type(value).__name__


def is_inpainting_unet(unet: Any) -> bool:
    return int(unet.config.in_channels) == INPAINTING_CHANNELS


def remaining_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` an item of ``strength`` runs (diffusers' get_timesteps)."""
    return min(int(steps * strength), steps)


def start_at(scheduler: Any, steps: int, strength: float) -> int:
    """The index in ``scheduler.timesteps`` of the item's first step; the scheduler is told, as
    get_timesteps tells it (its step counter starts there)."""
    start = max(steps - remaining_steps(steps, strength), 0) * int(scheduler.order)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return start


def pixels(image: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW in [-1, 1], as VaeImageProcessor.preprocess makes it: in fp32 on the
    host, channels last in memory (a transposed view). The layout matters: an image of one colour
    (a masked image with everything masked) sits where the VAE encoder's group norms amplify
    rounding, so a kernel that sums in another order gives visibly other latents."""
    array = image[None].astype(np.float32) / 255.0
    tensor = 2.0 * torch.from_numpy(array.transpose(0, 3, 1, 2)) - 1.0
    return tensor.to(device=device, dtype=dtype)


def repainted(mask: np.ndarray | None, height: int, width: int) -> torch.Tensor:
    """HxW uint8 (none: all repainted) -> 1x1xHxW of 0 and 1 (1: repaint), binarised at 0.5 of 255
    on the host as VaeImageProcessor's mask processor does."""
    array = mask if mask is not None else np.full((height, width), 255, np.uint8)
    tensor = torch.from_numpy(array[None, :, :, None].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return (tensor >= 0.5).to(torch.float32)


# The VAE encoder's latent distribution of one image: its mean and standard deviation.
Moments = tuple[torch.Tensor, torch.Tensor]


def encodes_of(components: Any, item: GenerationItem) -> dict[str, torch.Tensor]:
    """The images an item's preparation encodes, 1x3xHxW on the host in fp32: "image" (image to
    image; inpainting, unless a 9-channel UNet repaints all of it from noise) and "masked" (the kept
    pixels, a 9-channel UNet's input). Asked for before any item is prepared, so that the encodes of
    the items admitted together run as one encoder pass per size (``encoder_moments``)."""
    nine = is_inpainting_unet(components.unet)
    if item.mask is None and not nine:
        return {} if item.init_image is None else {"image": pixels(item.init_image, _HOST, torch.float32)}
    full = item.init_image is None or item.strength == 1.0
    source = (
        item.init_image if item.init_image is not None else np.zeros((item.height, item.width, 3), np.uint8)
    )
    image = pixels(source, _HOST, torch.float32)
    wanted = {} if nine and full else {"image": image}
    if nine:
        wanted["masked"] = image * (repainted(item.mask, item.height, item.width) < 0.5)
    return wanted


def encoder_moments(
    vae: Any, images: list[torch.Tensor], device: torch.device, dtype: torch.dtype
) -> list[Moments]:
    """Each image's latent distribution, from one encoder pass per size and memory layout: a batch
    keeps its images' layout, which decides the encoder's rounding (see ``pixels``). Each item then
    draws its own sample with its own generator, in the pipeline's order (``sample_latents``)."""
    found: dict[int, Moments] = {}
    by_size: dict[tuple[Any, ...], list[int]] = {}
    for index, image in enumerate(images):
        # An image of one colour per channel (a masked image with everything repainted) goes alone:
        # the encoder's group norms divide its rounding by a variance of about zero, so a batch's
        # other summation order would give other latents than the pipeline's own pass.
        alone = index if bool((image.amax(dim=(2, 3)) == image.amin(dim=(2, 3))).all()) else None
        by_size.setdefault((tuple(image.shape), _channels_last(image), alone), []).append(index)
    for (_, last, _), indices in by_size.items():
        batch = images[indices[0]]
        if len(indices) > 1:
            layout = torch.channels_last if last else torch.contiguous_format
            batch = torch.cat([images[index] for index in indices]).contiguous(memory_format=layout)
        distribution = vae.encode(batch.to(device=device, dtype=dtype)).latent_dist
        for row, index in enumerate(indices):
            found[index] = (distribution.mean[row : row + 1], distribution.std[row : row + 1])
    return [found[index] for index in range(len(images))]


def _channels_last(image: torch.Tensor) -> bool:
    """Whether an image lies channels last in memory (``pixels``' view) rather than planar (a
    masked image, a product with the planar mask)."""
    return image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()


def sample_latents(vae: Any, moments: Moments, generator: torch.Generator) -> torch.Tensor:
    """A sample of an image's latent distribution, scaled: diffusers' retrieve_latents, one draw of
    the item's generator."""
    mean, std = moments
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    scaled: torch.Tensor = vae.config.scaling_factor * (mean + std * noise)
    return scaled


def img2img_latents(
    components: Any,
    scheduler: Any,
    generator: torch.Generator,
    start: int,
    dtype: torch.dtype,
    encoded: dict[str, Moments],
) -> torch.Tensor:
    """StableDiffusionImg2ImgPipeline.prepare_latents: 1) the image's latent sample, 2) the noise,
    3) the image's latents noised to the first timestep the item runs."""
    device = generator.device
    # 1) the image's sample from the VAE encoder's distribution, drawn first
    image_latents = sample_latents(components.vae, encoded["image"], generator)
    # 2) the noise
    noise = torch.randn(image_latents.shape, generator=generator, device=device, dtype=dtype)
    # 3) forward diffusion to where the item starts
    noised: torch.Tensor = scheduler.add_noise(image_latents, noise, scheduler.timesteps[start : start + 1])
    return noised


def inpaint_latents(
    components: Any,
    item: GenerationItem,
    scheduler: Any,
    generator: torch.Generator,
    start: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    encoded: dict[str, Moments],
) -> tuple[torch.Tensor, Inpainting]:
    """StableDiffusionInpaintPipeline's preparation: the initial latents and what each step needs.

    Steps: 1) the image's latent sample (4-channel UNets blend it back; below strength 1 it is
    also the start), 2) the noise and the initial latents, 3) the binarised mask and the masked
    image, 4) the masked image's latent sample (a UNet input for 9-channel UNets), 5) the mask at
    the latents' size.
    """
    device = generator.device
    vae, nine = components.vae, is_inpainting_unet(components.unet)
    height, width = item.height, item.width
    strength = item.strength if item.init_image is not None else 1.0
    full = strength == 1.0
    # 1) the image's latents, drawn first where the pipeline encodes it (an inpainting model's
    #    text-to-image item: a black image, all of it repainted, as diffusers is given one)
    image_latents = sample_latents(vae, encoded["image"], generator) if "image" in encoded else None
    # 2) the noise; at strength 1 the start is pure noise, else the image noised to the start
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if full:
        latents = noise * scheduler.init_noise_sigma
    else:
        assert image_latents is not None
        latents = scheduler.add_noise(image_latents, noise, scheduler.timesteps[start : start + 1])
    # 3) the mask (on the host, as the pipeline's processors make it; the kept pixels were encoded)
    condition = repainted(item.mask, height, width)
    # 4) the masked image's sample; a 4-channel UNet never uses it, but the pipeline draws it from the
    #    generator all the same: the same draw (no encoder pass) keeps later draws (ancestral steps) equal
    latent_shape = (1, vae.config.latent_channels, *shape[2:])
    if nine:
        masked_latents: torch.Tensor | None = sample_latents(vae, encoded["masked"], generator)
    else:
        torch.randn(latent_shape, generator=generator, device=device, dtype=vae.dtype)
        masked_latents = None
    # 5) the mask at the latents' size (nearest), as prepare_mask_latents resizes it
    mask = torch.nn.functional.interpolate(condition, size=tuple(shape[2:])).to(device, dtype)
    blend_source = None if nine else image_latents
    return latents, Inpainting(mask, masked_latents, blend_source, None if nine else noise)
