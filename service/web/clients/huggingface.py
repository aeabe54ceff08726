"""Hugging Face's text-to-image and image-to-image tasks: ``POST /`` with ``{"inputs": prompt,
"parameters": {...}}`` (or an image's base64 as ``inputs``, the prompt in the parameters, or the
image's bytes as the whole body) answers the PNG's bytes, as ``huggingface_hub.InferenceClient(
base_url=...).text_to_image`` and ``.image_to_image`` and Inference Endpoints' clients expect.
``POST /models/NAME`` does the same with the model NAME (``InferenceClient(model="http://HOST/models/
NAME")``, the Inference API's path). ``GET /`` stays Azure's readiness probe (routes.py).

Errors are Hugging Face's ``{"error": message, "error_type": code}`` (its clients show ``error``),
with the status and Retry-After of the one table (service/web/errors.py)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from model.errors import EngineError
from schemas.huggingface import (
    SAMPLE_TEXT_TO_IMAGE,
    ImageToImageRequest,
    TextToImageRequest,
    looks_like_image,
)
from service.runtime.errors import ServiceError
from service.runtime.items import Ask
from service.runtime.jobs import Job
from service.runtime.lifecycle import Runtime
from service.runtime.protocols import ask_of
from service.runtime.protocols.huggingface import huggingface_image_ask
from service.runtime.scoring import parse_document_off_loop, validate_document
from service.web.errors import error_response, error_responses, json_body
from service.web.guards import JSON_MEDIA_TYPE
from service.web.routes import answer_generation

router = APIRouter(tags=["huggingface"])
EXPECTED = '{"inputs": prompt or base64 image, "parameters": {...}}'


def _png(image_base64: str) -> Response:
    return Response(base64.b64decode(image_base64), media_type="image/png")


_ROUTE: dict[str, Any] = {
    "response_class": Response,
    "responses": {
        200: {"content": {"image/png": {}}, "description": "The PNG."},
        **error_responses(
            {400: "The body is not JSON.", 422: "Off the contract (the error says where and why)."}
        ),
    },
    "openapi_extra": json_body(TextToImageRequest, SAMPLE_TEXT_TO_IMAGE),
}


@router.post(
    "/", summary="Generate one image (Hugging Face's text-to-image task; answers the PNG's bytes)", **_ROUTE
)
async def text_to_image(request: Request) -> Response:
    return await _answer(request, None)


@router.post(
    "/models/{name:path}",
    summary="POST / with the model NAME (the Inference API's path: InferenceClient(model=URL))",
    **{**_ROUTE, "responses": {**_ROUTE["responses"], **error_responses({404: "No model NAME here."})}},
)
async def model_text_to_image(name: str, request: Request) -> Response:
    return await _answer(request, name)


async def _answer(request: Request, model: str | None) -> Response:
    """The PNG ``model`` (None: the default one) draws for the body, or the error in HF's shape."""
    raw = request.headers.get("content-type", "").partition(";")[0].strip().lower() != JSON_MEDIA_TYPE

    async def work(runtime: Runtime, body: bytes, job: Job) -> Any:
        ask = await _ask(runtime, body, raw)
        if model is not None:  # the path's model; an unknown one is a 404 naming the path
            ask = dataclasses.replace(ask, model=model, model_field="model")
        items = await runtime.scorer.items_for(ask)
        _, images = await runtime.scorer.generate(items, prompts=1, job=job)
        return images[0]

    try:
        return await answer_generation(request, work, client="huggingface", answer=_png)
    except (ServiceError, EngineError) as error:  # in Hugging Face's shape (the protocols' table)
        return error_response(error, path=request.scope["path"], method="POST")


async def _ask(runtime: Runtime, body: bytes, raw: bool) -> Ask:
    """What the body asks: text to image, or image to image when ``inputs`` is an image's base64
    (or the body is the image's bytes): an image is never read as a prompt."""
    info, limits = runtime.engine.info, runtime.scorer.limits
    if raw:  # InferenceClient.image_to_image without parameters: the image alone
        bare = ImageToImageRequest.model_validate({"inputs": "-"}, context={"limits": limits})
        return huggingface_image_ask(bare, info, body)
    document = await parse_document_off_loop(body, limits, EXPECTED)
    image = isinstance(document, dict) and looks_like_image(document.get("inputs"))
    model: type[TextToImageRequest | ImageToImageRequest] = (
        ImageToImageRequest if image else TextToImageRequest
    )
    parsed = await asyncio.to_thread(validate_document, document, model, limits)
    return ask_of(parsed, info)
