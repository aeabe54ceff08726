"""Hostile images on every route that takes one, against a real server process: each a clear 4xx
that names the field (never a 500), while good requests sent beside them are served."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.helpers.processes import Server, serving

pytestmark = pytest.mark.slow
KEY = "hostile-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("images-hostile") / "server.log", SD_API_KEYS=KEY) as running:
        yield running


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb() -> bytes:
    """A PNG whose header claims 100000 x 100000 pixels, in a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


GOOD = png(Image.new("RGB", (128, 128), (90, 120, 30)))
MASK = png(Image.new("L", (128, 128), 255))
CASES: dict[str, bytes] = {
    "not an image": b"hello, this is text",
    "truncated": GOOD[: len(GOOD) // 2],
    "bomb": bomb(),
    "animated": b"",  # filled below
}
frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
_gif = io.BytesIO()
frames[0].save(_gif, format="GIF", save_all=True, append_images=frames[1:])
CASES["animated"] = _gif.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def score(server: Server, image: bytes, mask: bytes | None = None) -> httpx.Response:
    row = {"prompt": "x", "image": b64(image)} | ({"mask_image": b64(mask)} if mask is not None else {})
    columns = ["prompt", "image"] + (["mask_image"] if mask is not None else [])
    body = {"input_data": {"columns": columns, "data": [row], "parameters": {"num_inference_steps": 2}}}
    return httpx.post(f"{server.url}/score", json=body, headers=HEADERS, timeout=120)


def edits(server: Server, image: bytes, mask: bytes | None = None) -> httpx.Response:
    files = {"image": ("a.png", image, "image/png")} | (
        {"mask": ("m.png", mask, "image/png")} if mask is not None else {}
    )
    return httpx.post(
        f"{server.url}/v1/images/edits",
        files=files,
        data={"prompt": "x", "num_inference_steps": "2", "response_format": "b64_json"},
        headers=HEADERS,
        timeout=120,
    )


def a1111(server: Server, image: bytes, mask: bytes | None = None) -> httpx.Response:
    body = {"init_images": [b64(image)], "steps": 2} | ({"mask": b64(mask)} if mask is not None else {})
    return httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, headers=HEADERS, timeout=120)


def huggingface(server: Server, image: bytes, mask: bytes | None = None) -> httpx.Response:
    body = {"inputs": b64(image), "parameters": {"prompt": "x", "num_inference_steps": 2}}
    return httpx.post(f"{server.url}/", json=body, headers=HEADERS, timeout=120)


ROUTES: dict[str, tuple[Callable[..., httpx.Response], str]] = {
    "score": (score, "input_data.data[0].image"),
    "edits": (edits, "image"),
    "a1111": (a1111, "init_images[0]"),
    "huggingface": (huggingface, "inputs"),
}


def message(answer: httpx.Response) -> str:
    body = answer.json()
    if "detail" in body:
        return str(body["detail"])
    error = body["error"]
    return str(error["message"] if isinstance(error, dict) else error)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_hostile_image_is_a_4xx_naming_its_field(server: Server, route: str, case: str) -> None:
    send, field = ROUTES[route]
    if (route, case) == ("huggingface", "not an image"):
        pytest.skip("an inputs that is no image's base64 is a prompt on Hugging Face's route")
    answer = send(server, CASES[case])
    assert answer.status_code in (400, 422), (answer.status_code, answer.text)
    assert message(answer).startswith(field), message(answer)


@pytest.mark.parametrize("route", ["score", "edits", "a1111"])
def test_a_mask_of_another_size_is_refused(server: Server, route: str) -> None:
    send, _ = ROUTES[route]
    small_mask = png(Image.new("L", (64, 64), 255))
    answer = send(server, GOOD, small_mask)
    assert answer.status_code in (400, 422), answer.text
    assert "mask" in message(answer) and "size" in message(answer)


def test_image_urls_are_not_fetched_unless_the_operator_names_the_host(server: Server) -> None:
    for url in ("http://169.254.169.254/latest/meta-data", "http://127.0.0.1:1/x.png", "file:///etc/passwd"):
        body = {"input_data": {"columns": ["prompt", "image"], "data": [["x", url]]}}
        answer = httpx.post(f"{server.url}/score", json=body, headers=HEADERS, timeout=60)
        assert answer.status_code in (400, 422), answer.text
        assert url not in answer.text


def test_good_requests_are_served_beside_bad_ones(server: Server) -> None:
    with ThreadPoolExecutor(8) as pool:
        bad = [
            pool.submit(send, server, CASES[case])
            for send, _ in ROUTES.values()
            for case in CASES
            if case != "not an image"
        ]
        good = [pool.submit(send, server, GOOD) for send, _ in ROUTES.values()]
        assert all(future.result().status_code in (400, 422) for future in bad)
        assert [future.result().status_code for future in good] == [200] * len(good)
    answer = edits(server, GOOD, b"")
    assert answer.status_code in (400, 422) and message(answer).startswith("mask")


def test_odd_but_valid_images_are_taken(server: Server) -> None:
    """CMYK, 16-bit grey, palette with transparency and EXIF-rotated images are pictures: drawn from."""
    cmyk = io.BytesIO()
    Image.new("CMYK", (128, 128), (10, 200, 30, 0)).save(cmyk, format="JPEG")
    grey16 = png(Image.new("I;16", (128, 128), 40000))
    palette = Image.new("P", (128, 128), 3)
    palette.info["transparency"] = 3
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (96, 128), (200, 10, 10)).save(rotated, format="JPEG", exif=exif)
    for data in (cmyk.getvalue(), grey16, png(palette), rotated.getvalue()):
        answer = score(server, data)
        assert answer.status_code == 200, answer.text
