"""Pictures as users send them to the images-in routes and batch jobs: smooth images with some detail
and a square inpainting mask, at random:tiny's native size unless told, and their PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SIZE = 128  # random:tiny's native size


def picture(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A smooth image with some detail."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)


def square_mask(size: int = SIZE) -> Image.Image:
    """White (repaint) in a square, black (keep) around it."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
