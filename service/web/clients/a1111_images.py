"""img2img's image work for the A1111 routes, off the event loop: the init image and mask decoded,
fitted and made as A1111 makes them (service/images_in/a1111.py), and the drawn images finished
as A1111 answers them (pasted back, the kept pixels laid over)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from model.types import GenerationResult
from schemas.a1111_img2img import Img2ImgRequest
from service.images_in import ImageInputError, UrlPolicy, output_size, read_image
from service.images_in.a1111 import Prepared, finish, prepare
from service.runtime.images import encode_png_base64
from service.runtime.items import Ask, Picture


def _prepare(request: Img2ImgRequest, urls: UrlPolicy) -> Prepared:
    image = read_image(request.init_images[0], "init_images[0]", urls=urls)
    mask = None if request.mask is None else read_image(request.mask, "mask", urls=urls)
    if mask is not None and mask.size != image.size:
        raise ImageInputError(
            f"mask: {mask.width}x{mask.height} pixels, but init_images[0] has {image.width}x{image.height}; "
            "send a mask of the image's size",
            field="mask",
        )
    height, width = output_size(image, request.height, request.width)
    return prepare(
        image,
        mask,
        width=width,
        height=height,
        resize_mode=request.resize_mode,
        blur=request.mask_blur,
        fill=request.inpainting_fill,
        invert=bool(request.inpainting_mask_invert),
        only_masked=bool(request.inpaint_full_res),
        padding=request.inpaint_full_res_padding,
    )


async def prepared_ask(ask: Ask, request: Img2ImgRequest, urls: UrlPolicy) -> tuple[Ask, Prepared]:
    """The request's Ask with its prepared picture (drawn at the asked size) and its strength."""
    prepared = await asyncio.to_thread(_prepare, request, urls)
    picture = Picture(prepared.image, "init_images[0]", prepared.mask, "mask")
    prompts = tuple(dataclasses.replace(prompt, picture=picture) for prompt in ask.prompts)
    height, width = prepared.image.height, prepared.image.width
    return (
        dataclasses.replace(
            ask, prompts=prompts, strength=request.denoising_strength, height=height, width=width
        ),
        prepared,
    )


async def finished(results: Sequence[GenerationResult], images: list[str], prepared: Prepared) -> list[str]:
    """The answer's base64 PNGs: as drawn, or pasted back and overlaid where A1111 does so."""
    if prepared.overlay is None and prepared.base is None:
        return images

    def one(result: GenerationResult) -> str:
        whole = finish(Image.fromarray(result.image), prepared)
        return encode_png_base64(np.asarray(whole))

    return list(await asyncio.gather(*(asyncio.to_thread(one, result) for result in results)))
