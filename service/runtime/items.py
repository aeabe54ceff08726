"""The one way to build a ``GenerationItem`` from request or job parameters, and the seed rules.

Online (service/runtime/protocols/, one module per protocol) and batch (service/batch/params.py)
both describe a request as an ``Ask`` and build its items here, so that a default (native size,
the model's own scheduler) and the seed numbering mean the same on every path.

Seeds: the engine's bound is ``model.types.MAX_SEED`` (schemas/score.py repeats the number for
the wire schema, which imports nothing from the project; a test keeps the two equal). Seeds the
service chooses itself (random per request, derived per batch row) are drawn below
``SEED_DRAW_RANGE`` so that people can read them and type them back.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from model.types import DEFAULT_SCHEDULER, MAX_SEED, GenerationItem, ModelInfo, adapter_set
from schemas.fields import DEFAULT_IMAGE_STRENGTH, DEFAULT_INPAINT_STRENGTH, MAX_SIZE, MIN_SIZE
from service.images_in import ImageInputError, UrlPolicy, output_size, read_image, to_mask, to_rgb

SEED_DRAW_RANGE = 2**32

__all__ = ["MAX_SEED", "SEED_DRAW_RANGE", "Ask", "Picture", "Prompt", "random_seed", "seed_in_range"]


def random_seed() -> int:
    return secrets.randbelow(SEED_DRAW_RANGE)


def seed_in_range(seed: int) -> bool:
    return not isinstance(seed, bool) and isinstance(seed, int) and 0 <= seed <= MAX_SEED


@dataclass(frozen=True)
class Picture:
    """An image in, as the client sent it (base64, a URL or the file's bytes), with the request
    fields it came in, which its errors name. ``mask`` marks what to repaint: white, or where
    ``mask_alpha`` is transparent (OpenAI's masks); ``mask_invert`` swaps the two (A1111's)."""

    image: str | bytes | Image.Image  # an Image: decoded and prepared already (A1111's img2img)
    field: str
    mask: str | bytes | Image.Image | None = None
    mask_field: str = "mask"
    mask_alpha: bool = False
    mask_invert: bool = False


@dataclass(frozen=True)
class Pixels:
    """A picture decoded at the size its images are drawn."""

    height: int
    width: int
    image: np.ndarray
    mask: np.ndarray | None


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its text, its negative prompt, its own seed (its images get
    seed, seed + 1, ...; None: the request's numbering) and the image it starts from, if any."""

    text: str
    negative: str = ""
    seed: int | None = None
    picture: Picture | None = None


@dataclass(frozen=True)
class Ask:
    """What one request asks of the engine, whatever protocol it came in. Each protocol maps its
    own schema to this once (service/runtime/protocols/), and ``items`` is the one place where a
    ``GenerationItem``'s fields are spelled. None for height, width or scheduler: the model's own."""

    prompts: tuple[Prompt, ...]
    steps: int
    guidance: float
    per_prompt: int = 1  # images per prompt
    seed: int | None = None  # the request's base: its n-th image gets seed + n (None: one drawn)
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None  # the engine's name, checked against the model already
    adapters: Mapping[str, float] | None = None  # LoRA adapter names and scales
    eta: float = 0.0
    clip_skip: int = 0
    strength: float | None = None  # images in: None is diffusers' default (0.8; 1 with a mask)
    # The model the request names, as it names it (None: the default), and the request's field that
    # names it (for errors); Scorer.items_for resolves it against the library (library.py).
    model: str | None = None
    model_field: str = "model"

    @classmethod
    def of(cls, fields: Any, prompts: tuple[Prompt, ...], **given: Any) -> Ask:
        """From a request or parameters object that names its fields as schemas/fields.py does
        (num_inference_steps, guidance_scale, height, width, and seed and adapters where it has
        them); ``given`` sets the rest (scheduler, images per prompt) or overrides."""
        common = {
            "steps": fields.num_inference_steps,
            "guidance": fields.guidance_scale,
            "height": fields.height,
            "width": fields.width,
            "seed": getattr(fields, "seed", None),
            "adapters": getattr(fields, "adapters", None),
        }
        return cls(prompts=prompts, **{**common, **given})

    @property
    def pictures(self) -> bool:
        """Whether any prompt starts from an image (its items decode it: a worker thread's job)."""
        return any(prompt.picture is not None for prompt in self.prompts)

    def items(
        self, info: ModelInfo, *, urls: UrlPolicy | None = None, sides: tuple[int, int] = (MIN_SIZE, MAX_SIZE)
    ) -> list[GenerationItem]:
        """One item per image, in response order: each prompt's images in a run, prompts in order.
        A prompt's own seed s gives its images s, s+1, ...; otherwise the n-th image of the request
        gets base + n (with one image per prompt, prompt i gets base + i). A prompt's picture is
        decoded once for its images (``urls``: the hosts whose image URLs may be fetched), at the
        size asked, else its own within ``sides``."""
        base = self.seed if self.seed is not None else random_seed()
        items: list[GenerationItem] = []
        for prompt in self.prompts:
            pixels = None if prompt.picture is None else self._pixels(prompt.picture, urls, sides)
            for image in range(self.per_prompt):
                seed = prompt.seed + image if prompt.seed is not None else base + len(items)
                items.append(
                    GenerationItem(
                        prompt=prompt.text,
                        seed=seed,
                        negative_prompt=prompt.negative,
                        num_inference_steps=self.steps,
                        guidance_scale=self.guidance,
                        scheduler=self.scheduler
                        or DEFAULT_SCHEDULER,  # the engine's name for the model's own
                        adapters=adapter_set(self.adapters),
                        eta=self.eta,
                        clip_skip=self.clip_skip,
                        model=self.model,
                        **self._image_fields(pixels, info),
                    )
                )
        return items

    def _pixels(self, picture: Picture, urls: UrlPolicy | None, sides: tuple[int, int]) -> Pixels:
        """The picture decoded, checked and resized as diffusers' pipelines take a PIL image."""
        image = _read(picture.image, picture.field, urls)
        height, width = output_size(image, self.height, self.width, min_side=sides[0], max_side=sides[1])
        mask = None
        if picture.mask is not None:
            drawn = _read(picture.mask, picture.mask_field, urls)
            if drawn.size != image.size:
                raise ImageInputError(
                    f"{picture.mask_field}: {drawn.width}x{drawn.height} pixels, but {picture.field} has "
                    f"{image.width}x{image.height}; send a mask of the image's size",
                    field=picture.mask_field,
                )
            mask = to_mask(
                drawn,
                (height, width),
                field=picture.mask_field,
                from_alpha=picture.mask_alpha,
                invert=picture.mask_invert,
            )
        return Pixels(height, width, to_rgb(image, (height, width)), mask)

    def _image_fields(self, pixels: Pixels | None, info: ModelInfo) -> dict[str, Any]:
        """An item's size, and with a picture its arrays and strength (diffusers' default when the
        request names none): a text-only prompt is drawn at the size asked, else the model's own."""
        if pixels is None:
            return {"height": self.height or info.native_height, "width": self.width or info.native_width}
        default = DEFAULT_INPAINT_STRENGTH if pixels.mask is not None else DEFAULT_IMAGE_STRENGTH
        return {
            "height": pixels.height,
            "width": pixels.width,
            "init_image": pixels.image,
            "mask": pixels.mask,
            "strength": self.strength if self.strength is not None else default,
        }


def _read(value: str | bytes | Image.Image, field: str, urls: UrlPolicy | None) -> Image.Image:
    return value if isinstance(value, Image.Image) else read_image(value, field, urls=urls)
