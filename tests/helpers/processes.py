"""A real `sd-endpoint serve` process on a free port, for tests that drive it from outside."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import stop_process
from tests.helpers.ports import free_port

SERVE = [sys.executable, "-m", "service.cli.main", "serve"]
STARTUP_LIMIT_S = 300
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without SD_* settings (a stray SD_API_KEY would change the outcome)."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("SD_")}
    environment.update(extra)
    return environment


def start_server(log_path: Path, *, command: Sequence[str] = SERVE, cwd: Path = REPO, **env: str) -> Server:
    """`sd-endpoint serve` (``command``, run in ``cwd``) on random:tiny (unless ``env`` names SD_MODEL)
    and a free port, returned once GET / answers "Healthy"."""
    port = free_port()
    # Each server its own jobs folder (unless the test shares one): no server runs another's jobs.
    data = str(log_path.parent / f"data-{port}")
    defaults = {"SD_MODEL": "random:tiny", "SD_HOST": "127.0.0.1", "SD_PORT": str(port), "SD_DATA_DIR": data}
    environment = clean_env(**{**defaults, **env})
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    pytest.fail(f"the server was not ready within {STARTUP_LIMIT_S} s:\n{log_path.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    stop_process(server.process, grace_s=60)


@contextmanager
def serving(
    log_path: Path, *, command: Sequence[str] = SERVE, cwd: Path = REPO, **env: str
) -> Iterator[Server]:
    """A server process for the length of a ``with`` block (a module fixture's usual shape)."""
    running = start_server(log_path, command=command, cwd=cwd, **env)
    try:
        yield running
    finally:
        stop_server(running)


def server_fixture(name: str, *, fixture: str = "server", **env: str) -> Any:
    """A module-scoped fixture (``server`` unless ``fixture`` names another) serving with ``env`` (its log
    in a fresh folder ``name``), for the modules whose servers differ only by their settings: one place
    starts and stops them all."""

    @pytest.fixture(scope="module", name=fixture)
    def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
        with serving(tmp_path_factory.mktemp(name) / "server.log", **env) as running:
            yield running

    return server
