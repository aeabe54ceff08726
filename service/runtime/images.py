"""PNG encoding shared by every output path (online responses, batch files)."""

from __future__ import annotations

import base64
import io
import zlib

import numpy as np
from PIL import Image

# zlib level 1 with the run-length strategy: several times faster than PIL's default (level 6)
# on diffusion images, and ~15% smaller files than level 1 with the default strategy.
PNG_COMPRESS_LEVEL = 1
PNG_COMPRESS_TYPE = zlib.Z_RLE


def encode_png(image: np.ndarray) -> bytes:
    """HxWx3 uint8 RGB -> PNG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, compress_type=PNG_COMPRESS_TYPE
    )
    return buffer.getvalue()


def encode_png_base64(image: np.ndarray) -> str:
    """HxWx3 uint8 RGB -> standard padded base64 of the PNG, no ``data:`` prefix."""
    return base64.b64encode(encode_png(image)).decode("ascii")
