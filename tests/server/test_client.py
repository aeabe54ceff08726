"""`sd-endpoint generate` as a user runs it: a real server on random:tiny, and a stub only for 429s."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers.ports import free_port
from tests.helpers.processes import REPO, Server, clean_env, serving

pytestmark = pytest.mark.slow

GENERATE = [sys.executable, "-m", "service.cli.main", "generate"]
KEYS = ("primary-key-1", "secondary-key-2")
SMALL = ["--steps", "2", "--width", "128", "--height", "128"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with serving(log_path, SD_API_KEYS=",".join(KEYS)) as running:
        yield running


def generate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GENERATE, *args], capture_output=True, text=True, env=clean_env(**env), cwd=REPO, timeout=600
    )


def printed_images(stdout: str) -> list[tuple[Path, str]]:
    """The (path, nsfw flag) pairs the client printed, one line per image."""
    pairs = []
    for line in stdout.splitlines():
        path, flag = line.split("\tnsfw=")
        pairs.append((Path(path), flag))
    return pairs


def assert_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        image.load()
        assert (image.format, image.size) == ("PNG", size)


def test_writes_one_png_per_image_named_by_its_seed(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "images"
    result = generate(
        "A lighthouse, at dawn!", "--url", server.url, "--key", KEYS[0], "--seed", "42", "--num-images", "2",
        "--out", str(out), *SMALL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    images = printed_images(result.stdout)
    assert [path for path, _ in images] == [
        out / "a-lighthouse-at-dawn-42.png",
        out / "a-lighthouse-at-dawn-43.png",
    ]
    # random:tiny has a safety checker that never flags.
    assert [flag for _, flag in images] == ["false", "false"]
    for path, _ in images:
        assert_png(path, (128, 128))


def test_key_from_the_environment_and_a_random_seed(server: Server, tmp_path: Path) -> None:
    result = generate("a cat", "--url", server.url, "--out", str(tmp_path), *SMALL, SD_API_KEY=KEYS[1])
    assert result.returncode == 0, result.stderr
    [(path, _)] = printed_images(result.stdout)
    assert re.fullmatch(r"a-cat-\d+\.png", path.name)
    assert_png(path, (128, 128))


def test_refused_key_says_so_in_one_line(server: Server, tmp_path: Path) -> None:
    result = generate("a cat", "--url", server.url, "--key", "wrong", "--out", str(tmp_path), *SMALL)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "refused the API key (401" in result.stderr and "--key" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_key_says_one_is_needed(server: Server, tmp_path: Path) -> None:
    result = generate("a cat", "--url", server.url, "--out", str(tmp_path), *SMALL)
    assert result.returncode != 0
    assert "needs an API key (401" in result.stderr and "SD_API_KEY" in result.stderr


def test_server_error_message_is_printed(server: Server, tmp_path: Path) -> None:
    body = {
        "input_data": {"columns": ["prompt"], "data": ["a cat"], "parameters": {"num_inference_steps": 0}}
    }
    direct = httpx.post(f"{server.url}/score", json=body, headers={"Authorization": f"Bearer {KEYS[0]}"})
    message = direct.json()["error"]["message"]

    result = generate("a cat", "--url", server.url, "--key", KEYS[0], "--steps", "0", "--out", str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: the server answered {direct.status_code}: {message}"


def test_server_down_says_how_to_start_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = generate("a cat", "--url", url, "--out", str(tmp_path))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot connect" in result.stderr and "sd-endpoint serve" in result.stderr


def test_bad_options_and_an_unwritable_folder_are_one_line_before_anything_is_sent(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the errors must come first
    for option in (["--timeout", "-1"], ["--timeout", "nan"], ["--timeout", "soon"], ["--retries", "-5"]):
        result = generate("a cat", "--url", url, *option, "--out", str(tmp_path))
        assert result.returncode == 2, option  # argparse's usage error
        assert f"argument {option[0]}:" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "a-file").write_text("not a folder")
    result = generate("a cat", "--url", url, "--out", str(tmp_path / "a-file" / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().startswith("error: cannot create --out")
        and "cannot connect" not in result.stderr
    )


def image_file(path: Path, image: Image.Image) -> Path:
    image.save(path, format="PNG")
    return path


def test_image_and_mask_are_sent_and_the_pngs_have_the_images_size(server: Server, tmp_path: Path) -> None:
    """--image (image to image) and --image with --mask (inpainting): the images come back at the
    input's own size, 192x128 here, as no --width or --height asks for another."""
    photo = image_file(tmp_path / "photo.png", Image.new("RGB", (192, 128), (30, 120, 200)))
    mask = Image.new("L", (192, 128), 0)
    mask.paste(255, (48, 32, 144, 96))
    mask_path = image_file(tmp_path / "mask.png", mask)
    for name, extra in [
        ("img2img", ["--strength", "0.5"]),
        ("inpaint", ["--mask", str(mask_path)]),
    ]:  # fmt: skip
        out = tmp_path / name
        result = generate(
            "a boat", "--url", server.url, "--key", KEYS[0], "--image", str(photo), "--steps", "2",
            "--seed", "3", "--num-images", "2", "--out", str(out), *extra,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        images = printed_images(result.stdout)
        assert [path for path, _ in images] == [out / "a-boat-3.png", out / "a-boat-4.png"], name
        for path, _ in images:
            assert_png(path, (192, 128))
    # the server's refusal of a bad image is one line, as any other refusal
    (tmp_path / "not-an-image.png").write_text("hello")
    result = generate(
        "a boat", "--url", server.url, "--key", KEYS[0], "--image", str(tmp_path / "not-an-image.png"),
        "--out", str(tmp_path / "none"),
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the server answered 422" in result.stderr and "not an image" in result.stderr, result.stderr


def test_image_files_are_checked_before_anything_is_sent(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the errors must come first
    photo = image_file(tmp_path / "photo.png", Image.new("RGB", (128, 128)))
    huge = tmp_path / "huge.png"
    with huge.open("wb") as file:  # sparse: 21 MiB on paper
        file.truncate(21 * 2**20)
    (tmp_path / "empty.png").write_bytes(b"")
    for options, message in [
        (["--image", str(tmp_path / "missing.png")], "cannot read --image"),
        (["--image", str(photo), "--mask", str(tmp_path / "missing.png")], "cannot read --mask"),
        (["--image", str(tmp_path)], "cannot read --image"),  # a folder
        (["--image", str(huge)], "more than the 20 MiB"),
        (["--image", str(photo), "--mask", str(tmp_path / "empty.png")], "--mask"),
    ]:
        result = generate("a cat", "--url", url, *options, "--out", str(tmp_path / "out"))
        assert result.returncode == 1, (options, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
        assert "cannot connect" not in result.stderr
    assert not (tmp_path / "out").exists()
    for options, flag in [
        (["--mask", str(photo)], "--mask"),
        (["--strength", "0.5"], "--strength"),
        (["--image", str(photo), "--strength", "1.5"], "--strength"),
        (["--image", str(photo), "--strength", "nan"], "--strength"),
    ]:
        result = generate("a cat", "--url", url, *options, "--out", str(tmp_path / "out"))
        assert result.returncode == 2, options  # argparse's usage error
        assert f"argument {flag}:" in result.stderr and "Traceback" not in result.stderr


# ---- 429: a stub server, because a real one cannot be kept busy on cue ----


def tiny_png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (200, 40, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class BusyStub:
    """Answers 429 (Retry-After: 1) to the first ``busy_answers`` posts, then one image with ``seed``."""

    def __init__(self, busy_answers: int, seed: object = 7) -> None:
        self.busy_answers = busy_answers
        self.requests = 0
        self.seed = seed
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                stub.requests += 1
                if stub.requests <= stub.busy_answers:
                    status = 429
                    payload: object = {
                        "error": {"code": "too_many_requests", "message": "queue full", "status": 429}
                    }
                else:
                    status = 200
                    payload = [
                        {
                            "prompt": "a cat",
                            "generated_image": tiny_png_base64(),
                            "nsfw_content_detected": None,
                            "seed": stub.seed,
                        }
                    ]
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self) -> BusyStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_busy_server_is_retried_after_retry_after(tmp_path: Path) -> None:
    with BusyStub(busy_answers=2) as stub:
        result = generate("a cat", "--url", stub.url, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert stub.requests == 3
    assert result.stderr.count("server busy (429), retrying in 1 s") == 2
    assert printed_images(result.stdout) == [(tmp_path / "a-cat-7.png", "unchecked")]
    assert_png(tmp_path / "a-cat-7.png", (128, 128))


def test_busy_server_is_given_up_on_after_bounded_retries(tmp_path: Path) -> None:
    with BusyStub(busy_answers=1000) as stub:
        result = generate("a cat", "--url", stub.url, "--retries", "2", "--out", str(tmp_path))
    assert result.returncode != 0
    assert stub.requests == 3
    assert "error: the server is still busy after 3 attempts (429: queue full)" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_only_an_integer_seed_from_the_server_names_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with BusyStub(busy_answers=0, seed="../../escaped") as stub:
        result = generate("a cat", "--url", stub.url, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["a-cat-0.png"]  # numbered by position instead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
