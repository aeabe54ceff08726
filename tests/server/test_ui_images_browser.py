"""The playground's image to image and inpainting controls, driven in headless Debian chromium
against a real server on random:tiny: a file to start from, a mask painted with the mouse, the
strength, and what the page sends to /score for them (docs/api.md, "Images in")."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from service.images_in import output_size
from tests.helpers.processes import Server, server_fixture
from tests.server.test_ui_browser import generate, open_playground

pytestmark = pytest.mark.slow

IMAGE_SIZE = (160, 96)  # width, height: not square, and below the 128 minimum on one side
TEXT_COLUMNS = ["prompt", "negative_prompt"]


server = server_fixture("images-ui")


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    """A PNG with a gradient and a square in it, as a user's file."""
    width, height = IMAGE_SIZE
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    pixels[..., 1] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    pixels[20:60, 40:100, 2] = 200
    path = tmp_path / "start.png"
    Image.fromarray(pixels).save(path)
    return path


def open_with_image(page: Page, server: Server, path: Path, prompt: str = "a lighthouse at dawn") -> None:
    """The playground, a prompt, 2 steps and ``path`` chosen as the image to start from."""
    open_playground(page, server)
    page.fill("#prompt", prompt)
    page.fill("#steps", "2")
    choose(page, path)


def choose(page: Page, path: Path) -> None:
    page.get_by_label("Image (PNG, JPEG or WebP)").set_input_files(path)
    expect(page.locator("#image-editor")).to_be_visible()


def sent(response: Any) -> dict[str, Any]:
    """The /score request's columns as a dict of its one row, with its parameters."""
    input_data = response.request.post_data_json["input_data"]
    assert len(input_data["data"]) == 1
    return {"row": dict(zip(input_data["columns"], input_data["data"][0], strict=True)), **input_data}


def drag_across(page: Page) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Paints a horizontal stroke over the middle of the image with the mouse; returns its ends
    and the brush's radius, in the image's pixels."""
    box = page.locator("#mask-canvas").bounding_box()
    assert box is not None
    start = (box["x"] + 0.2 * box["width"], box["y"] + 0.5 * box["height"])
    end = (box["x"] + 0.8 * box["width"], start[1])
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=12)
    page.mouse.up()
    scale = IMAGE_SIZE[0] / box["width"]
    brush = float(page.get_by_label("Brush size").input_value())

    def in_image(point: tuple[float, float]) -> tuple[float, float]:
        return ((point[0] - box["x"]) * scale, (point[1] - box["y"]) * scale)

    return in_image(start), in_image(end), brush * scale / 2


def distance_to_segment(start: tuple[float, float], end: tuple[float, float]) -> np.ndarray:
    """Each pixel centre's distance from the segment start-end, as a height x width array."""
    ys, xs = np.mgrid[0 : IMAGE_SIZE[1], 0 : IMAGE_SIZE[0]] + 0.5
    (x0, y0), (x1, y1) = start, end
    along = np.clip(((xs - x0) * (x1 - x0) + (ys - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
    return np.hypot(xs - (x0 + along * (x1 - x0)), ys - (y0 + along * (y1 - y0)))


def set_strength(page: Page, steps_above_minimum: int) -> None:
    """The slider as a keyboard user moves it: to its minimum (0.05), then up in 0.05 steps."""
    slider = page.get_by_label("Strength")
    slider.focus()
    page.keyboard.press("Home")
    for _ in range(steps_above_minimum):
        page.keyboard.press("ArrowRight")


def test_a_painted_mask_is_sent_white_on_black_at_the_images_size(
    server: Server, page: Page, picture: Path
) -> None:
    open_with_image(page, server, picture)
    # Width and height become the size the server draws the image at by itself.
    with Image.open(picture) as image:
        height, width = output_size(image, None, None)
    expect(page.locator("#width")).to_have_value(str(width))
    expect(page.locator("#height")).to_have_value(str(height))
    assert page.eval_on_selector("#mask-canvas", "c => [c.width, c.height]") == list(IMAGE_SIZE)
    expect(page.locator("#strength-value")).to_have_text("0.80")

    # Painting makes 1 the strength (diffusers' default with a mask); the user then sets 0.50.
    start, end, radius = drag_across(page)
    expect(page.locator("#strength-value")).to_have_text("1.00")
    set_strength(page, 9)
    expect(page.locator("#strength-value")).to_have_text("0.50")

    response = generate(page)
    assert response.status == 200, response.text()
    request = sent(response)
    assert request["columns"] == [*TEXT_COLUMNS, "image", "mask_image"]
    assert request["row"]["image"] == base64.b64encode(picture.read_bytes()).decode()
    assert request["parameters"]["strength"] == 0.5
    with Image.open(io.BytesIO(base64.b64decode(request["row"]["mask_image"], validate=True))) as mask:
        assert (mask.format, mask.size) == ("PNG", IMAGE_SIZE)
        levels = np.asarray(mask.convert("L"))
    assert set(np.unique(levels)) == {0, 255}
    distance = distance_to_segment(start, end)
    assert (distance < radius - 1.5).sum() > 100, "the stroke is too thin to check"
    assert (levels[distance < radius - 1.5] == 255).all(), "a pixel under the stroke is not white"
    assert (levels[distance > radius + 1.5] == 0).all(), "a pixel away from the stroke is not black"

    # The answer is shown, drawn at the size the form asked.
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#images img")).to_have_count(1)
    shown = page.eval_on_selector("#images img", "img => [img.naturalWidth, img.naturalHeight]")
    assert shown == [width, height]


def test_without_a_mask_the_image_goes_alone_at_strength_0_8(
    server: Server, page: Page, picture: Path
) -> None:
    open_with_image(page, server, picture)

    # 1. Nothing painted: the image, no mask, the default strength.
    request = sent(generate(page))
    assert request["columns"] == [*TEXT_COLUMNS, "image"]
    assert request["parameters"]["strength"] == 0.8
    expect(page.locator("#images img")).to_have_count(1)

    # 2. Painted, then "Clear mask": no mask again, and the strength back at 0.8.
    drag_across(page)
    expect(page.locator("#strength-value")).to_have_text("1.00")
    page.get_by_role("button", name="Clear mask").click()
    expect(page.locator("#strength-value")).to_have_text("0.80")
    request = sent(generate(page))
    assert request["columns"] == [*TEXT_COLUMNS, "image"]
    assert request["parameters"]["strength"] == 0.8

    # 3. "Clear image": text to image as before, with no strength.
    page.get_by_role("button", name="Clear image").click()
    expect(page.locator("#image-editor")).to_be_hidden()
    request = sent(generate(page))
    assert request["columns"] == TEXT_COLUMNS
    assert "strength" not in request["parameters"]
    expect(page.locator("#images img")).to_have_count(1)


def test_a_file_that_is_not_an_image_gets_the_servers_message(
    server: Server, page: Page, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("shopping list: bread, milk\n")
    open_with_image(page, server, notes, "a lighthouse")
    expect(page.locator("#image-unreadable")).to_be_visible()
    expect(page.locator("#mask-canvas")).to_be_hidden()

    response = generate(page)
    assert 400 <= response.status < 500
    message = response.json()["error"]["message"]
    assert "input_data.data[0].image" in message
    expect(page.locator("#error-message")).to_have_text(message)
    expect(page.locator("#images img")).to_have_count(0)
