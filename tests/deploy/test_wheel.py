"""The package as users install it: the wheel built from what the Dockerfile copies, installed
outside the checkout (not editable, as the Dockerfile's `pip install .` does), then served, asked
and run as a batch job from a folder where the checkout cannot be imported.

The install goes to a folder of its own (`pip install --target`), run with PYTHONPATH pointing
at it, so that the shared environment's libraries (torch, diffusers) serve it unchanged.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers.pictures import picture, png_bytes, square_mask
from tests.helpers.processes import Server, serving

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "schemas", "service")
BUILD_LIMIT_S = 600


@dataclass
class Install:
    wheel: Path
    target: Path  # what `pip install --target` wrote
    outside: Path  # a working folder away from the checkout

    @property
    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.target)}

    @property
    def program(self) -> str:
        return str(self.target / "bin" / "sd-endpoint")


def dockerfile_sources() -> list[str]:
    """What the Dockerfile copies into the folder it installs (`COPY <source> ./...`)."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    return [match.group(1) for line in lines if (match := re.match(r"COPY (\S+) \./", line))]


def pip(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=BUILD_LIMIT_S
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    """Steps: 1) the Dockerfile's sources in a clean folder, 2) a wheel of them, 3) installed."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    for name in dockerfile_sources():
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    # The build backend from this environment when it has one (offline); else pip fetches it, as
    # the Dockerfile's `pip install .` does.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    pip("wheel", "--no-deps", *isolation, "--wheel-dir", str(base / "dist"), ".", cwd=source)
    (wheel,) = (base / "dist").glob("sd_endpoint-*.whl")
    pip("install", "--no-deps", "--no-compile", "--target", str(base / "site"), str(wheel), cwd=base)
    outside = base / "work"
    outside.mkdir()
    return Install(wheel, base / "site", outside)


@pytest.fixture(scope="module")
def server(installed: Install) -> Iterator[Server]:
    log = installed.outside / "server.log"
    # a second model, chosen per request, on two devices (two CPU engines behind one queue)
    library = {"SD_MODELS": "paint=random:tiny-inpaint:1", "SD_DEVICES": "cpu,cpu"}
    with serving(
        log, command=[installed.program, "serve"], cwd=installed.outside, **installed.env, **library
    ) as running:
        yield running


def test_every_file_of_the_packages_is_in_the_wheel(installed: Install) -> None:
    """Static pages, templates, configs: whatever the code reads at run time ships with it."""
    tracked = subprocess.run(
        ["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert any(name.startswith("service/web/static/") for name in tracked)
    with zipfile.ZipFile(installed.wheel) as wheel:
        shipped = set(wheel.namelist())
    missing = [name for name in tracked if name not in shipped]
    assert not missing, f"the wheel lacks {missing}"


def test_the_installed_package_is_what_runs(installed: Install) -> None:
    code = "import model, schemas, service, service.web.ui as ui; print(service.__file__, ui.STATIC_DIR)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=installed.outside,
        env={**_base_env(), **installed.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for path in done.stdout.split():
        assert Path(path).is_relative_to(installed.target), path


def _base_env() -> dict[str, str]:
    from tests.helpers.processes import clean_env

    return clean_env()


def png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
    assert image.format == "PNG"
    return image


def test_score_info_and_the_openai_api_answer(server: Server) -> None:
    parameters = {"num_inference_steps": 1}
    body = {"input_data": {"columns": ["prompt"], "data": ["a cat"], "parameters": parameters}}
    answer = httpx.post(f"{server.url}/score", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert png(answer.json()[0]["generated_image"]).size == (128, 128)
    info = httpx.get(f"{server.url}/info").json()
    assert (info["name"], info["random_weights"]) == ("random:tiny", True)
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["random:tiny", "paint"]
    openai = {"prompt": "a dog", "num_inference_steps": 1, "response_format": "b64_json"}
    answer = httpx.post(f"{server.url}/v1/images/generations", json=openai, timeout=120)
    assert answer.status_code == 200, answer.text
    assert png(answer.json()["data"][0]["b64_json"]).size == (128, 128)


def test_the_playground_page_has_its_script_and_style(server: Server, installed: Install) -> None:
    page = httpx.get(f"{server.url}/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    static = installed.target / "service" / "web" / "static"
    for name in ("app.js", "style.css"):
        assert (static / name).read_text(encoding="utf-8").strip() in page.text, name


def test_a_local_batch_job_runs(installed: Install) -> None:
    prompts = installed.outside / "in"
    prompts.mkdir()
    (prompts / "a.csv").write_text("prompt,seed\na red cat,1\na blue dog,2\n")
    out = installed.outside / "out"
    done = subprocess.run(
        [installed.program, "batch", "--input", str(prompts), "--output", str(out), "--model", "random:tiny",
         "--steps", "1"],
        cwd=installed.outside, env={**_base_env(), **installed.env}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(out.rglob("*.png"))) == 2


def test_the_installed_package_inpaints_with_the_library_model_a_request_names(server: Server) -> None:
    image = base64.b64encode(png_bytes(picture(3, (128, 128)))).decode()
    mask = base64.b64encode(png_bytes(square_mask(128))).decode()
    body = {
        "input_data": {
            "columns": ["prompt", "image", "mask_image"],
            "data": [["a red door", image, mask]],
            "parameters": {"num_inference_steps": 2, "model": "paint", "seed": 5},
        }
    }
    drawn = httpx.post(f"{server.url}/score", json=body, timeout=120)
    assert drawn.status_code == 200, drawn.text
    painted = np.asarray(png(drawn.json()[0]["generated_image"]))
    body["input_data"]["parameters"].pop("model")  # type: ignore[attr-defined]
    default = httpx.post(f"{server.url}/score", json=body, timeout=120)
    assert default.status_code == 200, default.text
    assert not np.array_equal(painted, np.asarray(png(default.json()[0]["generated_image"])))
