"""OpenAI's streamed image generation: ``stream: true`` on ``POST /v1/images/generations`` answers
Server-Sent Events exactly as OpenAI's SDKs read them (``client.images.generate(stream=True)``):
up to ``partial_images`` (0-3) ``image_generation.partial_image`` events per image, previews decoded
cheaply from its latents at evenly spaced steps, then one ``image_generation.completed`` per image,
in order; the completed image is the unstreamed one for the same seed.

Everything up to queueing the images (keys, parsing, the model name, a full queue) is answered as an
ordinary OpenAI error with its status; an error after the stream started arrives as an ``error``
event (the SDK raises it as APIError). A client that closes the stream cancels its images: they
leave the queue at once and their engine at its next step.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from PIL import Image
from starlette.types import Receive, Scope, Send

from model.errors import EngineError
from model.types import GenerationItem, GenerationResult, ModelInfo
from schemas.openai import ImageGenerationRequest
from schemas.openai_edits import ImageEditRequest
from service.runtime.errors import RequestTimeoutError, ServiceError
from service.runtime.items import Ask
from service.runtime.jobs import Job
from service.runtime.lifecycle import Lifecycle
from service.runtime.protocols.openai import openai_error
from service.web.clients.common import followed
from service.web.errors import classify

Generation = asyncio.Future[tuple[list[GenerationResult], list[str]]]


def preview_every(steps: int, partial_images: int) -> int:
    """Steps between previews, so that up to ``partial_images`` of them fall evenly before the end."""
    return math.ceil(steps / (partial_images + 1)) if partial_images else 0


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def _partial_png(pixels: np.ndarray, item: GenerationItem) -> str:
    """A latent-sized preview, brought to the image's size (bilinear: it is a preview)."""
    image = Image.fromarray(pixels).resize((item.width, item.height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def stream_images(
    request: Request, parsed: ImageGenerationRequest, ask: Callable[[ModelInfo], Ask] | None = None
) -> Response:
    """The streamed answer to ``parsed`` (which asks for ``stream: true``; parsed, its model checked);
    ``ask`` builds what it asks of the engine where the body alone does not say (an edit's files)."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    deadline = time.monotonic() + lifecycle.settings.request_timeout_s
    async with AsyncExitStack() as stack:
        # 1. Before the stream: ready and queued (errors keep their status).
        runtime = await stack.enter_async_context(lifecycle.serving())
        scorer = runtime.scorer
        items = await (scorer.items(parsed) if ask is None else scorer.items_for(ask(runtime.engine.info)))
        every = preview_every(items[0].steps_run, parsed.partial_images or 0)
        job = await stack.enter_async_context(followed(request, "openai", every))
        generation: Generation = asyncio.ensure_future(runtime.scorer.generate(items, prompts=1, job=job))
        await asyncio.sleep(0)  # it validates and queues before its first wait: a full queue raises now
        if generation.done():
            generation.result()
        # 2. The stream owns the request from here; it lets go when the stream ends or the client leaves.
        release = _releaser(generation, stack.pop_all())
    return EventStream(_events(generation, job, items, parsed, (lifecycle, deadline), release), release)


def _releaser(generation: Generation, held: AsyncExitStack) -> Callable[[], Awaitable[None]]:
    """Let go of a streamed request (at most once): its images leave at the next step if it is not
    done, then its job and its hold on the server (the drain waits for it) are released."""

    async def release() -> None:
        if not generation.done():
            generation.cancel()
        await asyncio.gather(generation, return_exceptions=True)
        await held.aclose()  # a second call finds nothing left to close

    return release


class EventStream(StreamingResponse):
    """Server-Sent Events that release their request however the response ends, even when the
    client left before the first event (the events' own cleanup never runs then)."""

    def __init__(self, events: AsyncIterator[bytes], release: Callable[[], Awaitable[None]]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release()


async def _events(
    generation: Generation,
    job: Job,
    items: list[GenerationItem],
    parsed: ImageGenerationRequest,
    limit: tuple[Lifecycle, float],
    release: Callable[[], Awaitable[None]],
) -> AsyncIterator[bytes]:
    common: dict[str, Any] = {
        "background": "opaque",
        "output_format": "png",
        "quality": parsed.quality or "auto",
    }
    common["size"] = f"{items[0].width}x{items[0].height}"
    events = "image_edit" if isinstance(parsed, ImageEditRequest) else "image_generation"  # OpenAI's names
    partials = [0] * len(items)
    lifecycle, deadline = limit
    try:
        # 1. Partial images as they come, until every image is done (or the deadline).
        while not generation.done():
            arrival: asyncio.Future[Any] = asyncio.ensure_future(job.events.get())
            waiting: list[asyncio.Future[Any]] = [generation, arrival]
            try:
                await asyncio.wait(waiting, timeout=max(deadline - time.monotonic(), 0),
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                arrived = arrival.done()
                if not arrived:  # time ran out, or the client left (cancelled here): nothing left pending
                    arrival.cancel()
            if not arrived:
                if not generation.done():
                    lifecycle.metrics.timeouts.inc()
                    raise RequestTimeoutError.after(lifecycle.settings.request_timeout_s)
                continue
            image, _, pixels = arrival.result()
            if partials[image] >= (parsed.partial_images or 0):
                continue
            data: dict[str, Any] = {"b64_json": await asyncio.to_thread(_partial_png, pixels, items[image])}
            data |= {"created_at": int(time.time()), **common, "partial_image_index": partials[image]}
            partials[image] += 1
            yield _event(f"{events}.partial_image", data | {"image_index": image})
        # 2. Every image, in order.
        results, images = generation.result()
        usage: dict[str, Any] = {
            "input_tokens": 0,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
        }
        usage |= {"output_tokens": 0, "total_tokens": 0}
        for index, (result, image_base64) in enumerate(zip(results, images, strict=True)):
            done: dict[str, Any] = {
                "b64_json": image_base64,
                "created_at": int(time.time()),
                **common,
                "usage": usage,
            }
            done |= {
                "image_index": index,
                "seed": result.seed,
                "nsfw_content_detected": result.nsfw_content_detected,
            }
            yield _event(f"{events}.completed", done)
    except (ServiceError, EngineError) as error:
        kind, message = classify(error)
        _, error_body = openai_error(kind.status, kind.code, message, None)
        yield _event("error", error_body)
    finally:
        await release()  # the client left, or time ran out: its images leave at the next step
