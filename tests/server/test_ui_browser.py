"""The playground at /ui, driven in headless Debian chromium against a real server on random:tiny.

Chromium comes from apt (`apt-get install -y chromium`); Playwright only drives it and never
downloads a browser of its own.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Route, expect

from tests.helpers import loras
from tests.helpers.processes import REPO, Server, server_fixture, serving
from tests.helpers.servers import decode_png

pytestmark = pytest.mark.slow

# Generous ceilings for waits on a busy 2-core CI machine; they bound a hang, they time nothing.
WAIT_MS = 120_000
KEYS = ("primary-key-1", "secondary-key-2")
# Above 2**53: a seed that a JavaScript number would silently round.
BIG_SEED = 1234567890123456789
DOCS_SCREENSHOT = REPO / "docs" / "screenshot.png"
KEY_STORAGE = "sd-endpoint-api-key"


server = server_fixture("server")
keyed_server = server_fixture("keyed", fixture="keyed_server", SD_API_KEYS=",".join(KEYS))
models_server = server_fixture(
    "models", fixture="models_server", SD_MODELS="two=random:tiny:1,paint=random:tiny-inpaint:2"
)


def fill_form(page: Page, *, prompt: str, seed: str = "", steps: str = "2", images: str = "1") -> None:
    page.fill("#prompt", prompt)
    page.fill("#seed", seed)
    page.fill("#steps", steps)
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.fill("#num-images", images)


def generate(page: Page) -> Any:
    """Click Generate; returns the /score response once the page has finished showing it."""
    with page.expect_response("**/score", timeout=WAIT_MS) as answer:
        page.click("#generate")
    expect(page.locator("#generate")).to_be_enabled(timeout=WAIT_MS)
    return answer.value


def open_playground(page: Page, server: Server) -> dict[str, Any]:
    info: dict[str, Any] = httpx.get(f"{server.url}/info", timeout=30).json()
    page.goto(f"{server.url}/ui")
    expect(page.locator("#model")).to_contain_text(info["name"])
    return info


def test_generate_shows_pngs_of_the_requested_size_with_their_seeds(
    server: Server, page: Page, tmp_path: Path
) -> None:
    info = open_playground(page, server)
    expect(page.locator("#random-warning")).to_be_visible(visible=info["random_weights"])
    offered = page.eval_on_selector_all("#scheduler option", "options => options.map(o => o.value)")
    assert offered == info["schedulers"]
    default = info["default_scheduler"] if info["default_scheduler"] in offered else "default"
    expect(page.locator("#scheduler")).to_have_value(default)
    # The preselected option names the model's default scheduler (a class name shown without "Scheduler").
    default_name = info["default_scheduler"].removesuffix("Scheduler")
    expect(page.locator("#scheduler option:checked")).to_contain_text(default_name)
    fill_form(page, prompt="a lighthouse at dawn", seed=str(BIG_SEED), images="2")

    # While the request is in flight (held here at the network), the page shows it is busy.
    busy: list[tuple[bool, bool]] = []

    def observe_then_continue(route: Route) -> None:
        busy.append((page.locator("#generate").is_disabled(), page.locator("#spinner").is_visible()))
        route.continue_()

    page.route("**/score", observe_then_continue)
    response = generate(page)
    assert busy == [(True, True)]
    expect(page.locator("#spinner")).to_be_hidden()

    # Seeds: the typed one exactly (no rounding through a JS number), then the server's next ones.
    body = response.json()
    assert body[0]["seed"] == BIG_SEED
    assert page.locator(".seed-value").all_inner_texts() == [str(item["seed"]) for item in body]
    sent_id = response.request.headers["x-request-id"]
    assert page.inner_text("#request-id") == response.headers["x-request-id"] == sent_id
    assert re.fullmatch(r"2 images in \d+\.\d\d s", page.inner_text("#latency"))
    assert page.eval_on_selector("#images img", "img => [img.naturalWidth, img.naturalHeight]") == [128, 128]

    with page.expect_download() as download_info:
        page.locator("a.download").first.click()
    download = download_info.value
    assert download.suggested_filename == f"a-lighthouse-at-dawn-{BIG_SEED}.png"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    with Image.open(saved) as image:
        image.load()
        assert (image.format, image.size) == ("PNG", (128, 128))

    page.screenshot(path=tmp_path / "playground.png")
    if os.environ.get("SD_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "playground.png", DOCS_SCREENSHOT)


def test_clicking_a_seed_reuses_it_and_draws_the_same_image(server: Server, page: Page) -> None:
    open_playground(page, server)
    fill_form(page, prompt="a red bicycle")
    generate(page)
    first_image = page.get_attribute("#images img", "src")
    seed = page.inner_text(".seed-value")

    page.click("button.seed")
    expect(page.locator("#seed")).to_have_value(seed)
    generate(page)
    assert page.inner_text(".seed-value") == seed
    assert page.get_attribute("#images img", "src") == first_image


def test_server_error_message_is_shown(server: Server, page: Page) -> None:
    open_playground(page, server)
    fill_form(page, prompt="a lighthouse", steps="0")
    response = generate(page)
    assert response.status == 422
    expect(page.locator("#error-message")).to_have_text(response.json()["error"]["message"])
    expect(page.locator("#error")).not_to_contain_text("undefined")
    expect(page.locator("#images img")).to_have_count(0)


def test_unreachable_server_gets_a_plain_message(server: Server, page: Page) -> None:
    open_playground(page, server)
    page.route("**/score", lambda route: route.abort("connectionrefused"))
    fill_form(page, prompt="a lighthouse")
    page.click("#generate")
    expect(page.locator("#error-message")).to_contain_text("Cannot reach the server")
    expect(page.locator("#generate")).to_be_enabled()


def test_flagged_image_gets_an_nsfw_badge(server: Server, page: Page) -> None:
    # random:tiny's checker never flags, so the real answer is marked flagged on its way to the page.
    def flag_first(route: Route) -> None:
        answer = route.fetch()
        items = answer.json()
        items[0]["nsfw_content_detected"] = True
        route.fulfill(response=answer, json=items)

    open_playground(page, server)
    page.route("**/score", flag_first)
    fill_form(page, prompt="a lighthouse", images="2")
    generate(page)
    figures = page.locator("figure.result")
    expect(figures.nth(0).locator(".nsfw")).to_have_count(1)
    expect(figures.nth(1).locator(".nsfw")).to_have_count(0)


def test_phone_width_has_no_horizontal_scroll(server: Server, page: Page) -> None:
    page.set_viewport_size({"width": 375, "height": 812})
    open_playground(page, server)
    fill_form(page, prompt="a lighthouse on a cliff over a stormy sea, oil painting", images="2")
    generate(page)
    expect(page.locator("#images img")).to_have_count(2)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], f"the page is {widths[0]}px wide in a {widths[1]}px window"


def test_key_is_asked_once_and_kept_for_the_tab_only(keyed_server: Server, browser: Browser) -> None:
    info = httpx.get(
        f"{keyed_server.url}/info", headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=30
    ).json()
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{keyed_server.url}/ui")

    # 1. Without a key, /info answers 401 and the page asks for one; a wrong key is refused.
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#key-message")).not_to_be_empty()
    page.fill("#key", "not-a-key")
    page.click("#key-submit")
    expect(page.locator("#key-message")).to_contain_text("refused")
    expect(page.locator("#key-form")).to_be_visible()

    # 2. The right key loads the model and generates.
    page.fill("#key", KEYS[1])
    page.click("#key-submit")
    expect(page.locator("#model")).to_contain_text(info["name"])
    expect(page.locator("#key-form")).to_be_hidden()
    fill_form(page, prompt="a lighthouse")
    assert generate(page).status == 200
    expect(page.locator("#images img")).to_have_count(1)

    # 3. Kept for this tab (sessionStorage), nowhere that outlives it.
    assert page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") == KEYS[1]
    assert page.evaluate("localStorage.length") == 0
    page.reload()
    expect(page.locator("#model")).to_contain_text(info["name"])
    expect(page.locator("#key-form")).to_be_hidden()
    context.close()

    # 4. A new session starts without it.
    other = browser.new_context()
    fresh = other.new_page()
    fresh.goto(f"{keyed_server.url}/ui")
    expect(fresh.locator("#key-form")).to_be_visible()
    other.close()


@pytest.fixture(scope="module")
def adapter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = loras.adapter_folder(tmp_path_factory.mktemp("adapters"))
    with serving(tmp_path_factory.mktemp("adapter-ui") / "server.log", SD_ADAPTERS=str(folder)) as running:
        yield running


def test_an_adapter_picked_from_the_list_draws_what_score_draws_with_it(
    adapter_server: Server, page: Page
) -> None:
    info = open_playground(page, adapter_server)
    expect(page.locator("#adapter-field")).to_be_visible()
    offered = page.eval_on_selector_all("#adapter option", "options => options.map(o => o.value)")
    assert offered == ["", *info["adapters"]] and "style" in offered
    expect(page.locator("#adapter")).to_have_value("")  # none unless picked

    # 1. Picked, at a scale: sent as parameters.adapters, and the image is /score's with them.
    fill_form(page, prompt="a lighthouse", seed="7")
    page.select_option("#adapter", "style")
    page.fill("#adapter-scale", "0.8")
    response = generate(page)
    assert response.status == 200
    sent = response.request.post_data_json["input_data"]["parameters"]
    assert sent["adapters"] == {"style": 0.8}
    direct = {"input_data": {"columns": ["prompt"], "data": ["a lighthouse"], "parameters": sent}}
    expected = httpx.post(f"{adapter_server.url}/score", json=direct, timeout=300).json()[0][
        "generated_image"
    ]
    shown = page.get_attribute("#images img", "src")
    assert shown == f"data:image/png;base64,{expected}"

    # 2. Back to none: no adapters sent, another image.
    page.select_option("#adapter", "")
    response = generate(page)
    assert "adapters" not in response.request.post_data_json["input_data"]["parameters"]
    plain = page.get_attribute("#images img", "src")
    assert plain is not None and shown is not None
    assert abs(decode_png(plain.split(",")[1]) / 255 - decode_png(shown.split(",")[1]) / 255).max() > 0.02

    # 3. A scale out of range: the server's one-line reason, shown as it says it.
    page.select_option("#adapter", "kohya")
    for scale in ("2.5", "-7", "1e9"):
        page.fill("#adapter-scale", scale)
        response = generate(page)
        assert response.status == 422
        expect(page.locator("#error-message")).to_have_text(response.json()["error"]["message"])
        expect(page.locator("#error-message")).to_contain_text("scale")


def test_the_adapter_list_is_hidden_when_the_server_serves_none(server: Server, page: Page) -> None:
    open_playground(page, server)
    expect(page.locator("#model-field")).to_be_hidden()  # one model: nothing to choose
    expect(page.locator("#adapter-field")).to_be_hidden()
    expect(page.locator("#adapter-scale-field")).to_be_hidden()
    fill_form(page, prompt="a lighthouse")
    assert "adapters" not in generate(page).request.post_data_json["input_data"]["parameters"]


def test_a_model_picked_from_the_list_draws_what_score_draws_with_it(
    models_server: Server, page: Page
) -> None:
    info = open_playground(page, models_server)
    expect(page.locator("#model-field")).to_be_visible()
    offered = page.eval_on_selector_all("#model-choice option", "options => options.map(o => o.value)")
    assert offered == ["", "two", "paint"] and [m["name"] for m in info["models"]][1:] == ["two", "paint"]
    fill_form(page, prompt="a lighthouse", seed="7")
    page.select_option("#model-choice", "two")
    response = generate(page)
    assert response.status == 200
    sent = response.request.post_data_json["input_data"]["parameters"]
    assert sent["model"] == "two"
    direct = {"input_data": {"columns": ["prompt"], "data": ["a lighthouse"], "parameters": sent}}
    expected = httpx.post(f"{models_server.url}/score", json=direct, timeout=300).json()[0]["generated_image"]
    shown = page.get_attribute("#images img", "src")
    assert shown == f"data:image/png;base64,{expected}"
    page.select_option("#model-choice", "")  # the server's default: no model sent, another image
    response = generate(page)
    assert "model" not in response.request.post_data_json["input_data"]["parameters"]
    assert page.get_attribute("#images img", "src") != shown
