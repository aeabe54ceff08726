"""Clients built on OpenAI's images API and Hugging Face's, installed from PyPI and left on their
defaults, against a real `sd-endpoint serve` process (random:tiny, a key, no SD_SERVED_MODEL_NAMES,
SD_MAX_STEPS 2 so that requests naming no steps are quick): LangChain's DallEAPIWrapper (dall-e-2,
reads data[0].url), LiteLLM's image_generation (model "openai/dall-e-3": its way to name an
OpenAI-compatible server), the openai SDK asking for url answers, huggingface_hub with an
AUTOMATIC1111 sampler name. The images behind the links are the ones b64_json gives, and equal
diffusers' for the same seed."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from huggingface_hub import InferenceClient

from model.types import GenerationItem
from tests.helpers.processes import Server, serving
from tests.helpers.servers import decode_png, tiny_engine
from tests.helpers.stock import stock_image

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list
import litellm
from langchain_community.utilities.dalle_image_generator import DallEAPIWrapper

pytestmark = pytest.mark.slow
KEY = "openai-clients-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("openai-clients")
    with serving(
        folder / "server.log", SD_API_KEYS=KEY, SD_MAX_STEPS="2", SD_IMAGE_LINK_DIR=str(folder / "links")
    ) as running:
        yield running


def fetched(url: str, **headers: str) -> np.ndarray:
    """The PNG behind a link, read without a key (the link is the permission)."""
    answer = httpx.get(url, headers=headers, timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text
    assert "max-age=" in answer.headers["cache-control"]
    return decode_png(base64.b64encode(answer.content).decode())


def test_langchains_dalle_wrapper_on_its_defaults_gets_a_link(server: Server) -> None:
    """Its model (dall-e-2) and its reading of data[0].url as they come; its 1024x1024 takes longer
    than the request deadline on a CPU, so the size is smaller."""
    wrapper = DallEAPIWrapper(api_key=KEY, base_url=f"{server.url}/v1", size="256x256")
    assert wrapper.model_name == "dall-e-2"
    url = wrapper.run("a lighthouse at dusk")
    assert url.startswith(f"{server.url}/v1/images/files/") and url.endswith(".png")
    assert fetched(url).shape == (256, 256, 3)


def test_litellms_image_generation(server: Server) -> None:
    answer = litellm.image_generation(
        prompt="a red fox", model="openai/dall-e-3", api_base=f"{server.url}/v1", api_key=KEY, size="256x256"
    )
    image = answer.data[0]
    assert image.url is not None and fetched(image.url).shape == (256, 256, 3)


def test_openai_sdk_url_answers_hold_the_b64_images_and_equal_diffusers(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    extra = {"seed": 21, "scheduler": "DPM++ 2M Karras", "num_inference_steps": 2}
    linked = client.images.generate(prompt="a heron", size="128x128", response_format="url", extra_body=extra)
    inline = client.images.generate(
        prompt="a heron", size="128x128", response_format="b64_json", extra_body=extra
    )
    [link], [image] = linked.data, inline.data
    assert link.b64_json is None and image.url is None and link.url is not None and image.b64_json is not None
    assert np.array_equal(fetched(link.url), decode_png(image.b64_json))
    # with the caller's key too (Open WebUI fetches the link with the headers it generated with)
    assert np.array_equal(fetched(link.url, authorization=f"Bearer {KEY}"), decode_png(image.b64_json))
    c = tiny_engine().components
    pipe = StableDiffusionPipeline(**c.modules(), requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        c.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    )
    item = GenerationItem("a heron", 21, num_inference_steps=2, guidance_scale=7.5, height=128, width=128)
    expected = stock_image(pipe, item)
    assert np.abs(decode_png(image.b64_json).astype(np.float32) / 255 - expected).max() < 3 / 255
    # no format named: both, as clients built for dall-e read url and others b64_json
    [both] = client.images.generate(prompt="a heron", size="128x128", extra_body=extra).data
    assert both.url is not None and both.b64_json == image.b64_json


def test_a_link_that_is_unknown_or_malformed_is_404(server: Server) -> None:
    for name in ("A" * 43 + ".png", "short.png", "A" * 43):
        answer = httpx.get(f"{server.url}/v1/images/files/{name}", timeout=10)
        assert answer.status_code == 404 and "unknown or expired" in answer.json()["error"]["message"]


def test_huggingface_hub_with_an_a1111_sampler_name(server: Server) -> None:
    client = InferenceClient(base_url=server.url, api_key=KEY)
    image = client.text_to_image("a red fox", seed=4, scheduler="DPM++ 2M Karras", height=128, width=128)
    assert image.size == (128, 128)


def test_the_status_line_says_what_to_change_for_clients_that_show_only_it(server: Server) -> None:
    """Open WebUI's OpenAI engine shows aiohttp's ClientResponseError.message: the reason phrase."""
    body = {"prompt": "x", "model": "dall-e-9"}
    answer = httpx.post(
        f"{server.url}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answer.status_code == 404 and "x-sd-reason" not in answer.headers
    assert answer.reason_phrase.startswith("Not Found: this server serves only 'random:tiny'")
    assert answer.reason_phrase.split(": ", 1)[1] == answer.json()["error"]["message"][:189]
    unknown = httpx.get(f"{server.url}/v1/images/files/{'A' * 43}.png")
    assert unknown.reason_phrase.startswith("Not Found: this image link is unknown or expired")
    fine = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert fine.reason_phrase == "OK"
