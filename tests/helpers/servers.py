"""Helpers for the server tests: a real uvicorn server in a thread, and an engine wrapper the tests
can hold at a gate, fail on demand, and ask which batches it ran (also in a server process of its
own: ``gated_server``)."""

from __future__ import annotations

import base64
import functools
import io
import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from PIL import Image

from model.errors import EngineOutOfMemoryError
from model.types import GenerationItem, GenerationResult, ModelInfo
from service.hosts.connections import guarded_protocol
from service.settings import Settings
from service.web.app import create_app
from tests.helpers.ports import free_port
from tests.helpers.processes import REPO, clean_env

STARTUP_LIMIT_S = 120
METRIC_WAIT_S = 30  # far longer than the server needs; only a broken server waits this long
_ENGINE_LOCK = threading.Lock()
SMALL = {"num_inference_steps": 2, "guidance_scale": 7.5}  # fast on the CPU; 128x128 is tiny's native size


@functools.cache
def tiny_engine() -> Any:
    """random:tiny, loaded once per test process and shared by the servers of every test module."""
    import model

    return model.load("random:tiny", device="cpu")


class GatedEngine:
    """Wraps a real engine. ``gate`` (open by default) holds every batch (request-level batching)
    or every step (the step loop) before it runs; ``batches`` records the items of every batch
    that ran, and every item the step loop admitted (as a batch of one); a batch or step holding a
    prompt of ``oom_prompts`` runs out of memory, however small, one holding a prompt of
    ``crash_prompts`` raises a plain RuntimeError. Closing it leaves the wrapped engine open, so
    that tests share one loaded model.

    The per-step API is kept here (each item counts its steps; at its last step its image is made
    with the real engine's ``generate``), so that servers sharing the wrapped engine never share
    its running set; the real per-step engine is tested on its own and in real server processes."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Semaphore(0)  # released each time a batch reaches the gate
        self.batches: list[list[GenerationItem]] = []
        self.oom_prompts: set[str] = set()
        self.crash_prompts: set[str] = set()  # a batch holding one of these raises a plain RuntimeError
        self._admitted: dict[int, list[Any]] = {}  # handle -> [item, steps done, result]
        self._handles = itertools.count(1)

    @property
    def info(self) -> ModelInfo:
        info: ModelInfo = self.engine.info
        return info

    def validate(self, items: Sequence[GenerationItem]) -> None:
        self.engine.validate(items)

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        self.waiting.release()
        self.gate.wait()
        if any(item.prompt in self.oom_prompts for item in items):
            raise EngineOutOfMemoryError(f"out of memory for a batch of {len(items)}")
        if any(item.prompt in self.crash_prompts for item in items):
            raise RuntimeError("kernel exploded at 0xDEADBEEF")
        with _ENGINE_LOCK:  # servers of one module may share the engine, which is not thread-safe
            self.batches.append(list(items))
            results: list[GenerationResult] = self.engine.generate(items)
        return results

    def warmup(self) -> None:
        self.engine.warmup()

    def admit(self, item: GenerationItem) -> int:
        self.engine.validate([item])
        handle = next(self._handles)
        self._admitted[handle] = [item, 0, None]
        self.batches.append([item])
        return handle

    def step(self) -> list[int]:
        self.waiting.release()
        self.gate.wait()
        running = [entry for entry in self._admitted.values() if entry[2] is None]
        if any(entry[0].prompt in self.oom_prompts for entry in running):
            raise EngineOutOfMemoryError(f"out of memory for a step of {len(running)}")
        if any(entry[0].prompt in self.crash_prompts for entry in running):
            raise RuntimeError("kernel exploded at 0xDEADBEEF")
        finished = []
        for handle, entry in self._admitted.items():
            if entry[2] is None:
                entry[1] += 1
                if entry[1] >= entry[0].num_inference_steps:
                    with _ENGINE_LOCK:
                        entry[2] = self.engine.generate([entry[0]])[0]
                    finished.append(handle)
        return finished

    def retire(self, handles: Sequence[int]) -> list[GenerationResult]:
        return [self._admitted.pop(handle)[2] for handle in handles]

    def cancel(self, handle: int) -> None:
        self._admitted.pop(handle, None)

    def close(self) -> None:
        pass

    def wait_until_held(self, batches: int = 1) -> None:
        """Block until ``batches`` more batches have reached the gate."""
        for _ in range(batches):
            if not self.waiting.acquire(timeout=STARTUP_LIMIT_S):
                raise AssertionError("the engine was never called")


class ThreadServer:
    """``create_app(settings, engine=...)`` served by uvicorn on a free port, in a thread."""

    def __init__(
        self, settings: Settings, engine: Any | None = None, guarded: type[Any] | None = None
    ) -> None:
        """``guarded``: uvicorn's HTTP protocol (httptools' or h11's) to serve with, wrapped in the
        connection guards of `sd-endpoint serve` (service/hosts/connections.py); default: uvicorn's own."""
        self.app = create_app(settings, engine=engine)
        http: Any = "auto" if guarded is None else guarded_protocol(settings, self.app.state.metrics, guarded)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_config=None, lifespan="on", http=http)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while not (self.server.started and self.server.servers):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError("the server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        wait_ready(self.url)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def wait_ready(url: str, headers: dict[str, str] | None = None) -> None:
    """Poll GET / until it answers 200 (model loaded and warmed up)."""
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/", headers=headers, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} was not ready within {STARTUP_LIMIT_S} s")


def request_body(data: list[Any], columns: Sequence[str] = ("prompt",), **parameters: Any) -> dict[str, Any]:
    return {"input_data": {"columns": list(columns), "data": data, "parameters": {**SMALL, **parameters}}}


def decode_png(text: str) -> np.ndarray:
    """A record's generated_image -> HxWx3 uint8 (fails unless it is a plain base64 PNG)."""
    raw = base64.b64decode(text, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def metric_value(metrics_text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text, e.g. ``sd_queue_depth`` or
    ``sd_requests_total`` with labels ``route="/score",status="200"`` (0 when absent)."""
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, rest = key.partition("{")
        if sample == name and (not labels or all(part in rest for part in labels.split(","))):
            return float(value)
    return 0.0


def wait_for_metric(url: str, name: str, value: float, labels: str = "") -> None:
    """Poll /metrics until ``name`` has ``value`` (the server's state, observed without sleeping blindly)."""
    deadline = time.monotonic() + METRIC_WAIT_S
    while metric_value(httpx.get(f"{url}/metrics").text, name, labels) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never reached {value}")
        time.sleep(0.02)


@contextmanager
def held(engine: GatedEngine) -> Iterator[GatedEngine]:
    """Close the gate for the duration; always reopen it so that later tests are not stuck."""
    engine.waiting = threading.Semaphore(0)  # count only the batches from now on
    engine.gate.clear()
    try:
        yield engine
    finally:
        engine.gate.set()


class FileGatedEngine(GatedEngine):
    """For a server in another process: each batch (or step) writes ``<folder>/started`` and waits
    for ``<folder>/release`` to exist."""

    def __init__(self, engine: Any, folder: Path) -> None:
        super().__init__(engine)
        self.folder = folder

    def _hold(self) -> None:
        (self.folder / "started").touch()
        while not (self.folder / "release").exists():
            time.sleep(0.02)

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        self._hold()
        return super().generate(items)

    def step(self) -> list[int]:
        self._hold()
        return super().step()


@contextmanager
def gated_server(folder: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``serve_gated`` in a process of its own (settings: ``env``), its log ``folder/server.log``; its
    engine holds every batch until ``folder/release`` exists. Yields (its URL, the process) once it
    answers; kills it afterwards if it still runs."""
    port = free_port()
    environment = clean_env(SD_PORT=str(port), SD_MAX_BATCH_WAIT_MS="0", **env)
    log_path = folder / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.servers", str(folder)],
            env=environment, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_held(folder: Path, process: subprocess.Popen[bytes], request: Any) -> None:
    """Until ``gated_server``'s engine holds a batch (``request``'s, a Future); the process must not
    exit nor the request be answered meanwhile."""
    while not (folder / "started").exists():
        assert process.poll() is None and not request.done(), (folder / "server.log").read_text()
        time.sleep(0.02)


def serve_gated(folder: str) -> int:
    """``python -m tests.helpers.servers FOLDER``: `sd-endpoint serve`'s code path (settings from the
    environment, signals, drain) around random:tiny held by a FileGatedEngine."""
    from service.hosts.server import serve
    from service.logs import configure_logging, quiet_library_output

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    quiet_library_output()
    engine = FileGatedEngine(tiny_engine(), Path(folder))
    return serve(create_app(settings, engine=engine), settings)


if __name__ == "__main__":
    sys.exit(serve_gated(sys.argv[1]))
