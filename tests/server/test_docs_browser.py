"""/docs, /redoc and /ui in headless Debian chromium against a real server, with every request to
another origin refused (as on a machine with no network): the pages render from the server's own
assets, and their Content-Security-Policy blocks nothing they need and lets no other site frame them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Browser, Page, Route, expect

from tests.helpers.processes import Server, serving
from tests.server.test_ui_browser import (
    WAIT_MS,
    fill_form,
    generate,
    open_playground,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("docs") / "server.log") as running:
        yield running


@pytest.fixture
def offline(browser: Browser, server: Server) -> Iterator[tuple[Page, list[str], list[str]]]:
    """A page that may reach the server only; the URLs it tried elsewhere, and its console errors."""
    context = browser.new_context()
    elsewhere: list[str] = []

    def only_the_server(route: Route) -> None:
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort("internetdisconnected")

    context.route("**/*", only_the_server)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page, elsewhere, errors
    context.close()


def own_blocked(errors: list[str], server: Server) -> list[str]:
    """The policy violations of the page's own content (inline script, styles, the server's URLs).
    Another origin's URL blocked (ReDoc's footer logo on its CDN) is the policy working."""
    foreign = re.compile(r"'https?://")
    return [
        error
        for error in errors
        if "Content Security Policy" in error and (server.url in error or not foreign.search(error))
    ]


def swagger_ui_shown(page: Page) -> None:
    """Swagger UI lists the operations, and one opens (opening an operation runs more script)."""
    expect(page.locator(".opblock-summary-path", has_text="/score").first).to_be_visible(timeout=WAIT_MS)
    page.locator(".opblock-summary", has_text="/info").first.click()
    expect(page.locator(".opblock-body").first).to_be_visible(timeout=WAIT_MS)


def redoc_shown(page: Page) -> None:
    """ReDoc shows the API's title and lays out an operation's path."""
    expect(page.get_by_text("Stable Diffusion endpoint").first).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_text("/score").first).to_be_attached(timeout=WAIT_MS)


@pytest.mark.parametrize(("path", "shown"), [("/docs", swagger_ui_shown), ("/redoc", redoc_shown)])
def test_the_api_documentation_renders_offline_within_its_policy(
    offline: tuple[Page, list[str], list[str]], server: Server, path: str, shown: Callable[[Page], None]
) -> None:
    page, elsewhere, errors = offline
    page.goto(f"{server.url}{path}")
    shown(page)
    assert elsewhere == []
    assert own_blocked(errors, server) == [], errors


def test_the_playground_runs_within_its_policy(
    offline: tuple[Page, list[str], list[str]], server: Server
) -> None:
    page, elsewhere, errors = offline
    open_playground(page, server)
    fill_form(page, prompt="a policy test", images="2")
    assert generate(page).status == 200
    sizes = page.eval_on_selector_all("#images img", "images => images.map(i => i.naturalWidth)")
    assert sizes == [128, 128]  # the data: URLs were allowed to load
    assert elsewhere == []
    assert own_blocked(errors, server) == [], errors


@pytest.mark.parametrize("path", ["/ui", "/docs", "/redoc"])
def test_another_site_cannot_frame_the_pages(
    offline: tuple[Page, list[str], list[str]], server: Server, path: str
) -> None:
    page, _, errors = offline
    page.set_content(f'<iframe id="framed" src="{server.url}{path}"></iframe>')  # a page of no origin of ours
    page.wait_for_timeout(1500)
    assert page.frame_locator("#framed").locator("#generate, #swagger-ui, redoc").count() == 0
    assert any("frame-ancestors 'none'" in error and "blocked" in error for error in errors), errors
