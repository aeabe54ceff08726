"""Hugging Face's text-to-image task: ``POST /`` with ``{"inputs": prompt, "parameters": {...}}``
answers the PNG's bytes, as ``huggingface_hub.InferenceClient(base_url=...).text_to_image`` and
Inference Endpoints' clients expect. ``GET /`` stays Azure's readiness probe (routes.py).

Errors are Hugging Face's ``{"error": message, "error_type": code}`` (its clients show ``error``),
with the status and Retry-After of the one table (service/web/errors.py)."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from model.errors import EngineError
from schemas.huggingface import SAMPLE_TEXT_TO_IMAGE, TextToImageRequest
from service.runtime.convert import items_of
from service.runtime.errors import ServiceError
from service.runtime.jobs import Job
from service.runtime.lifecycle import Runtime
from service.runtime.scoring import parse_body_off_loop
from service.web.errors import classify, error_responses, huggingface_error_json, json_body
from service.web.routes import answer_generation

router = APIRouter(tags=["huggingface"])


def huggingface_error(error: BaseException) -> JSONResponse:
    return huggingface_error_json(*classify(error))


def _png(image_base64: str) -> Response:
    return Response(base64.b64decode(image_base64), media_type="image/png")


@router.post(
    "/",
    summary="Generate one image (Hugging Face's text-to-image task; answers the PNG's bytes)",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The PNG."},
        **error_responses(
            {400: "The body is not JSON.", 422: "Off the contract (the error says where and why)."}
        ),
    },
    openapi_extra=json_body(TextToImageRequest, SAMPLE_TEXT_TO_IMAGE),
)
async def text_to_image(request: Request) -> Response:
    async def work(runtime: Runtime, body: bytes, job: Job) -> Any:
        parsed = await parse_body_off_loop(
            body,
            TextToImageRequest,
            runtime.scorer.limits,
            expected='{"inputs": prompt, "parameters": {...}}',
        )
        items = items_of(parsed, runtime.engine.info)
        _, images = await runtime.scorer.generate(items, prompts=1, job=job)
        return images[0]

    try:
        return await answer_generation(request, work, client="huggingface", answer=_png)
    except (ServiceError, EngineError) as error:
        return huggingface_error(error)
