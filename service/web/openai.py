"""OpenAI's Images API beside the Azure ML contract: ``POST /v1/images/generations``, ``GET /v1/models``
and ``GET /v1/models/{id}``, so that OpenAI's SDKs and the tools built on them work by changing a base URL.

Nothing here generates: a request is parsed with the same rules and limits as ``/score``
(``parse_body``), turned into engine items by its protocol module
(service/runtime/protocols/openai.py), and answered through ``answer_generation`` and
``Scorer.generate``, the very path of ``/score`` (deadline, disconnects, step loop, safety checker,
PNG encoding, metrics, request ids, API keys). Errors on /v1/* are rendered
in OpenAI's shape by service/web/errors.py, from the same table.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from model.types import ModelInfo
from schemas.openai import (
    SAMPLE_IMAGES_REQUEST,
    ImageGenerationRequest,
    ImagesResponse,
    OpenAIErrorResponse,
    OpenAIModel,
    OpenAIModelList,
)
from schemas.openai_edits import ImageEditRequest
from service.runtime.errors import ModelNotFoundError
from service.runtime.items import Ask
from service.runtime.jobs import Job
from service.runtime.lifecycle import Lifecycle, Runtime
from service.runtime.protocols.openai import openai_edit_ask, to_image_data
from service.runtime.scoring import parse_body_off_loop
from service.web.clients.common import library_names, lifecycle_of, served_names
from service.web.clients.edits import EDIT_FORM, read_edit_form
from service.web.clients.links import link_url, links_of
from service.web.clients.streaming import stream_images
from service.web.errors import error_responses, json_body
from service.web.routes import answer_generation

router = APIRouter(prefix="/v1", tags=["openai"])
OWNER = "sd-endpoint"
ADAPTER_OWNER = "sd-endpoint (LoRA adapter)"  # a LoRA adapter of SD_ADAPTERS: the model with it at scale 1
# OpenAI's own image model ids: the defaults of the clients built on OpenAI's API (Open WebUI's
# dall-e-2, LangChain's and LiteLLM's dall-e-2, the SDK users' dall-e-3 or gpt-image-1). Without
# SD_SERVED_MODEL_NAMES they name the served model, so those clients work unchanged; they are not
# listed (GET /v1/models shows the real name). SD_SERVED_MODEL_NAMES replaces them.
OPENAI_IDS = ("dall-e-2", "dall-e-3", "gpt-image-1")
OPENAI_ID_OWNER = "sd-endpoint (OpenAI's id, for the served model)"
_STARTED = int(time.time())  # a model's "created": when this server process started

_ERRORS = error_responses(
    {
        400: "Invalid request: not JSON, an unknown field, a value out of bounds (param names it).",
        404: "model names a model this server does not serve.",
    },
    OpenAIErrorResponse,
)


def _served(name: str, owner: str = OWNER) -> OpenAIModel:
    return OpenAIModel(id=name, created=_STARTED, owned_by=owner)


def _openai_ids(lifecycle: Lifecycle) -> tuple[str, ...]:
    """OpenAI's ids, when SD_SERVED_MODEL_NAMES does not say which names this server answers to."""
    return () if lifecycle.settings.served_model_name_list else OPENAI_IDS


def _model_ids(lifecycle: Lifecycle, info: ModelInfo) -> tuple[str, ...]:
    """Every id ``model`` may name: the served names, the library's models, each LoRA adapter (the
    default model with it), then OpenAI's ids where they name the default model."""
    return served_names(lifecycle) + library_names(lifecycle) + info.adapters + _openai_ids(lifecycle)


def _require_served(model: str | None, names: tuple[str, ...]) -> None:
    if model is not None and model not in names:
        shown = ", ".join(repr(name) for name in names[:5]) + (", ..." if len(names) > 5 else "")
        raise ModelNotFoundError(
            f"this server serves only {shown} (GET /v1/models); send one of those ids or leave model out"
        )


def _checked(parsed: ImageGenerationRequest, lifecycle: Lifecycle, info: ModelInfo) -> None:
    """404 for an id not served; OpenAI's own ids name the default model (unless a library model
    has that name)."""
    _require_served(parsed.model, _model_ids(lifecycle, info))
    if parsed.model in _openai_ids(lifecycle) and parsed.model not in library_names(lifecycle):
        parsed.model = None


async def _generate(
    runtime: Runtime,
    parsed: ImageGenerationRequest,
    job: Job,
    request: Request,
    ask: Callable[[ModelInfo], Ask] | None = None,
) -> dict[str, Any]:
    """A parsed images request -> OpenAI's images answer, through /score's generation path (``ask``:
    what an edit asks, with its files)."""
    scorer = runtime.scorer
    items = await (scorer.items(parsed) if ask is None else scorer.items_for(ask(runtime.engine.info)))
    results, images = await runtime.scorer.generate(items, prompts=1, job=job)
    # 3. Links, when the client reads them (service/web/clients/links.py).
    urls = None
    if parsed.linked:
        links = links_of(request)

        def store() -> list[str | None]:  # off the event loop: decoding, and writing files
            return [link_url(request, links.put(base64.b64decode(image))) for image in images]

        urls = await asyncio.to_thread(store)
    data = to_image_data(results, images, urls, inline=parsed.inline)
    return {"created": int(time.time()), "data": data}


@router.post(
    "/images/generations",
    summary="Generate images (OpenAI's Images API)",
    response_model=None,
    responses={
        200: {
            "model": ImagesResponse,
            "description": "One entry per image; with stream: true, Server-Sent Events "
            "(image_generation.partial_image, image_generation.completed, error).",
            "content": {"text/event-stream": {}},
        },
        **_ERRORS,
    },
    openapi_extra=json_body(ImageGenerationRequest, SAMPLE_IMAGES_REQUEST),
)
async def create_images(request: Request) -> Any:
    lifecycle = lifecycle_of(request)
    body = await request.body()
    runtime = lifecycle.require_ready()
    # The budget scan, then the parse, with /score's rules and limits (in a worker thread for a large
    # body), before anything reads the body: whether it streams is a field of the parsed request, so
    # that no body is ever parsed whole on the event loop.
    parsed = await parse_body_off_loop(
        body, ImageGenerationRequest, runtime.scorer.limits, expected="an images request object"
    )
    _checked(parsed, lifecycle, runtime.engine.info)
    if parsed.stream:  # Server-Sent Events (service/web/clients/streaming.py)
        return await stream_images(request, parsed)
    return await answer_generation(
        request, lambda runtime, _, job: _generate(runtime, parsed, job, request), client="openai"
    )


@router.post(
    "/images/edits",
    summary="Edit an image: image to image, or inpainting with a mask (OpenAI's Images API)",
    response_model=None,
    responses={
        200: {
            "model": ImagesResponse,
            "description": "One entry per image; with stream: true, Server-Sent Events "
            "(image_edit.partial_image, image_edit.completed, error).",
            "content": {"text/event-stream": {}},
        },
        **_ERRORS,
    },
    openapi_extra=EDIT_FORM,
)
async def edit_images(request: Request) -> Any:
    lifecycle = lifecycle_of(request)
    await request.body()  # kept: the form is read from it, and the generation's path reads it again
    runtime = lifecycle.require_ready()
    # The form's fields checked as a generation's are, its files kept as sent (decoded off the loop).
    parsed, image, mask = await read_edit_form(request, runtime.scorer.limits)
    _checked(parsed, lifecycle, runtime.engine.info)
    ask = functools.partial(_edit_ask, parsed, image=image, mask=mask)
    if parsed.stream:
        return await stream_images(request, parsed, ask)
    return await answer_generation(
        request, lambda runtime, _, job: _generate(runtime, parsed, job, request, ask), client="openai"
    )


def _edit_ask(parsed: ImageEditRequest, info: ModelInfo, *, image: bytes, mask: bytes | None) -> Ask:
    return openai_edit_ask(parsed, info, image, mask)


@router.get(
    "/models",
    summary="The served models (the default first), in OpenAI's list shape",
    response_model=OpenAIModelList,
    responses={key: value for key, value in _ERRORS.items() if key in (401, 503)},
)
def list_models(request: Request) -> OpenAIModelList:
    lifecycle = lifecycle_of(request)
    info = lifecycle.require_ready().engine.info
    models = [_served(name) for name in served_names(lifecycle) + library_names(lifecycle)]
    return OpenAIModelList(data=models + [_served(name, ADAPTER_OWNER) for name in info.adapters])


@router.get(
    "/models/{model_id:path}",
    summary="One model: a served one, else 404",
    response_model=OpenAIModel,
    responses={key: value for key, value in _ERRORS.items() if key in (401, 404, 503)},
)
def retrieve_model(model_id: str, request: Request) -> OpenAIModel:
    lifecycle = lifecycle_of(request)
    info = lifecycle.require_ready().engine.info
    _require_served(model_id, _model_ids(lifecycle, info))
    if model_id in info.adapters:
        return _served(model_id, ADAPTER_OWNER)
    return _served(model_id, OPENAI_ID_OWNER if model_id in _openai_ids(lifecycle) else OWNER)
