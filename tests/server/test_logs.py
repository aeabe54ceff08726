"""Log lines carry the request id, come as JSON when asked, and never quote a prompt."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from service.logs import JsonFormatter, RequestContextFilter, request_id_var

PROMPT_TAIL = "MAGENTA-OWL-3391"


@pytest.fixture()
def json_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("diffusers.pipelines.example")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def test_json_lines_carry_the_request_id(json_lines: io.StringIO) -> None:
    token = request_id_var.set("req-42")
    try:
        logging.getLogger("diffusers.pipelines.example").info("batch of %d done", 3)
    finally:
        request_id_var.reset(token)
    line = json.loads(json_lines.getvalue())
    assert line["request_id"] == "req-42" and line["message"] == "batch of 3 done"
    assert line["level"] == "INFO" and line["logger"] == "diffusers.pipelines.example"


def test_the_clip_truncation_warning_does_not_quote_the_prompt(json_lines: io.StringIO) -> None:
    # diffusers' own wording: it appends the truncated part of the prompt.
    logging.getLogger("diffusers.pipelines.example").warning(
        "The following part of your input was truncated because CLIP can only handle sequences up to"
        f" {77} tokens: {[PROMPT_TAIL]}"
    )
    line = json.loads(json_lines.getvalue())
    assert PROMPT_TAIL not in json_lines.getvalue()
    assert "truncated" in line["message"]
