"""Log lines carry the request id, come as JSON when asked, and never quote a prompt."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from service.logs import MAX_MESSAGE_CHARS, JsonFormatter, RequestContextFilter, TextFormatter, request_id_var

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


@pytest.mark.parametrize("length", [2001, 60_000, 1_000_000])
def test_any_long_message_is_cut_with_a_marker_in_both_formats(length: int) -> None:
    # uvicorn's own WebSocket line quotes the whole path: no library line may grow the log unbounded.
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, '"WebSocket /%s" 403', ("p" * length,), None
    )
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert (
            len(line) < MAX_MESSAGE_CHARS + 300
            and f"[{len(record.getMessage()) - MAX_MESSAGE_CHARS} more chars cut]" in line
        )
    short = logging.LogRecord("service.access", logging.INFO, __file__, 1, "GET / 200", None, None)
    assert "cut" not in TextFormatter().format(short)
