"""Images in, as each client sends them, against a real `sd-endpoint serve` process (random:tiny,
with a key): Azure's inpainting and image-to-image bodies on /score, the openai SDK's
``images.edit``, webuiapi's ``img2img`` (with and without ``mask_image``) and huggingface_hub's
``InferenceClient.image_to_image``, each installed from the registry and called on its defaults.
Images are compared with what diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline draw from the same weights, inputs and seed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
import webuiapi
from diffusers import (
    EulerAncestralDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
)
from huggingface_hub import InferenceClient
from PIL import Image

from tests.helpers.pictures import picture, png_bytes, square_mask
from tests.helpers.processes import Server, serving
from tests.helpers.servers import decode_png, tiny_engine

pytestmark = pytest.mark.slow
KEY = "images-in-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
SIZE = 128  # random:tiny's native size
TOLERANCE = 2 / 255 + 1 / 255  # diffusers' float image against the server's PNG (rounded to 8 bits)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("images-in") / "server.log", SD_API_KEYS=KEY) as running:
        yield running


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def diffusers_image(
    prompt: str,
    seed: int,
    image: Image.Image,
    *,
    mask: Image.Image | None = None,
    steps: int = 4,
    strength: float = 0.8,
    guidance: float = 7.5,
    scheduler: type | None = None,
) -> np.ndarray:
    """What a diffusers user draws with the server's weights: Img2Img, or Inpaint with a mask."""
    c = tiny_engine().components
    pipe_class = StableDiffusionImg2ImgPipeline if mask is None else StableDiffusionInpaintPipeline
    pipe = pipe_class(**c.modules(), requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(c.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    extra: dict[str, Any] = {} if mask is None else {"mask_image": mask, "height": SIZE, "width": SIZE}
    out = pipe(
        prompt,
        image=image,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **extra,
    )
    drawn: np.ndarray = out.images[0]
    return drawn


def assert_close(png: np.ndarray, expected: np.ndarray) -> None:
    difference = np.abs(png.astype(np.float32) / 255 - expected).max()
    assert difference < TOLERANCE, f"{difference * 255:.2f}/255"


# ----------------------------------------------------------------------------- /score (Azure ML)
def test_azure_inpainting_body_with_encodebytes_equals_diffusers_inpaint(server: Server) -> None:
    """Azure's sample: columns [prompt, image, mask_image, negative_prompt], rows as objects, base64
    with a line break every 76 characters, strength left out (inpainting runs the whole schedule)."""
    image, mask = picture(1), square_mask()
    row = {
        "prompt": "a cat on a bench",
        "image": base64.encodebytes(png_bytes(image)).decode(),
        "mask_image": base64.encodebytes(png_bytes(mask)).decode(),
        "negative_prompt": "blurry",
    }
    body = {
        "input_data": {
            "columns": ["prompt", "image", "mask_image", "negative_prompt"],
            "data": [row],
            "index": [0],
            "parameters": {"num_inference_steps": 4, "guidance_scale": 7.5, "seed": 11},
        }
    }
    answer = httpx.post(f"{server.url}/score", json=body, headers=HEADERS, timeout=300)
    assert answer.status_code == 200, answer.text
    (record,) = answer.json()
    assert record["prompt"] == "a cat on a bench" and record["seed"] == 11
    c = tiny_engine().components
    pipe = StableDiffusionInpaintPipeline(**c.modules(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        "a cat on a bench",
        image=image,
        mask_image=mask,
        negative_prompt="blurry",
        num_inference_steps=4,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(11),
        output_type="np",
    ).images[0]
    assert_close(decode_png(record["generated_image"]), expected)


def test_azure_image_to_image_body_equals_diffusers_img2img(server: Server) -> None:
    """Azure's image-to-image sample: columns [image, prompt]; strength in the parameters."""
    image = picture(2)
    body = {
        "input_data": {
            "columns": ["image", "prompt"],
            "index": [0],
            "data": [{"image": b64(image), "prompt": "a watercolour"}],
            "parameters": {"num_inference_steps": 6, "seed": 5, "strength": 0.5},
        }
    }
    answer = httpx.post(f"{server.url}/score", json=body, headers=HEADERS, timeout=300)
    assert answer.status_code == 200, answer.text
    expected = diffusers_image("a watercolour", 5, image, steps=6, strength=0.5)
    assert_close(decode_png(answer.json()[0]["generated_image"]), expected)


def test_score_mask_column_named_as_the_catalog_card_names_it(server: Server) -> None:
    body = {
        "input_data": {
            "columns": ["prompt", "image", "mask"],
            "data": [["a boat", b64(picture(3)), b64(square_mask())]],
            "parameters": {"num_inference_steps": 2, "seed": 1},
        }
    }
    answer = httpx.post(f"{server.url}/score", json=body, headers=HEADERS, timeout=300)
    assert answer.status_code == 200, answer.text


# ----------------------------------------------------------------------------- OpenAI
def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def test_openai_sdk_edit_with_an_alpha_mask_equals_diffusers_inpaint(server: Server) -> None:
    """OpenAI's mask is a PNG whose transparent pixels are repainted."""
    image, repaint = picture(4), square_mask()
    alpha_mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
    alpha_mask.putalpha(Image.eval(repaint, lambda level: 255 - level))
    result = openai_client(server).images.edit(
        image=("photo.png", png_bytes(image), "image/png"),
        mask=("mask.png", png_bytes(alpha_mask), "image/png"),
        prompt="a lighthouse",
        response_format="b64_json",
        extra_body={"seed": 9, "num_inference_steps": 4},
    )
    assert result.data is not None and result.data[0].b64_json is not None
    expected = diffusers_image("a lighthouse", 9, image, mask=repaint, strength=1.0)
    assert_close(decode_png(result.data[0].b64_json), expected)


def test_openai_sdk_edit_without_a_mask_is_image_to_image_with_n_images(server: Server) -> None:
    image = picture(5)
    result = openai_client(server).images.edit(
        image=("photo.png", png_bytes(image), "image/png"),
        prompt="a forest",
        n=2,
        size="128x128",
        response_format="b64_json",
        extra_body={"seed": 20, "num_inference_steps": 5, "strength": 0.6},
    )
    assert result.data is not None and len(result.data) == 2
    for index, entry in enumerate(result.data):
        assert entry.b64_json is not None
        expected = diffusers_image("a forest", 20 + index, image, steps=5, strength=0.6)
        assert_close(decode_png(entry.b64_json), expected)


def test_openai_sdk_edit_streams_its_own_events(server: Server) -> None:
    stream = openai_client(server).images.edit(
        image=("photo.png", png_bytes(picture(6)), "image/png"),
        prompt="a hill",
        stream=True,
        partial_images=1,
        extra_body={"seed": 2, "num_inference_steps": 4, "strength": 1.0},
    )
    kinds = [event.type for event in stream]
    assert kinds[-1] == "image_edit.completed" and set(kinds) <= {
        "image_edit.partial_image",
        "image_edit.completed",
    }


# ----------------------------------------------------------------------------- AUTOMATIC1111
def a1111(server: Server) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", steps=4)
    api.set_auth("user", KEY)
    return api


def test_webuiapi_img2img_on_its_defaults_equals_diffusers(server: Server) -> None:
    """img2img(images, prompt, seed): denoising_strength 0.75, "Euler a" with eta 1, resize_mode 0,
    cfg 7; the image is stretched to the asked size (A1111's resize mode 0, PIL's Lanczos)."""
    image = picture(7, size=(96, 160))
    result = a1111(server).img2img(images=[image], prompt="a mountain", seed=4, width=SIZE, height=SIZE)
    info = result.info
    assert (info["denoising_strength"], info["sampler_name"], info["width"]) == (0.75, "Euler a", SIZE)
    fitted = image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    expected = diffusers_image(
        "a mountain", 4, fitted, strength=0.75, guidance=7.0, scheduler=EulerAncestralDiscreteScheduler
    )
    assert_close(np.asarray(result.image), expected)


def test_webuiapi_inpaint_only_masked_keeps_the_rest_and_the_whole_size(server: Server) -> None:
    """With mask_image (inpaint_full_res on, webuiapi's default), the masked area is drawn at the
    asked size and pasted back: the answer has the image's own size, its unmasked pixels as sent."""
    image = picture(8, size=(256, 192))
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (100, 60, 160, 120))
    result = a1111(server).img2img(
        images=[image], mask_image=mask, prompt="a window", seed=6, width=SIZE, height=SIZE, mask_blur=0
    )
    drawn = np.asarray(result.image)
    assert drawn.shape == (192, 256, 3)
    original = np.asarray(image)
    kept = np.asarray(mask) == 0
    assert np.abs(drawn[kept].astype(int) - original[kept].astype(int)).max() <= 1
    assert np.abs(drawn[~kept].astype(int) - original[~kept].astype(int)).mean() > 5  # repainted


def test_webuiapi_inpaint_whole_picture_with_inverted_mask(server: Server) -> None:
    image = picture(9)
    result = a1111(server).img2img(
        images=[image],
        mask_image=square_mask(),
        inpaint_full_res=False,
        inpainting_mask_invert=1,
        inpainting_fill=1,
        prompt="a field",
        seed=8,
        width=SIZE,
        height=SIZE,
        mask_blur=0,
    )
    drawn, original = np.asarray(result.image).astype(int), np.asarray(image).astype(int)
    inside = np.asarray(square_mask()) == 255  # inverted: the square is kept
    assert np.abs(drawn[inside] - original[inside]).max() <= 1
    assert np.abs(drawn[~inside] - original[~inside]).mean() > 5


def test_a1111_refuses_latent_fills_by_name(server: Server) -> None:
    body = {"init_images": [b64(picture(1))], "mask": b64(square_mask()), "inpainting_fill": 2, "steps": 2}
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, headers=HEADERS, timeout=60)
    assert answer.status_code == 422 and "inpainting_fill" in answer.json()["detail"]


# ----------------------------------------------------------------------------- Hugging Face
def test_inference_client_image_to_image_equals_diffusers(server: Server) -> None:
    image = picture(10)
    client = InferenceClient(base_url=server.url, api_key=KEY)
    drawn = client.image_to_image(png_bytes(image), prompt="a harbour", num_inference_steps=4, seed=3)
    expected = diffusers_image("a harbour", 3, image, strength=0.8)
    assert_close(np.asarray(drawn.convert("RGB")), expected)


def test_inference_client_image_alone_is_never_a_prompt(server: Server) -> None:
    """Without parameters the client posts the image's bytes; with a base64 ``inputs`` and no prompt
    it is still an image to draw from, not the text of a prompt."""
    client = InferenceClient(base_url=server.url, api_key=KEY)
    drawn = client.image_to_image(png_bytes(picture(11)))
    assert drawn.size == (SIZE, SIZE)
    body = {"inputs": b64(picture(11)), "parameters": {"num_inference_steps": 2, "seed": 1}}
    answer = httpx.post(f"{server.url}/", json=body, headers=HEADERS, timeout=120)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    as_text = {"inputs": "a plain prompt", "parameters": {"num_inference_steps": 2, "seed": 1}}
    assert httpx.post(f"{server.url}/", json=as_text, headers=HEADERS, timeout=120).status_code == 200


def test_image_info_is_reported_in_a1111_parameters_without_the_images(server: Server) -> None:
    body = {"init_images": [b64(picture(1))], "steps": 2, "width": SIZE, "height": SIZE, "seed": 3}
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, headers=HEADERS, timeout=120)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert "init_images" not in data["parameters"] and json.loads(data["info"])["all_seeds"] == [3]


def test_score_rows_of_several_sizes_and_empty_cells_in_one_request(server: Server) -> None:
    """A table mixing rows: an image of another aspect ratio (drawn at its own size), a text-only row
    whose image cell is empty (a DataFrame's empty cell), each as if sent alone."""
    wide = picture(12, size=(192, 128))
    body = {
        "input_data": {
            "columns": ["prompt", "image"],
            "data": [["a dune", b64(wide)], ["a dune", ""], ["a dune", None]],
            "parameters": {"num_inference_steps": 4, "seed": 30},
        }
    }
    answer = httpx.post(f"{server.url}/score", json=body, headers=HEADERS, timeout=300)
    assert answer.status_code == 200, answer.text
    first, second, third = (decode_png(record["generated_image"]) for record in answer.json())
    assert first.shape == (128, 192, 3) and second.shape == third.shape == (SIZE, SIZE, 3)
    assert_close(first, diffusers_image("a dune", 30, wide, strength=0.8))
