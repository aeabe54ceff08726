"""OpenAI's Images API (``/v1/*``): a generation's or an edit's request to an Ask, the ``data`` list
of its answer, and its error body (a 422 sent as 400, as OpenAI answers invalid requests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from model.types import GenerationResult, ModelInfo
from schemas.fields import MAX_ADAPTERS
from schemas.openai import ImageGenerationRequest
from schemas.openai_edits import ImageEditRequest
from service.runtime.items import Ask, Picture, Prompt
from service.runtime.protocols.common import FieldError, check_scheduler

PREFIX = "/v1/"
_STATUS = {422: 400}


def openai_ask(request: ImageGenerationRequest, info: ModelInfo) -> Ask:
    """``POST /v1/images/generations``: ``n`` images of one prompt, with the model ``model`` names; a
    ``model`` that names an adapter is the default model with that adapter."""
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
    scheduler = check_scheduler(request.scheduler, info, "scheduler")
    # Any other id names a model (the library's, or an alias of the default one: runtime/library.py);
    # OpenAI's own ids arrive here as None where they name the default (service/web/openai.py).
    model = None if request.model in info.adapters else request.model or None
    return Ask.of(request, prompts, per_prompt=request.n, scheduler=scheduler, adapters=adapters, model=model)


def openai_edit_ask(request: ImageEditRequest, info: ModelInfo, image: bytes, mask: bytes | None) -> Ask:
    """``POST /v1/images/edits``: the generation's Ask, from the form's image (and OpenAI's mask:
    transparent repaints)."""
    picture = Picture(image, "image", mask, "mask", mask_alpha=True)
    ask = openai_ask(request, info)
    prompts = tuple(dataclasses.replace(prompt, picture=picture) for prompt in ask.prompts)
    return dataclasses.replace(ask, prompts=prompts, strength=request.strength)


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


def owns(path: str, method: str) -> bool:
    return path.startswith(PREFIX) or path == PREFIX.rstrip("/")


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error(status: int, code: str, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
    """``{"error": {"message", "type", "param", "code"}}``; OpenAI answers every invalid request with
    400 (its SDKs raise BadRequestError for it, UnprocessableEntityError for a 422)."""
    status = _STATUS.get(status, status)
    return status, {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
