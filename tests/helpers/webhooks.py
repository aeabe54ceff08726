"""A webhook receiver on 127.0.0.1 for the job tests: it keeps every call it is sent, and whether the
call's signature verified (the ``standardwebhooks`` library, as a user's receiver checks it)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks import Webhook


class Receiver:
    """Each call kept as {"headers" (names lower-cased), "body" (its JSON), "verified"}; ``verified``
    is False without a ``secret``. Every call is answered ``status``."""

    def __init__(self, secret: str | None = None, status: int = 200) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        def verified(body: bytes, headers: dict[str, str]) -> bool:
            if secret is None:
                return False
            try:
                Webhook(secret).verify(body, headers)
            except Exception:
                return False
            return True

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {key.lower(): value for key, value in self.headers.items()}
                received.append(
                    {"headers": headers, "body": json.loads(body), "verified": verified(body, headers)}
                )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def events(self) -> list[tuple[str, str]]:
        """(type, job id) of every call so far."""
        return [(each["body"]["type"], each["body"]["data"]["id"]) for each in self.received]

    def events_of(self, job_id: str) -> list[str]:
        return [each["body"]["type"] for each in self.received if each["body"]["data"]["id"] == job_id]


def receiver_fixture(secret: str | None = None, status: int = 200) -> Any:
    """A module-scoped ``receiver`` fixture: one receiver for the module's tests, stopped after them."""

    @pytest.fixture(scope="module", name="receiver")
    def receiver() -> Iterator[Receiver]:
        running = Receiver(secret, status)
        yield running
        running.server.shutdown()
        running.server.server_close()

    return receiver
