"""What a job keeps of the request it was submitted as: the route, and the body with its seeds
fixed, so that a job run again after a crash or a restart draws the very images it would have.

Every generation route can be a job's; each names its seed in its own place: /score's
``input_data.parameters.seed``, OpenAI's ``seed``, AUTOMATIC1111's ``seed`` (-1 draws one), Hugging
Face's ``parameters.seed``, and OpenAI's edits form a ``seed`` field. A seed the client gave is kept.
"""

from __future__ import annotations

import json
import re
from base64 import b64encode
from dataclasses import dataclass
from typing import Any

from schemas.fields import ScoreLimits
from service.runtime.errors import ContractError
from service.runtime.items import random_seed
from service.runtime.scoring import parse_document

JSON = "application/json"
MULTIPART = "multipart/form-data"
# The routes a job may run, and where each one's seed goes in its JSON body.
SEED_PLACES: dict[str, tuple[str, ...]] = {
    "/score": ("input_data", "parameters", "seed"),
    "/v1/images/generations": ("seed",),
    "/v1/images/edits": ("seed",),  # a form field
    "/sdapi/v1/txt2img": ("seed",),
    "/sdapi/v1/img2img": ("seed",),
    "/": ("parameters", "seed"),
}
_BOUNDARY = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)


@dataclass(frozen=True)
class JobBody:
    route: str
    body: bytes
    content_type: str


def job_body(route: str, body: bytes, content_type: str, limits: ScoreLimits) -> JobBody:
    """The body a job keeps: its seed fixed (one drawn now when it has none). Refuses, with a 4xx
    naming the field, a body that is not an object, larger than any valid request (the routes'
    own budget of JSON values), or that asks for a stream (a job's answer is kept whole). Parses
    the body: call it off the event loop."""
    media = content_type.partition(";")[0].strip().lower()
    _check_route(route)
    if route == "/v1/images/edits":
        if media != MULTIPART:
            raise ContractError(f"/v1/images/edits takes a {MULTIPART} form (its image and mask as files)")
        return JobBody(route, _form_with_seed(body, content_type), content_type)
    if route == "/" and media != JSON:  # Hugging Face's image_to_image without parameters: the image alone
        document: Any = {"inputs": b64encode(body).decode("ascii"), "parameters": {}}
    else:
        document = parse_document(body, limits, "the route's JSON body")
    return job_document(route, document)


def _check_route(route: str) -> None:
    if route not in SEED_PLACES:
        raise ContractError(f"route must be one of: {', '.join(SEED_PLACES)} (the generation routes)")


def job_document(route: str, document: Any) -> JobBody:
    """``job_body`` for a JSON body parsed already (``POST /v1/jobs``' ``body``)."""
    _check_route(route)
    if not isinstance(document, dict):
        raise ContractError("the body must be a JSON object, the route's own request")
    if document.get("stream") is True:
        raise ContractError("stream: a job's answer is kept whole; leave stream out (or false)")
    _pin(document, SEED_PLACES[route])
    return JobBody(route, json.dumps(document).encode(), JSON)


def _pin(document: dict[str, Any], place: tuple[str, ...]) -> None:
    """Set the seed at ``place`` unless the client set one (A1111's -1 is "draw one")."""
    node = document
    for key in place[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            return  # off the contract: the route says so when the job runs
        node = child
    if node.get(place[-1]) in (None, -1):
        node[place[-1]] = random_seed()


def _form_with_seed(body: bytes, content_type: str) -> bytes:
    """A multipart form with a ``seed`` field added before its closing boundary, unless it has one."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise ContractError("the multipart Content-Type has no boundary")
    boundary = match.group(1).encode("latin-1")
    if re.search(rb'name="seed"', body):
        return body
    closing = b"--" + boundary + b"--"
    end = body.rfind(closing)
    if end < 0:
        raise ContractError("the multipart form has no closing boundary")
    part = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="seed"\r\n\r\n'
    return body[:end] + part + str(random_seed()).encode() + b"\r\n" + body[end:]
