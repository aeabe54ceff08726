"""AUTOMATIC1111's API (/sdapi/v1/*) with the exact bodies and headers Open WebUI and SillyTavern
send, against a real `sd-endpoint serve` process on random:tiny with two API keys; and following
and stopping a long generation: A1111's progress (with a PNG preview), interrupt and skip, and
POST /requests/{id}/cancel for any client."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from service.runtime.jobs import POLLED_PREVIEW_INTERVAL_S
from tests.helpers import until
from tests.helpers.processes import Server, serving
from tests.helpers.servers import decode_png, metric_value, request_body

pytestmark = pytest.mark.slow
KEY, OTHER_KEY = "a1111-key", "someone-elses-key"
SERVED = "sd-test.safetensors"
# Open WebUI: "Basic " + base64(AUTOMATIC1111_API_AUTH), the setting being "user:password".
OPEN_WEBUI = {"authorization": "Basic " + base64.b64encode(f"webui:{KEY}".encode()).decode()}
OTHER = {"Authorization": "Bearer " + OTHER_KEY}
# A 256x256 image of 150 steps takes tens of seconds on the CPU: long enough to watch and stop.
LONG = {"prompt": "a long one", "steps": 150, "width": 256, "height": 256, "seed": 9, "cfg_scale": 1}
WAIT_S = 60


def sillytavern_body(**changes: Any) -> dict[str, Any]:
    """What SillyTavern's server relays (src/endpoints/stable-diffusion.js posts its request body as
    is, so its own url and auth settings come along)."""
    body = {
        "url": "http://127.0.0.1:7860", "auth": f"st:{KEY}", "prompt": "a red fox", "negative_prompt": "blur",
        "sampler_name": "Euler a", "scheduler": "Automatic", "steps": 2, "cfg_scale": 7, "width": 128,
        "height": 128, "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2,
        "hr_additional_modules": [], "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": 7,
        "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
        "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
        "do_not_save_samples": False,
    }  # fmt: skip
    return body | changes


def sillytavern_headers() -> dict[str, str]:
    """SillyTavern's getBasicAuthHeader(auth): "Basic " + base64 of its "user:password" setting."""
    return {
        "Content-Type": "application/json",
        "Authorization": "Basic " + base64.b64encode(f"st:{KEY}".encode()).decode(),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("a1111") / "server.log"
    with serving(log_path, SD_API_KEYS=f"{KEY},{OTHER_KEY}", SD_SERVED_MODEL_NAMES=SERVED) as running:
        yield running


def get(server: Server, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", headers=OPEN_WEBUI if headers is None else headers, timeout=30)


def post(
    server: Server, path: str, body: Any, headers: dict[str, str] | None = None, **kw: Any
) -> httpx.Response:
    headers = OPEN_WEBUI if headers is None else headers
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=kw.get("timeout", 120))


def score_images(server: Server, seed: int, images: int = 1, **parameters: Any) -> list[np.ndarray]:
    body = request_body(["a red fox"], seed=seed, num_images_per_prompt=images, **parameters)
    answer = post(server, "/score", body, {"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200, answer.text
    return [decode_png(record["generated_image"]) for record in answer.json()]


def test_the_handshakes_of_open_webui_and_sillytavern(server: Server) -> None:
    options = get(server, "/sdapi/v1/options", sillytavern_headers()).json()
    # A1111's title, "name [hash]" once the hash is computed (in the background)
    assert options["sd_model_checkpoint"].split(" [")[0] == SERVED and "forge_preset" not in options
    models = get(server, "/sdapi/v1/sd-models").json()
    assert [(m["title"].split(" [")[0], m["model_name"]) for m in models] == [(SERVED, SERVED)]
    samplers = [entry["name"] for entry in get(server, "/sdapi/v1/samplers").json()]
    assert {"Euler", "Euler a", "DDIM", "DPM++ 2M", "UniPC"} <= set(samplers)
    schedules = [entry["label"] for entry in get(server, "/sdapi/v1/schedulers").json()]
    assert schedules == ["Automatic", "Uniform", "Normal", "Karras", "Exponential"]
    assert [entry["name"] for entry in get(server, "/sdapi/v1/upscalers").json()] == ["None"]
    for path in ("/sdapi/v1/latent-upscale-modes", "/sdapi/v1/sd-vae", "/sdapi/v1/loras"):
        assert get(server, path).json() == []
    # Open WebUI posts the options back with the checkpoint it wants: the served one is a no-op.
    assert post(server, "/sdapi/v1/options", {**options, "sd_model_checkpoint": SERVED}).status_code == 200
    switched = post(server, "/sdapi/v1/options", {**options, "sd_model_checkpoint": "sdxl.safetensors"})
    assert switched.status_code == 404 and SERVED in switched.json()["detail"]  # not served: 404
    assert post(server, "/sdapi/v1/options", {"sd_vae": "other.pt"}).status_code == 422


@pytest.mark.parametrize(
    "body",
    [[], "options", None, {"sd_model_checkpoint": 5}, {"sd_model_checkpoint": ["a"]}, {"sd_vae": None},
     {"CLIP_stop_at_last_layers": True}, {"CLIP_stop_at_last_layers": 2}, {"unknown_option": 1},
     {"x" * 300: 1}, {"samples_format": {"deep": [[[]]]}}],
)  # fmt: skip
def test_options_that_would_change_anything_are_refused(server: Server, body: Any) -> None:
    headers = {**OPEN_WEBUI, "Content-Type": "application/json"}
    answer = httpx.post(f"{server.url}/sdapi/v1/options", content=json.dumps(body), headers=headers)
    assert answer.status_code == 422, answer.text
    assert "x" * 100 not in answer.text and "\n" not in answer.json()["detail"]


def test_keys_are_required_and_basic_carries_them(server: Server) -> None:
    wrong = [b"webui:wrong", KEY.encode(), f"{KEY}:webui".encode()]  # the key must be the password
    basics = [{"authorization": "Basic " + base64.b64encode(text).decode()} for text in wrong]
    for headers in [{}, {"authorization": "Basic !!notbase64"}, {"authorization": f"Token {KEY}"}, *basics]:
        assert get(server, "/sdapi/v1/options", headers).status_code == 401
        refused = post(server, "/sdapi/v1/txt2img", {"prompt": "x"}, headers)
        assert (
            refused.status_code == 401
            and "HTTP Basic with the key as the password" in refused.json()["detail"]
        )


def test_open_webuis_body_equals_score_for_the_same_seeds(server: Server) -> None:
    # Open WebUI's body, with the seed and cfg_scale its AUTOMATIC1111_PARAMS setting may add
    body = {"prompt": "a red fox", "batch_size": 2, "width": 128, "height": 128, "steps": 2,
            "negative_prompt": "blur", "seed": 5, "cfg_scale": 7.5}  # fmt: skip
    answer = post(server, "/sdapi/v1/txt2img", body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    info = json.loads(data["info"])
    assert info["all_seeds"] == [5, 6] and info["seed"] == 5 and info["sd_model_name"] == SERVED
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (128, 128, 2, 7.5)
    expected = score_images(server, 5, images=2, negative_prompt="blur")
    assert all(
        np.array_equal(decode_png(got), want) for got, want in zip(data["images"], expected, strict=True)
    )


def test_sillytaverns_body_equals_score_and_its_auth_is_never_echoed(server: Server) -> None:
    answer = httpx.post(
        f"{server.url}/sdapi/v1/txt2img",
        content=json.dumps(sillytavern_body()),
        headers=sillytavern_headers(),
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert KEY not in answer.text and "127.0.0.1:7860" not in answer.text
    data = answer.json()
    info = json.loads(data["info"])
    assert info["sampler_name"] == "Euler a" and info["all_seeds"] == [7] and info["prompt"] == "a red fox"
    [expected] = score_images(
        server, 7, negative_prompt="blur", scheduler="euler_ancestral", guidance_scale=7
    )
    assert np.array_equal(decode_png(data["images"][0]), expected)
    seed_random = post(server, "/sdapi/v1/txt2img", sillytavern_body(seed=-1, steps=1)).json()
    assert 0 <= json.loads(seed_random["info"])["seed"] < 2**32


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"enable_hr": True}, "enable_hr"),
        ({"restore_faces": True}, "restore_faces"),
        ({"tiling": 1}, "tiling"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, "CLIP_stop_at_last_layers"),
        ({"override_settings": {"sd_vae": "kl-f8.pt"}}, "sd_vae"),
        ({"sampler_name": "DPM++ 9M"}, "sampler_name"),
        ({"sampler_name": "PLMS", "scheduler": "Karras"}, "sampler_name"),
        ({"sampler_name": "euler ", "scheduler": "Polyexponential"}, "scheduler"),
        ({"styles": ["cinematic"]}, "styles"),
        ({"alwayson_scripts": {"ADetailer": {"args": [True, {"ad_model": "face_yolov8n.pt"}]}}}, "ADetailer"),
        ({"eta": 0}, "eta"),
        ({"subseed_strength": 0.5}, "subseed_strength"),
        ({"clip_skip": 13}, "clip_skip"),
        ({"s_noise": 0.5}, "s_noise"),
        ({"s_noise": "x", "sampler_name": "Euler"}, "s_noise"),  # used by no sampler here, yet a number
        ({"s_noise": True, "sampler_name": "Euler"}, "s_noise"),
        ({"override_settings": {"sd_model_checkpoint": 5}}, "sd_model_checkpoint"),
        ({"send_images": False}, "send_images"),
        ({"mystery_field": 1}, "mystery_field"),
        ({"seed": -2}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**63 - 1, "batch_size": 2}, "seed"),
        ({"batch_size": 3, "n_iter": 2}, "batch_size"),
        ({"width": 100}, "width"),
        ({"height": 4096}, "height"),
        ({"steps": 0}, "steps"),
        ({"steps": "20"}, "steps"),
        ({"cfg_scale": 31}, "cfg_scale"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x" * 5000}, "prompt"),
        ({"negative_prompt": "\ud800"}, "negative_prompt"),
    ],
)
def test_what_would_change_the_image_is_refused_by_name(
    server: Server, changes: dict[str, Any], named: str
) -> None:
    answer = httpx.post(
        f"{server.url}/sdapi/v1/txt2img", content=json.dumps(sillytavern_body(**changes)),
        headers=sillytavern_headers(), timeout=30,
    )  # fmt: skip
    assert answer.status_code == 422, answer.text
    error = answer.json()
    assert named in error["detail"] and error["error"] == "invalid_request" and "\n" not in error["detail"]


def test_a_checkpoint_not_served_is_404_naming_the_served_one(server: Server) -> None:
    body = sillytavern_body(override_settings={"sd_model_checkpoint": "sdxl.safetensors"})
    answer = httpx.post(
        f"{server.url}/sdapi/v1/txt2img", content=json.dumps(body), headers=sillytavern_headers(), timeout=30
    )
    assert answer.status_code == 404, answer.text
    error = answer.json()
    assert error["error"] == "model_not_found" and SERVED in error["detail"]
    assert "override_settings.sd_model_checkpoint" in error["detail"]


def test_not_json_and_metrics_route_label(server: Server) -> None:
    json_type = {**OPEN_WEBUI, "content-type": "application/json"}
    broken = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=b"{", headers=json_type)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["detail"]
    untyped = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=b"{}", headers=OPEN_WEBUI)
    assert untyped.status_code == 415 and "application/json" in untyped.json()["detail"]
    text = get(server, "/metrics", {}).text
    assert metric_value(text, "sd_requests_total", 'route="/sdapi/v1/txt2img",status="200"') >= 1
    assert metric_value(text, "sd_requests_total", 'route="/sdapi/v1/options",status="200"') >= 1


def _wait(condition: Any, what: str) -> Any:
    return until(condition, WAIT_S, f"{what}: it never happened")


def test_progress_shows_steps_and_a_png_preview_then_interrupt_answers_with_the_image_so_far(
    server: Server,
) -> None:
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        running: Future[httpx.Response] = pool.submit(post, server, "/sdapi/v1/txt2img", LONG, timeout=300)

        def previewed() -> dict[str, Any] | None:
            state = get(server, "/sdapi/v1/progress").json()
            return state if state["progress"] > 0 and state["current_image"] else None

        state = _wait(previewed, "a progress with a preview")
        assert state["state"]["sampling_steps"] == 150 and 0 < state["state"]["sampling_step"] < 150
        assert decode_png(state["current_image"]).shape == (32, 32, 3)
        assert state["eta_relative"] > 0 and "step" in state["textinfo"]
        # someone else's progress shows nothing, and their interrupt stops nothing
        assert get(server, "/sdapi/v1/progress", OTHER).json()["progress"] == 0
        assert post(server, "/sdapi/v1/interrupt", None, OTHER).status_code == 200

        def after() -> dict[str, Any] | None:
            now = get(server, "/sdapi/v1/progress").json()
            return now if now["state"]["sampling_step"] > state["state"]["sampling_step"] else None

        later = _wait(after, "a later step")
        assert later["progress"] > state["progress"]
        per_step = (time.monotonic() - started) / later["state"]["sampling_step"]
        interrupted = time.monotonic()
        assert post(server, "/sdapi/v1/interrupt", None).status_code == 200
        answer = running.result(timeout=WAIT_S)
    assert answer.status_code == 200, answer.text
    # within a few steps, where the more than 100 steps left would take 100 times as long
    assert time.monotonic() - interrupted < 5 * per_step + 2
    assert 150 - later["state"]["sampling_step"] > 100
    assert json.loads(answer.json()["info"])["all_seeds"] == [9]
    assert decode_png(answer.json()["images"][0]).shape == (256, 256, 3)
    assert get(server, "/sdapi/v1/progress").json()["progress"] == 0


def test_polling_in_a_tight_loop_buys_at_most_a_preview_a_second(server: Server) -> None:
    # Each preview is a decode in the engine thread every caller shares (a full one with
    # SD_PREVIEW_DECODER): a client polling without pause once had one made at every step.
    body = {**LONG, "width": 128, "height": 128, "steps": 80}
    seen: set[str] = set()
    with ThreadPoolExecutor(1) as pool, httpx.Client(headers=OPEN_WEBUI, timeout=30) as client:
        running: Future[httpx.Response] = pool.submit(post, server, "/sdapi/v1/txt2img", body, timeout=300)
        _wait(lambda: client.get(f"{server.url}/sdapi/v1/progress").json()["progress"] > 0, "the first step")
        started = time.monotonic()
        steps = []
        while not running.done():
            state = client.get(f"{server.url}/sdapi/v1/progress").json()
            if state["current_image"]:
                seen.add(state["current_image"])
            steps.append(state["state"]["sampling_step"])
        polled_s = time.monotonic() - started
    assert running.result().status_code == 200
    assert max(steps) - min(steps) > 3 * (polled_s + 1), "too few steps to tell"  # steps outran previews
    assert len(seen) <= polled_s / POLLED_PREVIEW_INTERVAL_S + 2, (len(seen), polled_s)


def test_cancel_by_request_id_answers_499_and_only_its_sender_can(server: Server) -> None:
    body = request_body(
        ["a long one"], seed=3, num_inference_steps=150, height=256, width=256, guidance_scale=1
    )
    headers = {"Authorization": f"Bearer {KEY}", "x-request-id": "cancel-me-1"}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{server.url}/score", json=body, headers=headers, timeout=300)
        _wait(
            lambda: metric_value(get(server, "/metrics", {}).text, "sd_running_images") == 1,
            "the image running",
        )
        for wrong in ("cancel-me-2", "x" * 200):
            assert post(server, f"/requests/{wrong}/cancel", None).status_code == 404
        assert post(server, "/requests/cancel-me-1/cancel", None, OTHER).status_code == 404
        done = post(server, "/requests/cancel-me-1/cancel", None)
        assert done.status_code == 200 and done.json() == {"request_id": "cancel-me-1", "cancelled": 1}
        answer = running.result(timeout=WAIT_S)
    assert answer.status_code == 499
    assert answer.json()["error"]["code"] == "cancelled"
    assert post(server, "/requests/cancel-me-1/cancel", None).status_code == 404
    assert post(server, "/requests/cancel-me-1/cancel", None, {}).status_code == 401


def test_a_body_without_steps_gets_the_servers_default_within_its_limit() -> None:
    from schemas.a1111 import Txt2ImgRequest
    from schemas.score import ScoreLimits

    assert Txt2ImgRequest.model_validate({}).steps == 50
    assert Txt2ImgRequest.model_validate({}, context={"limits": ScoreLimits(max_steps=4)}).steps == 4
