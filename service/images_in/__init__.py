"""Input images: what a client sends (the file, its base64, a data: URL, or an http(s) URL the
operator allows) -> checked pixels, safe against hostile input.

``read_image`` decodes and checks (size before decoding, formats, frames, orientation, mode);
``to_rgb`` and ``to_mask`` make the arrays the pipelines take; ``output_size`` the size to generate.
Every bad input raises ``ImageInputError`` (HTTP 422) or ``ImageUrlRefusedError`` (HTTP 400), whose
message names the request field and never repeats the client's content.
"""

from service.images_in.decode import MAX_INPUT_PIXELS, read_image
from service.images_in.errors import ImageInputError, ImageUrlRefusedError
from service.images_in.policy import UrlPolicy
from service.images_in.sizes import output_size, to_mask, to_rgb

__all__ = [
    "MAX_INPUT_PIXELS",
    "ImageInputError",
    "ImageUrlRefusedError",
    "UrlPolicy",
    "output_size",
    "read_image",
    "to_mask",
    "to_rgb",
]
