"""AUTOMATIC1111's clients on their own defaults against a real `sd-endpoint serve` process
(random:tiny, with a key): ``webuiapi`` installed from PyPI, and the exact bodies SillyTavern, Open
WebUI and the ``stable-diffusion-api`` npm package send, replayed from their source. Each image is
compared with what diffusers draws for the same seed with the scheduler a diffusers user would set
(the server's tiny weights are the same random ones as this process's).

Sources of the replayed bodies:
- SillyTavern 1.12.6 (commit ba6f7b7a), public/scripts/extensions/stable-diffusion/index.js:
  generateAutoImage() and the defaults of extension_settings.sd (sampler "DDIM", scheduler
  "normal", clip_skip 1, steps 20, scale 7, seed -1 sent as undefined).
- Open WebUI (commit 02530d50), backend/open_webui/routers/images.py: image_generations() posts
  {prompt, batch_size, width, height, steps, negative_prompt} merged with its AUTOMATIC1111_PARAMS
  setting, here {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}.
- stable-diffusion-api 0.0.7 (jaschahuisman/sd-api, commit 3164437b), src/lib/StableDiffusionApi.ts:
  txt2img() with every option left out.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import httpx
import numpy as np
import pytest
import webuiapi
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
)

from model.types import GenerationItem
from tests.helpers.processes import Server, serving
from tests.helpers.servers import decode_png, tiny_engine
from tests.helpers.stock import stock_image

pytestmark = pytest.mark.slow
KEY = "client-key"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode()}
TOLERANCE = 2 / 255 + 1 / 255  # diffusers' float image against the server's PNG (rounded to 8 bits)
KARRAS_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("clients") / "server.log", SD_API_KEYS=KEY) as running:
        yield running


def diffusers_image(item: GenerationItem, cls: type, eta: float = 0.0, **options: Any) -> np.ndarray:
    c = tiny_engine().components
    pipe = StableDiffusionPipeline(**c.modules(), requires_safety_checker=False)
    pipe.scheduler = cls.from_config(c.scheduler.config, **options)
    return stock_image(pipe, replace(item, eta=eta))


def assert_drawn_by(png: np.ndarray, item: GenerationItem, cls: type, **options: Any) -> None:
    expected = diffusers_image(item, cls, **options)  # options: the class's, and the pipeline's eta
    difference = np.abs(png.astype(np.float32) / 255 - expected).max()
    assert difference < TOLERANCE, difference


def txt2img(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=AUTH, timeout=300)
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


# ----------------------------------------------------------------------------- webuiapi
def client(server: Server, **kw: Any) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", **kw)
    api.set_auth("user", KEY)
    return api


def test_webuiapi_on_its_defaults_draws_euler_a_with_its_eta_1(server: Server) -> None:
    """txt2img(prompt, seed) sends eta 1.0, "Euler a", scheduler "automatic", 20 steps, 512x512."""
    result = client(server).txt2img(prompt="a red fox", seed=3)
    info = result.info
    assert (info["sampler_name"], info["eta"], info["steps"], info["width"]) == ("Euler a", 1.0, 20, 512)
    item = GenerationItem("a red fox", 3, num_inference_steps=20, guidance_scale=7.0, height=512, width=512)
    assert_drawn_by(np.asarray(result.image), item, EulerAncestralDiscreteScheduler)


def test_webuiapi_with_karras_and_clip_skip(server: Server) -> None:
    api = client(server, sampler="DPM++ 2M", scheduler="Karras", steps=4)
    result = api.txt2img(
        prompt="a heron", seed=5, width=128, height=128, override_settings={"CLIP_stop_at_last_layers": 2}
    )
    assert result.info["clip_skip"] == 2 and result.info["scheduler"] == "Karras"
    item = GenerationItem(
        "a heron", 5, num_inference_steps=4, guidance_scale=7.0, height=128, width=128, clip_skip=1
    )
    from transformers import CLIPTextModel  # diffusers' clip_skip reads text_model (transformers < 5.6)

    with pytest.MonkeyPatch.context() as patch:
        if not hasattr(CLIPTextModel, "text_model"):
            patch.setattr(CLIPTextModel, "text_model", property(lambda self: self), raising=False)
        assert_drawn_by(np.asarray(result.image), item, DPMSolverMultistepScheduler, **KARRAS_2M)


def test_webuiapi_reads_every_list_and_probe(server: Server) -> None:
    api = client(server)
    assert api.refresh_checkpoints() is None
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    for listed in (api.get_face_restorers(), api.get_prompt_styles(), api.get_hypernetworks()):
        assert listed == []
    assert api.get_cmd_flags()["api"] is True
    assert api.get_memory()["ram"]["total"] > 0
    samplers = {entry["name"]: entry for entry in api.get_samplers()}
    wanted = {"Euler a", "DPM++ 2M", "DDIM", "LMS", "Heun", "DPM2", "DPM++ SDE", "UniPC", "LCM"}
    assert wanted <= set(samplers)
    assert "Karras" in samplers["DPM++ 2M"]["options"]["schedules"]
    assert [entry["label"] for entry in api.get_schedulers()] == [
        "Automatic", "Uniform", "Normal", "Karras", "Exponential"
    ]  # fmt: skip
    assert api.util_get_model_names() and api.get_sd_models()


# ----------------------------------------------------------------------------- replayed bodies
def test_sillytaverns_fresh_install_body(server: Server) -> None:
    body = {
        "url": "http://localhost:7860", "auth": f"user:{KEY}", "prompt": "a red fox",
        "negative_prompt": "blur", "sampler_name": "DDIM", "scheduler": "normal", "steps": 3, "cfg_scale": 7,
        "width": 128, "height": 128, "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent",
        "hr_scale": 2.0,
        "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": 11,
        "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
        "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
        "do_not_save_samples": False,
    }  # fmt: skip
    data = txt2img(server, body)
    item = GenerationItem(
        "a red fox", 11, "blur", num_inference_steps=3, guidance_scale=7, height=128, width=128
    )
    assert_drawn_by(decode_png(data["images"][0]), item, DDIMScheduler)


def test_open_webuis_body_with_its_a1111_params(server: Server) -> None:
    body = {"prompt": "a lighthouse", "batch_size": 1, "width": 128, "height": 128, "steps": 3}
    data = txt2img(server, body | {"sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": 4})
    item = GenerationItem("a lighthouse", 4, num_inference_steps=3, guidance_scale=7.0, height=128, width=128)
    assert_drawn_by(decode_png(data["images"][0]), item, DPMSolverMultistepScheduler, **KARRAS_2M)
    legacy = txt2img(server, body | {"sampler_name": "DPM++ 2M Karras", "seed": 4})
    assert legacy["images"] == data["images"]


def stable_diffusion_api_body(**options: Any) -> dict[str, Any]:
    """txt2img() of stable-diffusion-api 0.0.7 with ``options`` given and every other one left out."""
    body = {
        "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0,
        "hr_resize_x": 0, "hr_resize_y": 0, "denoising_strength": 0.7, "firstphase_width": 0,
        "firstphase_height": 0,
        "prompt": "", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
        "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 20,
        "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": False, "tiling": False,
        "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0,
        "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
        "override_settings_restore_afterwards": True, "script_args": [], "script_name": None,
        "send_images": True, "save_images": False, "alwayson_scripts": {"ControlNet": {"args": []}},
        "sampler_name": "Euler a", "use_deprecated_controlnet": False,
    }  # fmt: skip
    return body | options


def test_stable_diffusion_api_on_its_defaults(server: Server) -> None:
    data = txt2img(server, stable_diffusion_api_body(prompt="a cat", seed=8, steps=3, width=128, height=128))
    item = GenerationItem("a cat", 8, num_inference_steps=3, guidance_scale=7.0, height=128, width=128)
    assert_drawn_by(decode_png(data["images"][0]), item, EulerAncestralDiscreteScheduler)
    assert json.loads(data["info"])["all_seeds"] == [8]


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (
            {"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "module": "canny"}]}}},
            "ControlNet",
        ),
        ({"use_deprecated_controlnet": True}, "use_deprecated_controlnet"),
        ({"enable_hr": True}, "img2img"),
        ({"eta": 0.5}, "eta"),
        ({"sampler_name": "DDIM", "scheduler": "Karras"}, "sampler_name"),
        ({"scheduler": "Beta"}, "scheduler"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 13}}, "CLIP_stop_at_last_layers"),
        ({"clip_skip": 3}, "clip_skip"),
        ({"clip_skip": 2, "override_settings": {"CLIP_stop_at_last_layers": 1}}, "clip_skip"),
        ({"sampler_name": None, "scheduler": "Karras"}, "scheduler"),
    ],
)
def test_what_asks_for_work_not_done_is_a_422_naming_it(
    server: Server, changes: dict[str, Any], named: str
) -> None:
    body = stable_diffusion_api_body(prompt="x", steps=1, width=128, height=128) | changes
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=AUTH, timeout=60)
    assert answer.status_code == 422, answer.text
    assert named in answer.json()["detail"]
    # clients that hide the body still show the status line (service/hosts/connections.py)
    assert answer.reason_phrase.startswith("Unprocessable Entity: ") and named in answer.reason_phrase


def test_no_op_extension_fields_are_accepted(server: Server) -> None:
    off = {"ADetailer": {"args": [False]}, "animatediff": {"args": [False]}, "ControlNet": {"args": []}}
    body = stable_diffusion_api_body(prompt="x", seed=1, steps=1, width=128, height=128, alwayson_scripts=off)
    txt2img(server, body | {"controlnet_units": [], "hr_checkpoint_name": None, "hr_sampler_name": None})


def test_requests_with_different_samplers_at_once_each_equal_diffusers(server: Server) -> None:
    """Sent together, they share the step loop's running set (one UNet call per step for all):
    each image is still the one diffusers draws for it alone."""
    base = {"prompt": "a fox in snow", "steps": 3, "width": 128, "height": 128, "cfg_scale": 7}
    cases = [
        ({"sampler_name": "Euler a", "eta": 1.0, "seed": 31}, EulerAncestralDiscreteScheduler, {}),
        ({"sampler_name": "DDIM", "eta": 0.5, "seed": 32}, DDIMScheduler, {"eta": 0.5}),
        ({"sampler_name": "DPM++ 2M Karras", "seed": 33}, DPMSolverMultistepScheduler, KARRAS_2M),
        ({"sampler_name": "Heun", "scheduler": "normal", "seed": 34}, HeunDiscreteScheduler, {}),
        (
            {"sampler_name": "LMS", "scheduler": "Karras", "seed": 35},
            LMSDiscreteScheduler,
            {"use_karras_sigmas": True},
        ),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda case: txt2img(server, base | case[0]), cases))
    for (body, cls, options), data in zip(cases, answers, strict=True):
        item = GenerationItem(
            "a fox in snow", body["seed"], num_inference_steps=3, guidance_scale=7, height=128, width=128
        )
        assert_drawn_by(decode_png(data["images"][0]), item, cls, **options)
