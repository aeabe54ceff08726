"""Several models behind a real `sd-endpoint serve` process, with one model on the device at a time
(SD_MAX_RESIDENT_MODELS=1, nothing kept in host memory): requests that alternate between three
models saved by diffusers' own save_pretrained (a folder, a single checkpoint file, an inpainting
model), sent at once, each image equal to what diffusers draws with its model; the loads and
evictions in the metrics; a model folder broken after start-up fails its requests with why while the
others serve, and serves again once mended."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import model
from model.types import GenerationItem
from tests.engine.test_images_in import reference
from tests.helpers.processes import Server, serving
from tests.helpers.servers import decode_png, metric_value, request_body
from tests.helpers.weights import save_library, save_with_diffusers

pytestmark = pytest.mark.slow

SIZE = 128  # the wire's smallest side, and the tiny models' native one
STEPS = 3
TOLERANCE = 2 / 255 + 1 / 255  # diffusers' float image against the server's PNG (rounded to 8 bits)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_library(root, tmp_path_factory.mktemp("source"))
    save_with_diffusers(root / "spare", "tiny", seed=3)
    return root


@pytest.fixture(scope="module")
def server(library: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "SD_MODEL": str(library / "base"),
        "SD_MODELS": str(library),
        "SD_MAX_RESIDENT_MODELS": "1",
        "SD_MODEL_HOST_CACHE_GB": "0",
        # one thread, as the yardstick below: an inpainting model's text-to-image item encodes an
        # image of one colour, whose group norms divide by a variance of about zero, so another
        # summation order (another thread count) moves its latents visibly
        "SD_CPU_THREADS": "1",
    }
    with serving(tmp_path_factory.mktemp("residency") / "server.log", **env) as running:
        yield running


def draw(server: Server, name: str | None, seed: int, prompt: str = "a lighthouse at dusk") -> np.ndarray:
    parameters: dict[str, Any] = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "seed": seed}
    if name is not None:
        parameters["model"] = name
    response = httpx.post(f"{server.url}/score", json=request_body([prompt], **parameters), timeout=120)
    assert response.status_code == 200, response.text
    return decode_png(response.json()[0]["generated_image"]).astype(np.float32) / 255


def test_alternating_models_with_one_on_the_device_each_equal_diffusers(
    server: Server, library: Path
) -> None:
    asks = [(name, seed) for seed in range(3) for name in (None, "single", "paint")]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        drawn = list(pool.map(lambda ask: draw(server, *ask), asks))
    engines = {
        None: model.load(str(library / "base"), "cpu"),
        "single": model.load(str(library / "single.safetensors"), "cpu", config=str(library / "single")),
        "paint": model.load(str(library / "paint"), "cpu"),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = [
            reference(
                engines[name],
                GenerationItem(
                    "a lighthouse at dusk", seed=seed, num_inference_steps=STEPS, height=SIZE, width=SIZE
                ),
            )
            for name, seed in asks
        ]
    finally:
        torch.set_num_threads(threads)
    for (name, seed), image, wanted in zip(asks, drawn, expected, strict=True):
        difference = np.abs(image - wanted).max()
        assert difference <= TOLERANCE, f"{name or 'base'} seed {seed} differs by {difference * 255:.1f}/255"
    assert not np.array_equal(drawn[0], drawn[1])  # another model, another image
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_value(metrics, "sd_model_loads_total", 'engine="0",model="single",source="disk"') >= 1
    assert metric_value(metrics, "sd_model_evictions_total", 'engine="0",model="paint"') >= 1
    assert metric_value(metrics, "sd_model_images_total", 'engine="0",model="paint"') == 3
    info = httpx.get(f"{server.url}/info", timeout=30).json()
    on_device = [m["name"] for m in info["models"] if m["engines"] == [0]]
    assert len(on_device) == 1, info["models"]  # SD_MAX_RESIDENT_MODELS=1: one model on the device


def test_a_model_broken_after_start_up_fails_with_why_and_serves_once_mended(
    server: Server, library: Path
) -> None:
    weights = library / "spare" / "unet" / "diffusion_pytorch_model.safetensors"
    kept = weights.read_bytes()
    weights.write_bytes(kept[: len(kept) // 3])
    try:
        response = httpx.post(
            f"{server.url}/score",
            json=request_body(["x"], num_inference_steps=2, height=SIZE, width=SIZE, model="spare"),
            timeout=120,
        )
        assert response.status_code == 503, response.text
        assert "model spare could not be loaded" in response.text
        draw(server, "single", seed=5)  # the others serve throughout
    finally:
        weights.write_bytes(kept)
    assert draw(server, "spare", seed=5).shape == (SIZE, SIZE, 3)


def test_an_unknown_model_is_404_naming_the_models_there(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/score", json=request_body(["x"], num_inference_steps=2, model="nope"), timeout=30
    )
    assert response.status_code == 404, response.text
    assert "single" in response.text and "paint" in response.text
