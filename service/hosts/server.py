"""`sd-endpoint serve`: run the scoring server with uvicorn, draining on SIGTERM.

On SIGTERM (or Ctrl+C) readiness turns 503 at once, requests in flight and in the queue finish
(up to SD_DRAIN_TIMEOUT_S; those still running then are answered 503 shutting_down), then the
process exits 0 without waiting for engine work nobody waits for. A second signal exits at once
with status 1.
If the model cannot be loaded, the process exits 1 so that the orchestrator sees the failure; so
does an address it cannot listen on, found before the model loads. A bad setting is one line on
stderr and exit status 2, before anything loads.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings

# After the drain, uvicorn still waits for open connections; this bounds that last wait.
FINAL_CLOSE_TIMEOUT_S = 5
EXIT_BAD_SETTING = 2  # as argparse's usage errors
EXIT_CANNOT_SERVE = 1  # as a model that cannot load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="model spec (SD_MODEL): a diffusers folder, a .safetensors/.ckpt file, an Azure ML model "
        "folder, a hub id or random:tiny; default AZUREML_MODEL_DIR, else random:tiny",
    )
    parser.add_argument("--host", help="address to listen on (SD_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (SD_PORT, default 5001)")


def run(args: argparse.Namespace) -> int:
    from service.logs import configure_logging, quiet_library_output
    from service.settings import SettingsError, load_settings

    overrides = {
        name: value for name in ("model", "host", "port") if (value := getattr(args, name)) is not None
    }
    try:
        settings = load_settings(**overrides)
    except SettingsError as error:
        print(f"sd-endpoint serve: error: {error}; fix it (or the option that sets it) and start again",
              file=sys.stderr)  # fmt: skip
        return EXIT_BAD_SETTING
    # The address first: a busy port must not cost a model load (minutes on a GPU) to find out.
    try:
        listener = listen(settings.host, settings.port)
    except OSError as error:
        print(f"sd-endpoint serve: error: cannot listen on {settings.host}:{settings.port}: "
              f"{error.strerror or error}; stop what uses it, or choose another SD_PORT (--port) or "
              f"SD_HOST (--host)", file=sys.stderr)  # fmt: skip
        return EXIT_CANNOT_SERVE
    configure_logging(settings.log_level, settings.log_format)
    quiet_library_output()  # before the app's imports, which load the model's libraries
    from service.web.app import create_app

    return serve(create_app(settings), settings, listener)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port``, as uvicorn binds one (OSError when it cannot be)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(app: FastAPI, settings: Settings, listener: socket.socket | None = None) -> int:
    """Serve ``app`` on ``listener`` (default: bound here) until a signal has drained it; the
    process exit code."""
    import uvicorn

    from service.hosts.connections import guarded_protocol
    from service.hosts.draining import DrainingServer, exit_now

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings.header_timeout_s),
        limit_concurrency=settings.max_connections,  # beyond it uvicorn answers 503 at once
        timeout_keep_alive=int(settings.keep_alive_timeout_s),
        log_config=None,  # ours, from configure_logging
        access_log=False,  # the request-context middleware logs one line per request, with its id
        timeout_graceful_shutdown=FINAL_CLOSE_TIMEOUT_S,
        lifespan="on",
    )
    server = DrainingServer(config, app.state.lifecycle)
    server.run(sockets=[listener or listen(settings.host, settings.port)])
    code = 1 if server.load_failed else 0
    if app.state.lifecycle.engine_busy:
        # The engine thread still runs a batch that nobody waits for (the drain ran out of time):
        # the interpreter would join it before exiting, for as long as the batch takes.
        exit_now(code, "exiting without waiting for the engine's abandoned batch")
    return code
