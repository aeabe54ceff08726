"""`sd-endpoint serve`: run the scoring server with uvicorn, draining on SIGTERM.

On SIGTERM (or Ctrl+C) readiness turns 503 at once, requests in flight and in the queue finish
(up to SD_DRAIN_TIMEOUT_S), then the process exits 0. A second signal exits without waiting.
If the model cannot be loaded, the process exits 1 so that the orchestrator sees the failure.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings

# After the drain, uvicorn still waits for open connections; this bounds that last wait.
FINAL_CLOSE_TIMEOUT_S = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="model spec (SD_MODEL): a diffusers folder, an Azure ML model folder, a hub id or random:tiny; "
        "default AZUREML_MODEL_DIR, else random:tiny",
    )
    parser.add_argument("--host", help="address to listen on (SD_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (SD_PORT, default 5001)")


def run(args: argparse.Namespace) -> int:
    from service.logs import configure_logging, quiet_library_output
    from service.settings import Settings

    overrides = {
        name: value for name in ("model", "host", "port") if (value := getattr(args, name)) is not None
    }
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    quiet_library_output()  # before the app's imports, which load the model's libraries
    from service.web.app import create_app

    return serve(create_app(settings), settings)


def serve(app: FastAPI, settings: Settings) -> int:
    """Serve ``app`` until a signal has drained it; the process exit code."""
    import uvicorn

    from service.hosts.draining import DrainingServer

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # ours, from configure_logging
        access_log=False,  # the request-context middleware logs one line per request, with its id
        timeout_graceful_shutdown=FINAL_CLOSE_TIMEOUT_S,
        lifespan="on",
    )
    server = DrainingServer(config, app.state.lifecycle)
    server.run()
    return 1 if server.load_failed else 0
