"""AUTOMATIC1111's ``POST /sdapi/v1/img2img``: txt2img's fields (schemas/a1111.py) and the image's.

The image and mask are base64 (with or without a ``data:`` prefix, as webuiapi sends them) or a URL
of a host the operator names; service/images_in decodes and checks them. The img2img options mean
what they mean in A1111 (service/images_in/a1111.py applies them); the values this server cannot
draw are refused by name. Imports nothing outside ``schemas/``; messages never repeat the input.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from schemas.a1111 import IGNORED, NEUTRAL, SAMPLE_TXT2IMG, Txt2ImgRequest
from schemas.fields import ImageIn, Strength
from schemas.fields import contract_error as _error

MAX_MASK_BLUR = 64
MAX_PADDING = 256
SAMPLE_IMG2IMG: dict[str, Any] = {
    **SAMPLE_TXT2IMG,
    "init_images": ["<base64 PNG>"],
    "denoising_strength": 0.75,
}
# img2img's fields that change nothing here: an instruct-pix2pix model's image guidance, and asking
# for the init images back in the answer.
_IGNORED = (*IGNORED, "image_cfg_scale", "mask_round")
_NEUTRAL = {
    **NEUTRAL,
    "initial_noise_multiplier": ((1, 1.0, None), "the initial noise is not scaled here; send 1"),
    "include_init_images": ((False, None), "the init images are not sent back; send false"),
    "latent_mask": ((None, ""), "a separate latent mask is not supported; leave it out"),
}


class Img2ImgRequest(Txt2ImgRequest):
    """The body of ``POST /sdapi/v1/img2img`` (with ``mask``: inpainting)."""

    ignored: ClassVar[tuple[str, ...]] = _IGNORED
    neutral: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = _NEUTRAL

    init_images: list[ImageIn] = Field(
        min_length=1, max_length=1, description="One image: base64 (a data: prefix allowed) or a URL."
    )
    mask: ImageIn | None = Field(default=None, description="White repaints, black keeps (inpainting).")
    denoising_strength: Strength = Field(default=0.75, description="The share of the steps run (0-1].")
    resize_mode: int = Field(
        default=0, ge=0, le=3, description="0 stretch, 1 crop and resize, 2 resize and fill, 3 as 0."
    )
    mask_blur: int = Field(default=4, ge=0, le=MAX_MASK_BLUR, description="Mask edge blur, pixels.")
    inpainting_fill: int = Field(default=0, ge=0, le=3, description="0 fill, 1 original.")
    inpaint_full_res: bool | int = Field(default=True, description="Inpaint only the masked area.")
    inpaint_full_res_padding: int = Field(default=0, ge=0, le=MAX_PADDING)
    inpainting_mask_invert: bool | int = Field(default=0, description="1: black repaints, white keeps.")

    @model_validator(mode="after")
    def _drawable(self) -> Img2ImgRequest:
        if self.inpainting_fill > 1:
            raise _error(
                "inpainting_fill: latent noise (2) and latent nothing (3) are not run here; send 0 (fill) "
                "or 1 (original)"
            )
        for name in ("inpaint_full_res", "inpainting_mask_invert"):
            if getattr(self, name) not in (0, 1):  # True and False are 1 and 0
                raise _error(f"{name} must be 0 or 1 (or false or true)")
        return self
