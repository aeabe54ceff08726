"""What a page of another site can make Chromium send to a server on its visitor's machine without a
preflight: ``fetch(url, {method: "POST", mode: "no-cors"})``, text/plain or with no body. Such a
request reaches the loopback server under its own Host, so only the browser's Sec-Fetch-Site and
Origin tell it apart; the state-changing routes (interrupt, skip, cancel among them) refuse it, and
the same requests from a program or from a page of the server itself are served."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from playwright.sync_api import Browser

from service.settings import Settings
from tests.helpers.servers import GatedEngine, ThreadServer, held, metric_value, tiny_engine

REQUEST_ID = "the-users-own"
STOPS = ("/sdapi/v1/interrupt", "/sdapi/v1/skip", f"/requests/{REQUEST_ID}/cancel")
# The simple requests a page may send anywhere: no preflight, so the server sees them all.
SIMPLE_POSTS = """async url => {
    await fetch(url, {method: "POST", mode: "no-cors"});
    await fetch(url, {method: "POST", mode: "no-cors", body: "{}", headers: {"Content-Type": "text/plain"}});
}"""


@pytest.fixture(scope="module")
def engine() -> GatedEngine:
    return GatedEngine(tiny_engine())


@pytest.fixture(scope="module")
def server(engine: GatedEngine) -> Iterator[ThreadServer]:
    with ThreadServer(Settings(), engine) as running:  # on 127.0.0.1: the loopback names only
        yield running


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # http.server calls do_<METHOD>
        page = b"<!doctype html><title>another site</title>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def other_site() -> Iterator[str]:
    """A page at http://localhost:<port>: another site than http://127.0.0.1:<port> (and, being on
    loopback too, one Chromium lets fetch the server without Private Network Access rules)."""
    site = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{site.server_address[1]}/"
    finally:
        site.shutdown()
        site.server_close()


def refused(url: str, route: str) -> float:
    return metric_value(
        httpx.get(f"{url}/metrics").text, "sd_requests_total", f'route="{route}",status="403"'
    )


def test_a_page_of_another_site_cannot_stop_the_users_generation(
    server: ThreadServer, engine: GatedEngine, browser: Browser, other_site: str
) -> None:
    body = {"prompt": "mine", "steps": 2, "width": 128, "height": 128, "seed": 1}
    page = browser.new_page()
    try:
        page.goto(other_site)
        with ThreadPoolExecutor(1) as pool, held(engine):
            running = pool.submit(
                httpx.post, f"{server.url}/sdapi/v1/txt2img", json=body,
                headers={"x-request-id": REQUEST_ID}, timeout=120,
            )  # fmt: skip
            engine.wait_until_held()
            for path in STOPS:
                page.evaluate(SIMPLE_POSTS, f"{server.url}{path}")
            state = httpx.get(f"{server.url}/sdapi/v1/progress").json()["state"]
            assert state["interrupted"] is False and state["job_count"] == 1, state
        answer = running.result(timeout=120)
    finally:
        page.close()
    assert answer.status_code == 200, answer.text[:300]  # neither cancelled (499) nor cut short
    assert refused(server.url, "/sdapi/v1/interrupt") == refused(server.url, "/sdapi/v1/skip") == 2
    assert refused(server.url, "other") >= 2  # the cancel, whose path is not a route template


def test_the_servers_own_pages_and_programs_still_stop_generations(
    server: ThreadServer, browser: Browser
) -> None:
    page = browser.new_page()
    try:
        page.goto(f"{server.url}/ui")  # the playground stops its own requests with these
        for path in STOPS[:2]:
            status = page.evaluate(
                "async url => (await fetch(url, {method: 'POST'})).status", f"{server.url}{path}"
            )
            assert status == 200, path
    finally:
        page.close()
    # A1111's clients (requests.post with no body), OpenAI's SDKs and curl send neither header.
    for path in STOPS[:2]:
        assert httpx.post(f"{server.url}{path}").status_code == 200, path
    assert httpx.post(f"{server.url}{STOPS[2]}").status_code == 404  # nothing of that id runs now
    same_origin = {"origin": server.url, "sec-fetch-site": "same-origin"}
    assert httpx.post(f"{server.url}{STOPS[0]}", headers=same_origin).status_code == 200
