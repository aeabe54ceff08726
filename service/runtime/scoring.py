"""Scoring one request body, from bytes to response records. Shared by POST /score and the Azure ML
entry script, so both speak exactly the same contract; ``Scorer.generate`` (queue, await, encode) and
``parse_body`` are the one path of every other route too (OpenAI's /v1/images/generations)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError

from model.types import GenerationItem, GenerationResult
from schemas.score import ScoreLimits, ScoreRequest, describe_location
from service.runtime.batching.batcher import Batcher
from service.runtime.batching.steploop import StepLoop
from service.runtime.convert import FieldError, to_items, to_records
from service.runtime.engines import ServingEngine
from service.runtime.errors import ContractError, MalformedJsonError, RequestCancelledError
from service.runtime.images import encode_png_base64
from service.runtime.jobs import Job

log = logging.getLogger(__name__)

_MAX_REPORTED_ERRORS = 5
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


def parse_request(body: bytes, limits: ScoreLimits) -> ScoreRequest:
    """Bytes -> ScoreRequest. Malformed JSON: MalformedJsonError; off the contract: ContractError."""
    return parse_body(body, ScoreRequest, limits)


def parse_body(
    body: bytes, model: type[M], limits: ScoreLimits, *, expected: str = "the input_data object"
) -> M:
    """Bytes -> ``model``: every route's body (/score's, OpenAI's) under the same rules, limits and
    messages. Off the contract: FieldError, a ContractError that also names the first field at fault."""
    # 1. JSON. Python's parser accepts NaN and Infinity; the contract does not.
    document = parse_json(body, expected)
    # 2. The contract, with the operator's limits.
    try:
        return model.model_validate(document, context={"limits": limits})
    except RecursionError:
        raise ContractError("the body nests too deeply; see the request schema at /docs") from None
    except ValidationError as error:
        raise FieldError(describe_validation_error(error), param=_first_field(error)) from None


def _first_field(error: ValidationError) -> str | None:
    """The top-level field of the first problem (OpenAI's ``param``); None for the body or odd keys."""
    details = error.errors(include_url=False, include_input=False, include_context=False)
    name = describe_location(details[0]["loc"][:1]) if details else "body"
    return None if name in ("body", "<key>") else name


def describe_validation_error(error: ValidationError) -> str:
    """The first few problems of a validation error, each as 'where: what', never the input."""
    problems = [
        f"{describe_location(detail['loc'])}: {detail['msg']}"
        for detail in error.errors(include_url=False, include_input=False, include_context=False)
    ]
    more = len(problems) - _MAX_REPORTED_ERRORS
    message = "; ".join(problems[:_MAX_REPORTED_ERRORS]) + (f"; and {more} more" if more > 0 else "")
    return f"{message} (see the request schema at /docs)"


def _cancelled(job: Job) -> str:
    return f"the request was cancelled (POST /requests/{job.request_id[:100]}/cancel); send it again to retry"


class Scorer:
    def __init__(
        self, engine: ServingEngine, batcher: Batcher | StepLoop, limits: ScoreLimits, encode_pool: Executor
    ) -> None:
        self._engine = engine
        self._batcher = batcher
        self._limits = limits
        self._encode_pool = encode_pool

    @property
    def limits(self) -> ScoreLimits:
        """The operator's limits, which every route's parsing applies."""
        return self._limits

    async def score(self, body: bytes, job: Job | None = None) -> list[dict[str, Any]]:
        """The response records for ``body``; raises the errors of service/web/errors.py's table."""
        request = parse_request(body, self._limits)
        items = to_items(request.input_data, self._engine.info)
        results, images = await self.generate(items, prompts=len(request.input_data.rows), job=job)
        return to_records(items, results, images)

    async def generate(
        self, items: Sequence[GenerationItem], *, prompts: int, job: Job | None = None
    ) -> tuple[list[GenerationResult], list[str]]:
        """Every route's one way to images: the results of ``items`` and their base64 PNGs, in order.

        With a ``job`` (jobs.py) the request can be followed and stopped: cancelled, it raises
        RequestCancelledError; interrupted, it answers with the images it has (maybe none)."""
        # 1. Let the engine check what only it knows (schedulers).
        self._engine.validate(items)
        if job is not None and job.cancelled:  # cancelled while its body arrived
            raise RequestCancelledError(_cancelled(job))
        # 2. Queue every image; cancelling this coroutine cancels the futures, which frees the queue.
        if job is not None:
            job.begin([item.num_inference_steps for item in items])
        if job is not None and isinstance(self._batcher, StepLoop):
            futures = self._batcher.submit(items, job)  # its lanes report each image's steps to the job
        else:
            futures = self._batcher.submit(items)
        if job is not None:
            job.futures = futures  # what cancel and interrupt take out (request-level batching: cancel)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        if job is not None and job.cancelled:
            raise RequestCancelledError(_cancelled(job))
        if job is not None and job.interrupted:
            outcomes = [each for each in outcomes if not isinstance(each, asyncio.CancelledError)]
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            raise errors[0]
        results: list[GenerationResult] = outcomes  # type: ignore[assignment]
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
