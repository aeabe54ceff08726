"""An input image's bytes -> a checked, oriented PIL image in RGB, RGBA, L or LA.

The file is hostile until proven otherwise. Pillow reads the header first and the pixels only on
``load()``, so the size is checked in between: a 100 kB PNG can claim 100000x100000 pixels and
would take 10 GB to decode (a decompression bomb). Only the common raster formats are opened (EPS
would run Ghostscript; the rarer decoders are attack surface no client needs), animations are
refused rather than silently cut to their first frame, and every failure of the decoder on a bad
file becomes an ``ImageInputError`` that names the field, never a server error.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.images_in.errors import ImageInputError
from service.images_in.payload import image_bytes
from service.images_in.policy import UrlPolicy

MAX_INPUT_PIXELS = 4096 * 4096
MAX_SIDE = 16384
# MPO (a JPEG with extra views, from phones and stereo cameras) is read as its first, main picture;
# Pillow opens it through its JPEG reader, so it is not named to Image.open.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_ACCEPTED_NAMES = "PNG, JPEG, WEBP, GIF, BMP or TIFF"

# What Pillow's decoders raise on a truncated or malformed file. Listed rather than a bare
# ``Exception`` so that a bug of this module still surfaces as one; the fuzz test keeps it complete.
CORRUPT_FILE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    struct.error,
    ZeroDivisionError,
    OverflowError,
    RecursionError,
)

_AS_RGB = frozenset({"CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
_AS_RGBA = frozenset({"PA", "RGBa"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def read_image(
    value: str | bytes,
    field: str,
    *,
    urls: UrlPolicy | None = None,
    max_pixels: int = MAX_INPUT_PIXELS,
) -> Image.Image:
    """What a client sent (the file's bytes, its base64, a data: URL, or an http(s) URL that
    ``urls`` allows) -> an upright image in mode RGB, RGBA, L or LA, its pixels loaded.

    Raises ImageUrlRefusedError for a URL the server may not fetch, ImageInputError for any other
    bad input; each message starts with ``field``.
    """
    data = image_bytes(value, field, urls)
    try:
        image = _decode(data, field, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own bound (Image.MAX_IMAGE_PIXELS, global, left alone): it raises the error in
        # Image.open above twice that bound, and the warning where the process's warning filters
        # make warnings errors. Below it, the size check in _check_header is what refuses a bomb;
        # no warning filter is changed here, as warnings.catch_warnings is not thread-safe.
        raise ImageInputError(
            f"the image has more pixels than the {max_pixels} allowed (a decompression bomb?); "
            f"send an image of at most {_largest_square(max_pixels)} pixels",
            field=field,
        ) from None
    return normalise_mode(image, field)


def _largest_square(max_pixels: int) -> str:
    side = min(MAX_SIDE, int(max_pixels**0.5))
    return f"{side}x{side}"


def _decode(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Open, check the header, decode the pixels, apply the EXIF orientation."""
    image = _open(data, field)
    try:
        _check_header(image, field, max_pixels)
        try:
            image.load()
        except CORRUPT_FILE_ERRORS:
            raise ImageInputError(
                f"the image file is truncated or corrupt; send the complete file ({_ACCEPTED_NAMES})",
                field=field,
            ) from None
        return _upright(image)
    finally:
        image.close()


def _open(data: bytes, field: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageInputError(
            f"not an image in an accepted format; send a {_ACCEPTED_NAMES} file, base64-encoded",
            field=field,
        ) from None
    except CORRUPT_FILE_ERRORS:
        raise ImageInputError(
            f"the image file's header is corrupt; send a valid {_ACCEPTED_NAMES} file",
            field=field,
        ) from None


def _check_header(image: Image.Image, field: str, max_pixels: int) -> None:
    """Refuse, before decoding, what has no pixels, too many, or more than one frame."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageInputError(
            f"the image has no pixels (its width or height is 0); send a non-empty {_ACCEPTED_NAMES} file",
            field=field,
        )
    if width > MAX_SIDE or height > MAX_SIDE or width * height > max_pixels:
        raise ImageInputError(
            f"the image is {width}x{height} pixels, more than the {max_pixels} pixels (and {MAX_SIDE} "
            f"per side) allowed; send an image of at most {_largest_square(max_pixels)} pixels",
            field=field,
        )
    if image.format == "MPO":
        return  # its other frames are other views of the same scene, not an animation
    try:
        frames = int(getattr(image, "n_frames", 1))
    except CORRUPT_FILE_ERRORS:
        raise ImageInputError(
            f"the image file is truncated or corrupt; send the complete file ({_ACCEPTED_NAMES})",
            field=field,
        ) from None
    if frames > 1:
        raise ImageInputError(
            "the image is animated or has several pages, and which frame to use would be a guess; "
            "send a single still image (a PNG or JPEG of the frame you mean)",
            field=field,
        )


def _upright(image: Image.Image) -> Image.Image:
    """A copy turned as the EXIF Orientation tag says (phones store photos sideways and tag them).

    A broken EXIF block is ignored, as browsers do: the pixels decoded, and the photo is shown as
    stored rather than refused for its metadata.
    """
    try:
        return ImageOps.exif_transpose(image)
    except CORRUPT_FILE_ERRORS:
        return image.copy()


def normalise_mode(image: Image.Image, field: str) -> Image.Image:
    """Any mode Pillow may decode to -> RGB, RGBA, L or LA, the only modes the rest of the
    service handles. Colour spaces become RGB; transparency is kept as RGBA."""
    mode = image.mode
    if mode in ("RGB", "RGBA", "L", "LA"):
        return image
    if mode in _AS_RGB:
        return image.convert("RGB")
    if mode in _AS_RGBA:
        return image.convert("RGBA")
    if mode == "P":
        return image.convert("RGBA" if image.has_transparency_data else "RGB")
    if mode == "1":
        return image.convert("L")
    if mode in _SIXTEEN_BIT:
        return _sixteen_bit_to_l(image)
    if mode == "F":
        return _float_to_l(image)
    raise ImageInputError(
        f"the image's pixel format ({mode}) is not supported; send an 8-bit RGB, RGBA or grayscale "
        "PNG or JPEG",
        field=field,
    )


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit grayscale -> 8-bit by its top byte (65535 -> 255, 32768 -> 128). Pillow's own
    ``convert("L")`` clips at 255 instead, which turns most 16-bit images white."""
    values = np.asarray(image).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))


def _float_to_l(image: Image.Image) -> Image.Image:
    """32-bit float grayscale, taken on the 0..255 scale (as Pillow converts it), clipped."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
