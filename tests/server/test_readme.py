"""The README's examples, run as a newcomer runs them: its `/score` request, its OpenAI snippet, its
`sd-endpoint generate` line and its batch job, against a real server on random:tiny."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers.processes import REPO, Server, clean_env, start_server, stop_server

pytestmark = pytest.mark.slow

README = (REPO / "README.md").read_text(encoding="utf-8")
CLI = [sys.executable, "-m", "service.cli.main"]


def code_block(heading: str, language: str) -> str:
    """The first ``language`` code block of the README section under ``heading``."""
    text = README.split(f"\n{heading}\n", 1)[1]
    return text.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def assert_png(data: bytes) -> None:
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), "a PNG"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("server") / "server.log")
    yield running
    stop_server(running)


def test_the_score_example_draws_its_image(server: Server) -> None:
    command = code_block("### `/score`: the Azure ML contract", "bash")
    body = json.loads(re.search(r"-d '(.*?)'", command, re.DOTALL).group(1))  # type: ignore[union-attr]
    answer = httpx.post(f"{server.url}/score", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    [record] = answer.json()
    assert set(record) == {"prompt", "generated_image", "nsfw_content_detected", "seed"}
    assert record["seed"] == body["input_data"]["parameters"]["seed"]
    assert_png(base64.b64decode(record["generated_image"]))


def test_the_openai_example_writes_its_images(server: Server, tmp_path: Path) -> None:
    snippet = code_block("### OpenAI's images API", "python")
    # Only the address (the test server's) and the size (random:tiny's own, so that it stays quick) change.
    snippet = snippet.replace("http://127.0.0.1:5001", server.url).replace('"512x512"', '"128x128"')
    subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=clean_env(), check=True, timeout=300)
    written = sorted(path.name for path in tmp_path.glob("lighthouse-*.png"))
    assert written == ["lighthouse-42.png", "lighthouse-43.png"]
    for name in written:
        assert_png((tmp_path / name).read_bytes())


def test_the_generate_example_prints_what_the_readme_shows(server: Server, tmp_path: Path) -> None:
    block = code_block("## Try it", "bash")
    line, *shown = block.strip().splitlines()
    arguments = line.split(" ", 2)[2]  # after "sd-endpoint generate"
    prompt, options = re.fullmatch(r'"([^"]+)" (.*)', arguments).groups()  # type: ignore[union-attr]
    result = subprocess.run(
        [*CLI, "generate", prompt, *options.split(), "--url", server.url],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [expected.removeprefix("# ") for expected in shown]
    for expected in shown:
        with Image.open(tmp_path / expected.removeprefix("# ").split("\t")[0]) as image:
            assert image.format == "PNG"


def test_the_batch_example_scores_every_row(tmp_path: Path) -> None:
    block = code_block("## Batch", "bash")
    script = block.replace("sd-endpoint batch", f"{sys.executable} -m service.cli.main batch")
    script = script.replace("--steps 30", "--steps 2")  # random:tiny; the steps change nothing else
    env = clean_env(PYTHONPATH=str(REPO), SD_MODEL="random:tiny")
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, check=True, timeout=600)
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert (summary["total"], summary["done"], summary["failed"], summary["complete"]) == (2, 2, 0, True)
