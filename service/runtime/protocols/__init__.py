"""The client protocols this server speaks, one module each, registered in one table (``PROTOCOLS``).

Each protocol maps its own request schemas (schemas/) to an ``Ask`` (service/runtime/items.py: the
one place an item's fields are spelled), builds its answers, and says what its error body looks
like; the web layer finds a route's protocol with ``protocol_for`` to answer its errors in the
client's shape (service/web/errors.py). The requests arrive checked against schemas/fields.py; the
one rule checked here is a scheduler's name, which only the model knows (common.check_scheduler);
the engine checks the rest of what only it knows once per request (Scorer.generate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from model.types import GenerationItem, ModelInfo
from schemas.a1111 import Txt2ImgRequest
from schemas.a1111_img2img import Img2ImgRequest
from schemas.huggingface import ImageToImageRequest, TextToImageRequest
from schemas.openai import ImageGenerationRequest
from schemas.openai_edits import ImageEditRequest
from schemas.score import InputData
from service.runtime.items import Ask
from service.runtime.protocols import a1111, huggingface, openai, score
from service.runtime.protocols.common import FieldError

__all__ = ["PROTOCOLS", "FieldError", "Protocol", "Request", "ask_of", "items_of", "protocol_for"]

ErrorBody = Callable[[int, str, str, "str | None"], tuple[int, dict[str, Any]]]


@dataclass(frozen=True)
class Protocol:
    name: str
    requests: dict[type[Any], Callable[[Any, ModelInfo], Ask]]  # each request schema -> its Ask
    owns: Callable[[str, str], bool]  # (path, method): whether a route is this protocol's
    error: ErrorBody  # (status, code, message, param) -> (the status sent, the body)


PROTOCOLS: tuple[Protocol, ...] = (
    Protocol(
        "openai",
        {ImageGenerationRequest: openai.openai_ask, ImageEditRequest: openai.openai_ask},
        openai.owns,
        openai.openai_error,
    ),
    Protocol(
        "a1111",
        {Txt2ImgRequest: a1111.a1111_ask, Img2ImgRequest: a1111.a1111_ask},
        a1111.owns,
        a1111.a1111_error,
    ),
    Protocol(
        "huggingface",
        {
            TextToImageRequest: huggingface.huggingface_ask,
            ImageToImageRequest: huggingface.huggingface_image_ask,
        },
        huggingface.owns,
        huggingface.huggingface_error,
    ),
    # Azure ML's contract, and the shape of every other route's errors: last, it owns the rest.
    Protocol("score", {InputData: score.score_ask}, lambda path, method: True, score.score_error),
)
_ASKS = {schema: ask for protocol in PROTOCOLS for schema, ask in protocol.requests.items()}

Request = (
    InputData
    | ImageGenerationRequest
    | ImageEditRequest
    | Txt2ImgRequest
    | TextToImageRequest
    | ImageToImageRequest
)


def protocol_for(path: str, method: str) -> Protocol:
    """The protocol whose routes ``path`` (with ``method``) belongs to."""
    return next(protocol for protocol in PROTOCOLS if protocol.owns(path, method))


def ask_of(request: Request, info: ModelInfo) -> Ask:
    """What any protocol's parsed request asks of the engine (its images come from ``Ask.items``)."""
    return _ASKS[type(request)](request, info)


def items_of(request: Request, info: ModelInfo) -> list[GenerationItem]:
    """One item per image of a parsed request without images in, in response order (items.Ask)."""
    return ask_of(request, info).items(info)
