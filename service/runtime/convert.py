"""The one place where wire types (schemas/) become engine types (model/) and back.

The requests arrive checked against schemas/fields.py (seeds that fit included); the one rule
checked here is the scheduler, whose names only the model knows."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from model.types import GenerationItem, GenerationResult, ModelInfo
from schemas.a1111 import Txt2ImgRequest
from schemas.a1111_img2img import Img2ImgRequest
from schemas.fields import DEFAULT_GUIDANCE, MAX_ADAPTERS
from schemas.huggingface import ImageToImageRequest, TextToImageRequest
from schemas.openai import ImageGenerationRequest
from schemas.openai_edits import ImageEditRequest
from schemas.samplers import engine_scheduler
from schemas.score import InputData, PromptRow
from service.runtime.errors import ContractError
from service.runtime.items import Ask, Picture, Prompt


class FieldError(ContractError):
    """Off the contract at one top-level field of the body, which OpenAI's error shape names as ``param``."""

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def score_ask(input_data: InputData, info: ModelInfo) -> Ask:
    """/score's rows and parameters; a row's own seed and negative prompt win over the parameters'."""
    params = input_data.parameters
    negative = params.negative_prompt or ""
    prompts = tuple(
        Prompt(row.prompt, row.negative_prompt or negative, row.seed, _row_picture(row, position))
        for position, row in enumerate(input_data.rows)
    )
    scheduler = _check_scheduler(params.scheduler, info, "input_data.parameters.scheduler")
    return Ask.of(
        params,
        prompts,
        per_prompt=params.num_images_per_prompt,
        scheduler=scheduler,
        strength=params.strength,
    )


def _row_picture(row: PromptRow, position: int) -> Picture | None:
    """A /score row's image and mask (Azure's inpainting and image-to-image contracts)."""
    if not row.image:
        return None
    where = f"input_data.data[{position}]"
    return Picture(row.image, f"{where}.image", row.mask_image or None, f"{where}.mask_image")


def openai_ask(request: ImageGenerationRequest, info: ModelInfo) -> Ask:
    """``POST /v1/images/generations``: ``n`` images of one prompt; a ``model`` that names an adapter
    is the served model with that adapter."""
    adapters = request.adapters
    if request.model in info.adapters and request.model not in (adapters or {}):
        # An adapter's id: the model with it at scale 1, beside any the request lists (an empty
        # "adapters" too: it would otherwise silently drop the adapter the model names).
        adapters = {request.model: 1.0, **(adapters or {})}
        if len(adapters) > MAX_ADAPTERS:
            raise FieldError(
                f"model names the adapter {request.model!r} and adapters lists {MAX_ADAPTERS} others; "
                f"give at most {MAX_ADAPTERS} in all",
                param="adapters",
            )
    prompts = (Prompt(request.prompt, request.negative_prompt or ""),)
    scheduler = _check_scheduler(request.scheduler, info, "scheduler")
    return Ask.of(request, prompts, per_prompt=request.n, scheduler=scheduler, adapters=adapters)


def openai_edit_ask(request: ImageEditRequest, info: ModelInfo, image: bytes, mask: bytes | None) -> Ask:
    """``POST /v1/images/edits``: the generation's Ask, from the form's image (and OpenAI's mask:
    transparent repaints)."""
    picture = Picture(image, "image", mask, "mask", mask_alpha=True)
    ask = openai_ask(request, info)
    prompts = tuple(dataclasses.replace(prompt, picture=picture) for prompt in ask.prompts)
    return dataclasses.replace(ask, prompts=prompts, strength=request.strength)


def a1111_ask(request: Txt2ImgRequest, info: ModelInfo) -> Ask:
    """``POST /sdapi/v1/txt2img``: batch_size x n_iter images of one prompt; seed -1 draws one."""
    scheduler = request.scheduler_name
    if scheduler is not None and scheduler not in info.schedulers:  # a sampler without that schedule
        raise FieldError(
            f"sampler_name: {request.sampler_label} runs here with the schedules GET /sdapi/v1/samplers "
            "lists in its options; send one of those as scheduler (or Automatic)",
            param="sampler_name",
        )
    return Ask(
        prompts=(Prompt(request.prompt, request.negative_prompt),),
        steps=request.steps,
        guidance=request.cfg_scale,
        per_prompt=request.images,
        seed=request.seed if request.seed >= 0 else None,
        height=request.height,
        width=request.width,
        scheduler=scheduler,
        adapters=request.adapters,
        eta=request.engine_eta,
        clip_skip=request.clip_layers - 1,  # A1111's 1 (the last layer) is diffusers' 0
    )


def huggingface_ask(request: TextToImageRequest, info: ModelInfo) -> Ask:
    """Hugging Face's text-to-image task (``POST /``): one image."""
    params = request.parameters
    return Ask(
        prompts=(Prompt(request.inputs, params.negative_prompt or "", params.seed),),
        steps=params.num_inference_steps or 1,  # set by validation
        guidance=DEFAULT_GUIDANCE if params.guidance_scale is None else params.guidance_scale,
        height=params.height,
        width=params.width,
        scheduler=_check_scheduler(params.scheduler_name, info, "parameters.scheduler"),
    )


def huggingface_image_ask(request: ImageToImageRequest, info: ModelInfo, image: bytes | None = None) -> Ask:
    """Hugging Face's image-to-image task (``POST /`` with an image): one image; ``image`` is the
    body's bytes when the client sent the image alone."""
    params = request.parameters
    size = params.target_size
    return Ask(
        prompts=(
            Prompt(
                params.prompt or "",
                params.negative_prompt or "",
                params.seed,
                Picture(image if image is not None else request.inputs, "inputs"),
            ),
        ),
        steps=params.num_inference_steps or 1,  # set by validation
        guidance=DEFAULT_GUIDANCE if params.guidance_scale is None else params.guidance_scale,
        height=size.height if size is not None else params.height,
        width=size.width if size is not None else params.width,
        scheduler=_check_scheduler(params.scheduler_name, info, "parameters.scheduler"),
        strength=params.strength,
    )


# The one table of the protocols' requests: each maps its schema to an Ask (what it asks of the
# engine), and the items come from the Ask alone.
ASKS: dict[type[Any], Callable[[Any, ModelInfo], Ask]] = {
    InputData: score_ask,
    ImageGenerationRequest: openai_ask,
    Txt2ImgRequest: a1111_ask,
    Img2ImgRequest: a1111_ask,  # its picture is prepared as A1111 does (service/web/clients/a1111_images.py)
    TextToImageRequest: huggingface_ask,
    ImageToImageRequest: huggingface_image_ask,
}


Request = InputData | ImageGenerationRequest | Txt2ImgRequest | TextToImageRequest | ImageToImageRequest


def ask_of(request: Request, info: ModelInfo) -> Ask:
    """What any protocol's parsed request asks of the engine (its images come from ``Ask.items``)."""
    return ASKS[type(request)](request, info)


def items_of(request: Request, info: ModelInfo) -> list[GenerationItem]:
    """One item per image of a parsed request without images in, in response order (items.Ask)."""
    return ask_of(request, info).items(info)


def _check_scheduler(scheduler: str | None, info: ModelInfo, where: str) -> str | None:
    """The one check of a request's scheduler: the names are the model's (GET /info), or an
    A1111 sampler name for one of them ("DPM++ 2M Karras"), which schemas/ cannot know; the
    message names the field without repeating the client's text. Returns the engine's name."""
    name = engine_scheduler(scheduler) if scheduler is not None else None
    if name is not None and name not in info.schedulers:
        param = where.rpartition(".")[2]
        raise FieldError(
            f"{where} must be one of: {', '.join(info.schedulers)}, or an AUTOMATIC1111 sampler name "
            '(GET /sdapi/v1/samplers, optionally followed by a schedule: "DPM++ 2M Karras")',
            param=param,
        )
    return name


def to_records(
    items: Sequence[GenerationItem], results: Sequence[GenerationResult], images_base64: Sequence[str]
) -> list[dict[str, Any]]:
    """The response body: one record per image, in the order of ``items``."""
    return [
        {
            "prompt": item.prompt,
            "generated_image": image,
            "nsfw_content_detected": result.nsfw_content_detected,
            "seed": result.seed,
        }
        for item, result, image in zip(items, results, images_base64, strict=True)
    ]


def to_image_data(
    results: Sequence[GenerationResult],
    images_base64: Sequence[str],
    urls: Sequence[str | None] | None = None,
    *,
    inline: bool = True,
) -> list[dict[str, Any]]:
    """OpenAI's ``data`` list: one entry per image (its base64 when ``inline``, its link when
    ``urls`` are given), with its seed and NSFW flag as extensions."""
    links = urls if urls is not None else [None] * len(results)
    return [
        {
            "b64_json": image if inline else None,
            "url": url,
            "revised_prompt": None,
            "seed": result.seed,
            "nsfw_content_detected": result.nsfw_content_detected,
        }
        for result, image, url in zip(results, images_base64, links, strict=True)
    ]
