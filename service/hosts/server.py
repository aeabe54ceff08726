"""`sd-endpoint serve`: run the scoring server with uvicorn, draining on SIGTERM.

On SIGTERM (or Ctrl+C) readiness turns 503 at once, requests in flight and in the queue finish
(up to SD_DRAIN_TIMEOUT_S; those still running then are answered 503 shutting_down), then the
process exits 0 without waiting for engine work nobody waits for. A second signal exits at once
with status 1.
If the model cannot be loaded, the process exits 1 so that the orchestrator sees the failure; a bad
setting, or an address that cannot be bound, is one line on stderr and exit status 2, before anything
loads (the socket is bound before the model's libraries are imported).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.settings import Settings

# After the drain, uvicorn still waits for open connections; this bounds that last wait.
FINAL_CLOSE_TIMEOUT_S = 5
EXIT_BAD_SETTING = 2  # as argparse's usage errors
log = logging.getLogger(__name__)


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
    from service.settings import SettingsError, check_server_environment, load_settings

    overrides = {
        name: value for name in ("model", "host", "port") if (value := getattr(args, name)) is not None
    }
    # 1. Settings, the environment and the address: each failure one line, exit 2, before any model work.
    try:
        settings = load_settings(**overrides)
        warnings = check_server_environment()
        listener = bind(settings.host, settings.port)
    except SettingsError as error:
        print(f"sd-endpoint serve: error: {error}; fix it (or the option that sets it) and start again",
              file=sys.stderr)  # fmt: skip
        return EXIT_BAD_SETTING
    configure_logging(settings.log_level, settings.log_format)
    for warning in warnings + exposure_warnings(settings):
        log.warning("%s", warning)
    # 2. The app, which loads the model in a thread once served.
    quiet_library_output()  # before the app's imports, which load the model's libraries
    from service.web.app import create_app

    return serve(create_app(settings), settings, listener)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; SettingsError (one line) when it cannot be had."""
    from service.settings import SettingsError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
    except OSError as error:  # gaierror included: a name that does not resolve
        raise SettingsError(
            f"SD_HOST: {host[:60]!r} cannot be listened on ({error.strerror or error})"
        ) from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as error:
        listener.close()
        raise SettingsError(
            f"SD_HOST/SD_PORT: cannot listen on {host[:60]}:{port} ({error.strerror or error}); "
            "choose another address or port"
        ) from None
    listener.set_inheritable(True)
    return listener


def exposure_warnings(settings: Settings) -> list[str]:
    """A loud line when anyone who can reach the address may use the server, and one for each
    SD_ALLOWED_HOSTS entry that can never match."""
    warnings = [
        f"SD_ALLOWED_HOSTS: {entry[:60]!r} has a port and never matches (the Host check compares the "
        f"host name without its port); list {entry.rpartition(':')[0][:60]!r} instead"
        for entry in (settings.allowed_hosts or "").split(",")
        if _has_port(entry.strip())
    ]
    if not settings.api_key_list and not settings.listens_on_loopback:
        warnings.append(
            f"NO API KEYS: listening on {settings.host} (beyond this machine) and SD_API_KEYS is unset, so "
            "anyone who can reach this address can generate images; set SD_API_KEYS, or SD_HOST=127.0.0.1"
        )
    return warnings


def _has_port(entry: str) -> bool:
    """``10.0.0.1:8080``, which the settings' name check lets through (a colon may be IPv6's) but no
    Host header's name ever equals; ``::1`` and ``[::1]`` are addresses."""
    bare = entry.strip("[]")
    if ":" not in bare:
        return False
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        return True
    return False


def serve(app: FastAPI, settings: Settings, listener: socket.socket | None = None) -> int:
    """Serve ``app`` until a signal has drained it; the process exit code."""
    import uvicorn

    from service.hosts.connections import guarded_protocol
    from service.hosts.draining import DrainingServer, exit_now

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # Header limits, send deadline and the connection limit (a counted JSON 503) live there.
        http=guarded_protocol(settings, app.state.metrics),
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        log_config=None,  # ours, from configure_logging
        access_log=False,  # the request-context middleware logs one line per request, with its id
        timeout_graceful_shutdown=FINAL_CLOSE_TIMEOUT_S,
        lifespan="on",
    )
    server = DrainingServer(config, app.state.lifecycle)
    server.run(sockets=[listener or bind(settings.host, settings.port)])
    code = 1 if server.load_failed else 0
    if app.state.lifecycle.engine_busy:
        # The engine thread still runs a batch that nobody waits for (the drain ran out of time):
        # the interpreter would join it before exiting, for as long as the batch takes.
        exit_now(code, "exiting without waiting for the engine's abandoned batch")
    return code
