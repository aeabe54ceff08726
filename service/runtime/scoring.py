"""Scoring one request body, from bytes to response records. Shared by POST /score and the Azure ML
entry script, so both speak exactly the same contract; ``Scorer.generate`` (queue, await, encode) and
``parse_body`` are the one path of every other route too (OpenAI's /v1/images/generations)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError

from model.types import GenerationItem, GenerationResult
from schemas.fields import describe_location, describe_problem
from schemas.score import ScoreLimits, ScoreRequest
from service.images_in import UrlPolicy
from service.runtime.batching.steploop import StepLoop
from service.runtime.engines import ServingEngine
from service.runtime.errors import ContractError, MalformedJsonError, QueueFullError, RequestCancelledError
from service.runtime.images import encode_png_base64
from service.runtime.items import Ask
from service.runtime.jobs import Job
from service.runtime.library import Library
from service.runtime.protocols import FieldError, Request, ask_of
from service.runtime.protocols.score import to_records

log = logging.getLogger(__name__)

_MAX_REPORTED_ERRORS = 5
# A valid request holds a few values per row (its columns, its index) and a few dozen parameters; a
# document of many more (90,000 unknown keys, say) is refused before validation, whose cost (every
# error described) grows with its size and holds the interpreter.
_VALUES_PER_ROW = 16
_VALUES_BESIDES_ROWS = 256
# Bodies at least this large are parsed in a worker thread, so the event loop keeps answering.
OFF_LOOP_BYTES = 64 * 1024
M = TypeVar("M", bound=BaseModel)


def _reject_constant(name: str) -> NoReturn:
    raise ContractError(f"the body contains a bare {name}, which JSON does not allow; send a finite number")


def parse_json(body: bytes, expected: str = "the input_data object") -> Any:
    """Bytes -> a JSON document, or MalformedJsonError for anything the parser cannot take: not
    JSON, not UTF-8, NaN/Infinity, nesting too deep for the parser (RecursionError), integers
    longer than Python converts (ValueError)."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        position = f" at byte {error.pos}" if isinstance(error, json.JSONDecodeError) else ""
        raise MalformedJsonError(f"the body is not valid JSON{position}; send {expected}") from None
    except RecursionError:
        raise MalformedJsonError(f"the body nests too deeply to parse; send {expected}") from None
    except ValueError as error:  # e.g. an integer of thousands of digits
        raise MalformedJsonError(f"the body holds a value the parser cannot take ({error})") from None


def parse_document(body: bytes, limits: ScoreLimits, expected: str = "the input_data object") -> Any:
    """Bytes -> a JSON document no larger than any valid request: what every route reads first."""
    # 1. A size no valid request reaches, told from the bytes before the parser runs: json.loads
    #    holds the interpreter for the whole body (a megabyte of tiny values: tens of milliseconds
    #    in which no other request, health checks included, is answered); the scan stops early.
    budget = _VALUES_BESIDES_ROWS + _VALUES_PER_ROW * limits.max_prompts
    too_many = ContractError(
        f"the body holds more than {budget} JSON values, more than any valid request; "
        "see the request schema at /docs"
    )
    if _too_deep_or_too_many(body, budget):
        raise too_many
    # 2. JSON. Python's parser accepts NaN and Infinity; the contract does not.
    document = parse_json(body, expected)
    if _holds_more_values(document, budget):  # what the scan counts, on what the parser read
        raise too_many
    return document


async def parse_document_off_loop(body: bytes, limits: ScoreLimits, expected: str) -> Any:
    """``parse_document``, in a worker thread for a large body (as ``parse_body_off_loop``)."""
    if len(body) < OFF_LOOP_BYTES:
        return parse_document(body, limits, expected)
    return await asyncio.to_thread(parse_document, body, limits, expected)


def parse_body(
    body: bytes, model: type[M], limits: ScoreLimits, *, expected: str = "the input_data object"
) -> M:
    """Bytes -> ``model``: every route's body (/score's, OpenAI's) under the same rules, limits and
    messages. Off the contract: FieldError, a ContractError that also names the first field at fault."""
    return validate_document(parse_document(body, limits, expected), model, limits)


def validate_document(document: Any, model: type[M], limits: ScoreLimits) -> M:
    """A parsed document -> ``model``, under the operator's limits; off the contract: FieldError."""
    # 3. The contract, with the operator's limits.
    try:
        return model.model_validate(document, context={"limits": limits})
    except RecursionError:
        raise ContractError("the body nests too deeply; see the request schema at /docs") from None
    except ValidationError as error:
        raise FieldError(describe_validation_error(error), param=_first_field(error)) from None


async def parse_body_off_loop(
    body: bytes, model: type[M], limits: ScoreLimits, *, expected: str = "the input_data object"
) -> M:
    """``parse_body``, in a worker thread for a large body (a megabyte of JSON takes tens of
    milliseconds to parse and validate; a few at once would stall every other request)."""
    if len(body) < OFF_LOOP_BYTES:
        return parse_body(body, model, limits, expected=expected)
    return await asyncio.to_thread(parse_body, body, model, limits, expected=expected)


# A JSON token: a string (escapes are taken out first, so that any string is one linear scan), an
# opening or a closing of an object or array, or a bare scalar (number, true, false, null). All but
# the closings are values or keys: for valid JSON, as many as _holds_more_values counts.
_TOKEN = re.compile(rb'"[^"]*"|[\[{\]}]|[^\s\[\]{},:"]+')


def _too_deep_or_too_many(body: bytes, budget: int) -> bool:
    """Whether ``body`` holds more than ``budget`` values and keys, scanning only as far as it takes
    to know. A body that nests deeper than the parser goes is left to the parser (which stops there,
    with its own 400): the scan follows the nesting far enough to tell the two apart."""
    deepest = sys.getrecursionlimit()  # where json.loads gives up (RecursionError)
    # Escapes out (an escaped quote ends no string), then JSON's whitespace: both at C speed, so
    # that the scan's cost depends on neither the strings' content nor the padding.
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, b" \t\r\n")
    depth = values = 0
    for match in _TOKEN.finditer(plain):
        token = match.group()
        if token in (b"]", b"}"):
            depth -= 1
            continue
        values += 1
        if token in (b"[", b"{"):
            depth += 1
            if depth >= deepest:
                return False
        if values > max(budget, 2 * deepest):
            break
    return values > budget


def _holds_more_values(document: Any, budget: int) -> bool:
    """Whether ``document`` has more than ``budget`` values (objects, arrays and scalars); stops
    counting at the budget."""
    pending = [document]
    seen = 0
    while pending:
        node = pending.pop()
        seen += 1
        if seen > budget:
            return True
        if isinstance(node, dict):
            pending.extend(node.values())
            seen += len(node)  # each key is a value the validator reads
        elif isinstance(node, list):
            pending.extend(node)
    return False


def _first_field(error: ValidationError) -> str | None:
    """The top-level field of the first problem (OpenAI's ``param``); None for the body or odd keys."""
    details = error.errors(include_url=False, include_input=False, include_context=False)
    name = describe_location(details[0]["loc"][:1]) if details else "body"
    return None if name in ("body", "<key>") else name


def describe_validation_error(error: ValidationError) -> str:
    """The first few problems of a validation error, each as 'where: what', never the input."""
    problems = [
        describe_problem(detail)
        for detail in error.errors(include_url=False, include_input=False, include_context=False)
    ]
    more = len(problems) - _MAX_REPORTED_ERRORS
    message = "; ".join(problems[:_MAX_REPORTED_ERRORS]) + (f"; and {more} more" if more > 0 else "")
    return f"{message} (see the request schema at /docs)"


def _cancelled(job: Job) -> str:
    return f"the request was cancelled (POST /requests/{job.request_id[:100]}/cancel); send it again to retry"


class Throughput:
    """Images finished per second over the recent past, to tell a refused client when to retry."""

    WINDOW_S = 120.0
    MAX_RETRY_AFTER_S = 600

    def __init__(self) -> None:
        self._done: deque[tuple[float, int]] = deque(maxlen=256)  # (when, images) per request

    def record(self, images: int) -> None:
        self._done.append((time.monotonic(), images))

    def retry_after_s(self, waiting: int) -> int | None:
        """Seconds for ``waiting`` images to leave the queue at the recent rate; None before any
        request has finished within the window (the caller's default then applies)."""
        now = time.monotonic()
        recent = [(when, images) for when, images in self._done if now - when <= self.WINDOW_S]
        if not recent:
            return None
        # From the first finish in the window to now; at least a second, so one burst is no rate.
        span = max(now - recent[0][0], 1.0)
        rate = sum(images for _, images in recent) / span
        return max(1, min(self.MAX_RETRY_AFTER_S, math.ceil(waiting / rate)))


class Scorer:
    def __init__(
        self,
        engine: ServingEngine,
        step_loop: StepLoop,
        limits: ScoreLimits,
        encode_pool: Executor,
        image_urls: UrlPolicy | None = None,
        library: Library | None = None,
    ) -> None:
        self._engine = engine
        self.library = library or Library(engine.info.name)
        self._step_loop = step_loop
        self._limits = limits
        self._encode_pool = encode_pool
        self._image_urls = image_urls or UrlPolicy(hosts=())
        self._throughput = Throughput()

    @property
    def limits(self) -> ScoreLimits:
        """The operator's limits, which every route's parsing applies."""
        return self._limits

    async def score(self, body: bytes, job: Job | None = None) -> list[dict[str, Any]]:
        """The response records for ``body``; raises the errors of service/web/errors.py's table."""
        request = await parse_body_off_loop(body, ScoreRequest, self._limits)
        items = await self.items(request.input_data)
        results, images = await self.generate(items, prompts=len(request.input_data.rows), job=job)
        return to_records(items, results, images)

    @property
    def image_urls(self) -> UrlPolicy:
        """The hosts whose image URLs requests may name (SD_FETCH_IMAGE_URLS)."""
        return self._image_urls

    async def items(self, request: Request) -> list[GenerationItem]:
        """The engine items of any protocol's parsed request; its input images (decoded, checked,
        resized, maybe fetched: tens of milliseconds each) in a worker thread, off the event loop."""
        return await self.items_for(ask_of(request, self._engine.info))

    async def items_for(self, ask: Ask) -> list[GenerationItem]:
        """``Ask.items`` for the model it names (resolved against the library: ModelNotFoundError
        for one not served), off the event loop when it has images to decode."""
        model = self.library.resolve(ask.model, ask.model_field)
        ask = dataclasses.replace(ask, model=model)
        info = self.library.info(model, self._engine.info)
        if not ask.pictures:
            return ask.items(info)
        return await asyncio.to_thread(ask.items, info, urls=self._image_urls)

    async def generate(
        self, items: Sequence[GenerationItem], *, prompts: int, job: Job | None = None
    ) -> tuple[list[GenerationResult], list[str]]:
        """Every route's one way to images: the results of ``items`` and their base64 PNGs, in order.

        With a ``job`` (jobs.py) the request can be followed and stopped: cancelled, it raises
        RequestCancelledError; interrupted, it answers with the images it has (maybe none)."""
        # 1. Let the engine check what only it knows (schedulers, adapters, images), item by item:
        #    the step loop runs items of several sizes side by side (images in keep their own).
        for item in items:
            self._engine.validate([item])
        if job is not None and job.cancelled:  # cancelled while its body arrived
            raise RequestCancelledError(_cancelled(job))
        # 2. Queue every image; cancelling this coroutine cancels the futures, which frees the queue.
        if job is not None:
            job.begin([item.steps_run for item in items])
        try:
            futures = self._step_loop.submit(items, job)  # its lanes report each image's steps to the job
        except QueueFullError as error:
            error.retry_after_s = self._throughput.retry_after_s(error.waiting)
            raise
        if job is not None:
            job.futures = futures  # what cancel and interrupt take out
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        if job is not None and job.cancelled:
            raise RequestCancelledError(_cancelled(job))
        if job is not None and job.interrupted:
            outcomes = [each for each in outcomes if not isinstance(each, asyncio.CancelledError)]
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            raise errors[0]
        results: list[GenerationResult] = outcomes  # type: ignore[assignment]
        self._throughput.record(len(results))
        # 3. Encode the PNGs in the worker pool, in parallel, off the event loop.
        loop = asyncio.get_running_loop()
        images = await asyncio.gather(
            *(loop.run_in_executor(self._encode_pool, encode_png_base64, result.image) for result in results)
        )
        log.info(
            "scored %d prompt(s) -> %d image(s), %d flagged",
            prompts, len(results), sum(bool(r.nsfw_content_detected) for r in results),
        )  # fmt: skip
        return results, list(images)
