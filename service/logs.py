"""Logging: every line carries the request id of the request it belongs to; text or JSON lines.

Prompts, images and keys never reach the log at INFO. Our code does not log them; the one library
line that would (CLIP's "input was truncated" warning, which quotes the prompt's tail) is rewritten
by a filter on our handler, and the libraries' own handlers are removed (quiet_library_output) so
that their lines pass through it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import numbers
import re
import sys
from datetime import datetime, timezone

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
_TRUNCATION_MARKERS = ("input was truncated", "can only handle sequences up to")
_TRUNCATION_NOTE = (
    "a prompt was longer than the text encoder's token limit and was truncated (text not logged)"
)


# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators: anything a
# terminal or a log shipper could take for a new line or an escape sequence.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# No message, ours or a library's (uvicorn's WebSocket line quotes the whole path), is logged longer
# than this: a client cannot grow the log by more than this per line. The cut says so.
MAX_MESSAGE_CHARS = 2000


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ...), so that
    no logged value (a URL path, a request id, a message) can forge a line or colour the log."""
    return _CONTROL.sub(_escape_one, text)


def safe_message(record: logging.LogRecord) -> str:
    """The record's message, control characters escaped, cut to MAX_MESSAGE_CHARS with a marker."""
    text = escape_controls(record.getMessage())
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]}...[{len(text) - MAX_MESSAGE_CHARS} more chars cut]"


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
    return named or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` to every record and rewrites records that would quote a prompt."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        if isinstance(record.msg, str) and any(marker in record.msg for marker in _TRUNCATION_MARKERS):
            record.msg, record.args = _TRUNCATION_NOTE, None
        return True


class TextFormatter(logging.Formatter):
    """The text format. What a record's arguments bring (paths, ids, error text: anything a client
    may have sent) has its control characters escaped; the line breaks of the format string itself,
    which is code (the server's banners), start new lines, each with the usual prefix."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord(record.__dict__)
        safe.args = None
        safe.name = escape_controls(record.name)
        safe.request_id = escape_controls(str(getattr(record, "request_id", "-")))
        lines = _own_lines(record)
        if lines is None:  # not a plain format string with positional arguments: one escaped line
            safe.msg = safe_message(record)
            return super().format(safe)
        # Every line a record of its own (same time, level, logger and id); a traceback, which only
        # our code writes, follows the last one.
        formatted = []
        for index, line in enumerate(lines):
            one = logging.makeLogRecord({**safe.__dict__, "msg": line})
            if index < len(lines) - 1:
                one.exc_info, one.exc_text, one.stack_info = None, None, None
            formatted.append(super().format(one))
        return "\n".join(formatted)


def _own_lines(record: logging.LogRecord) -> list[str] | None:
    """The message as lines: the format string split where it breaks, each line with its arguments
    put in escaped (numbers as they are); None when the record has no such format string."""
    if not isinstance(record.msg, str) or not isinstance(record.args, tuple):
        return None
    args = tuple(arg if isinstance(arg, numbers.Number) else escape_controls(str(arg)) for arg in record.args)
    try:
        message = record.msg % args if args else record.msg
    except (TypeError, ValueError):
        return None
    if len(message) > MAX_MESSAGE_CHARS:
        message = f"{message[:MAX_MESSAGE_CHARS]}...[{len(message) - MAX_MESSAGE_CHARS} more chars cut]"
    return [escape_controls(line) for line in message.split("\n")]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message (+ exception). JSON
    escapes C0 controls itself; the others are escaped as in the text format."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": escape_controls(record.name),
            "request_id": escape_controls(str(getattr(record, "request_id", "-"))),
            "message": safe_message(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Install one stderr handler on the root logger (replacing any before it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's loggers have handlers of their own; route them through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def quiet_library_output() -> None:
    """Send diffusers' and transformers' log records through our handler instead of their own, and
    turn off their progress bars (a server has no terminal; bars would break JSON logs).

    Imports both libraries (seconds), so only a process about to load a model calls it, before the
    model's own imports can log anything.
    """
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()
