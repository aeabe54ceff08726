"""A checked input image -> the arrays the pipelines take, and the output size a request implies.

Pixels are made as diffusers makes them from a PIL image: ``diffusers.utils.load_image`` converts
to RGB, the pipeline's ``VaeImageProcessor`` resizes with Lanczos; so a request here gives what the
same image gives a diffusers pipeline. Colour (or grayscale, for a mask) is converted before the
resize, which for RGB and grayscale images is exactly diffusers' result. (Its processor resizes
first and converts after; for an image with alpha, which Pillow resizes premultiplied, the two can
differ along the edges of transparent areas. AUTOMATIC1111 converts masks first, too.)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from service.images_in.errors import ImageInputError

Size = tuple[int, int]  # (height, width), as the pipelines and the request fields give it


def _check_size(size: Size) -> None:
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"a size must be positive, not {size} (height, width)")


def _resized(image: Image.Image, size: Size) -> Image.Image:
    height, width = size
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def to_rgb(image: Image.Image, size: Size) -> np.ndarray:
    """The image as HxWx3 uint8 RGB at ``size`` (height, width): alpha dropped, then resized."""
    _check_size(size)
    return np.array(_resized(image.convert("RGB"), size), dtype=np.uint8, order="C")


def to_mask(
    image: Image.Image,
    size: Size,
    *,
    field: str,
    from_alpha: bool = False,
    invert: bool = False,
) -> np.ndarray:
    """An inpainting mask as HxW uint8 at ``size``: 255 repaints, 0 keeps.

    By default the mask is the image's luminance (white repaints: diffusers' and AUTOMATIC1111's
    convention). ``from_alpha`` follows OpenAI's edits, where the transparent area of a PNG is the
    one to repaint: the mask is 255 - alpha. ``invert`` (AUTOMATIC1111's inpainting_mask_invert)
    swaps the two at the end.
    """
    _check_size(size)
    if from_alpha:
        if image.mode not in ("RGBA", "LA"):
            raise ImageInputError(
                "this mask must mark the area to repaint as transparent (OpenAI's convention), and the "
                "image has no alpha channel; send a PNG with an alpha channel",
                field=field,
            )
        gray = image.getchannel("A").point(lambda alpha: 255 - alpha)
    else:
        gray = image.convert("L")
    mask = np.array(_resized(gray, size), dtype=np.uint8, order="C")
    return 255 - mask if invert else mask


def _floor_to(value: int, multiple: int) -> int:
    return value // multiple * multiple


def _fit(value: int, low: int, high: int, multiple: int) -> int:
    """Rounded down to ``multiple``, then clamped into [low, high] (both multiples of it)."""
    return min(high, max(low, _floor_to(value, multiple)))


def output_size(
    image: Image.Image,
    height: int | None,
    width: int | None,
    *,
    min_side: int = 128,
    max_side: int = 1024,
    multiple: int = 8,
) -> Size:
    """The (height, width) to generate, from the request's fields and the input image.

    Both given: those (already checked by the schemas, so normally unchanged). One given: the other
    keeps the image's aspect ratio. Neither: the image's own size, scaled down (aspect kept) until
    both sides fit ``max_side``, or up until both reach ``min_side``. Every result is rounded down
    to ``multiple`` (the latent grid) and clamped into [min_side, max_side].
    """
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, not {multiple}")
    low = -(-min_side // multiple) * multiple
    high = _floor_to(max_side, multiple)
    if not 0 < low <= high:
        raise ValueError(f"no multiple of {multiple} lies in [{min_side}, {max_side}]")
    image_width, image_height = (max(1, side) for side in image.size)
    if height is not None and width is None:
        width = height * image_width // image_height
    elif width is not None and height is None:
        height = width * image_height // image_width
    elif height is None or width is None:
        height, width = _natural_size(image_height, image_width, min_side=low, max_side=high)
    return _fit(height, low, high, multiple), _fit(width, low, high, multiple)


def _natural_size(height: int, width: int, *, min_side: int, max_side: int) -> Size:
    """The image's size scaled (aspect kept) into the bounds, before rounding. Integer arithmetic:
    the side that sets the scale lands exactly on its bound, not one float rounding below it."""
    longest = max(height, width)
    if longest > max_side:
        height, width = height * max_side // longest, width * max_side // longest
    shortest = min(height, width)
    if 0 < shortest < min_side:
        height, width = height * min_side // shortest, width * min_side // shortest
    return height, width
