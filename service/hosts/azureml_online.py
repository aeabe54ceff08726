"""Azure ML entry script: ``init()`` and ``run(raw_data)`` for azureml-inference-server-http.

Point a deployment's ``code_configuration.scoring_script`` here (or at a one-line file that does
``from service.hosts.azureml_online import init, run``). It serves the same contract through the same code as
``POST /score``: the scorer, the step loop and the error table. Concurrent ``run`` calls (the
inference server's worker threads) are batched together by one event loop in a background thread.
Errors are answered with their real status when the inference server's AMLResponse is importable,
else as the error body with status 200 (the only thing a plain return value can carry). Logging is
left to the inference server, which configures its own handlers.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from service.runtime.errors import RequestTimeoutError
from service.runtime.lifecycle import Lifecycle, Phase
from service.runtime.metrics import Metrics
from service.settings import Settings, load_settings
from service.web.errors import classify

_bridge: _Bridge | None = None


class _Bridge:
    """A Lifecycle (model, step loop, scorer) on an event loop that runs in its own thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="scoring-loop", daemon=True)
        self.thread.start()
        self.lifecycle = Lifecycle(settings, Metrics())

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        if self.lifecycle.phase is not Phase.READY:
            raise RuntimeError(self.lifecycle.failure or "the model did not become ready")

    async def _start(self) -> None:
        self.lifecycle.begin()
        await self.lifecycle.wait_started()

    def score(self, body: bytes) -> tuple[int, Any]:
        """(status, JSON-ready payload) for one request body."""
        return asyncio.run_coroutine_threadsafe(self._score(body), self.loop).result()

    async def _score(self, body: bytes) -> tuple[int, Any]:
        timeout_s = self.settings.request_timeout_s
        try:
            async with self.lifecycle.serving() as runtime:
                try:
                    records = await asyncio.wait_for(runtime.scorer.score(body), timeout_s)
                except asyncio.TimeoutError:
                    raise RequestTimeoutError.after(timeout_s) from None
            return 200, records
        except Exception as error:
            kind, message = classify(error)
            return kind.status, {"error": {"code": kind.code, "message": message, "status": kind.status}}

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.lifecycle.stop(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def init(settings: Settings | None = None) -> None:
    """Load the model (AZUREML_MODEL_DIR unless SD_MODEL says otherwise) and warm it up."""
    global _bridge
    settings = settings or load_settings()
    bridge = _Bridge(settings)
    bridge.start()
    _bridge = bridge


def run(raw_data: str | bytes | Any) -> Any:
    """Score one request body: the JSON text, a request object with ``get_data``, or the JSON
    already parsed (a dict or list, as a caller that decoded it first passes)."""
    if _bridge is None:
        raise RuntimeError("init() has not run; the inference server calls it once before run()")
    body = raw_data.get_data() if hasattr(raw_data, "get_data") else raw_data
    status, payload = _bridge.score(_as_bytes(body))
    if status == 200:
        return payload
    response_class = _aml_response_class()
    if response_class is None:
        return payload
    return response_class(payload, status, json_str=True)


def _as_bytes(body: object) -> bytes:
    """The body as the scorer parses it: whatever is wrong with it is the parser's to say (400/422)."""
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass")  # a lone surrogate stays, to be refused
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    try:  # parsed already (a dict or list): the same JSON again
        return json.dumps(body).encode()
    except (TypeError, ValueError):
        return b""  # not JSON at all: the parser answers 400 malformed_json


def shutdown() -> None:
    """Release the model (tests; the inference server simply exits)."""
    global _bridge
    if _bridge is not None:
        _bridge.stop()
        _bridge = None


def _aml_response_class() -> Any:
    try:
        from azureml_inference_server_http.api.aml_response import AMLResponse
    except ImportError:
        try:
            from azureml.contrib.services.aml_response import AMLResponse
        except ImportError:
            return None
    return AMLResponse
