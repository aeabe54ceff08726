"""How SillyTavern and Open WebUI list and pick a Stable Diffusion model, replayed from their source
against a real `sd-endpoint serve` process with a model library (SD_MODEL random:tiny, SD_MODELS
"two" and "paint": tiny random models of their own weights) and two keys: the model a client picks
is the one that draws (its image equals /score's naming ``parameters.model`` "two", pixel for pixel,
and differs from the default model's), and one key's pick leaves the other key's alone.

Sources (read with git from the projects' repositories; the call sequences below are theirs, each
replay cites the function it follows):
- SillyTavern 1.12.6 (package.json "version"; commit ba6f7b7a98cf), which relays each call of its
  browser extension public/scripts/extensions/stable-diffusion/index.js through its own server,
  src/endpoints/stable-diffusion.js (the /api/sd/* routes), with the header
  getBasicAuthHeader(auth) of src/util.js: "Basic " + base64 of its "user:password" setting.
- Open WebUI (commit 02530d501461), backend/open_webui/routers/images.py: get_models(),
  set_image_model(), get_image_model(), image_generations(); its A1111 header is
  get_automatic1111_api_auth(): "Basic " + base64 of AUTOMATIC1111_API_AUTH ("user:password").
  Its defaults (backend/open_webui/config.py): IMAGE_SIZE "512x512", IMAGE_STEPS 50,
  IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN "^gpt-image" (other models get response_format b64_json).

Only what each client lets its user set is changed from its defaults: sizes, steps and seeds (its
settings), so that the CPU draws quickly; an image a client asked for without a seed is redrawn
with the seed the server reports.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers import until
from tests.helpers.processes import Server, serving
from tests.helpers.servers import decode_png

pytestmark = pytest.mark.slow
K1, K2 = "models-key-1", "models-key-2"
LIBRARY = "two=random:tiny:1,paint=random:tiny-inpaint:2"
PICKED = "two"
TIMEOUT_S = 300


def basic(user: str, key: str) -> dict[str, str]:
    """SillyTavern's getBasicAuthHeader(auth) (src/util.js) and Open WebUI's
    get_automatic1111_api_auth() (routers/images.py): "Basic " + base64 of "user:password"."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("models-clients") / "server.log"
    with serving(log_path, SD_MODEL="random:tiny", SD_MODELS=LIBRARY, SD_API_KEYS=f"{K1},{K2}") as running:
        # A1111 titles carry the hash once it is computed ("two [0123456789]"); a client lists once
        # and sends back what it listed, so the replays start from the titles' final form.
        def hashed() -> bool:
            answer = httpx.get(f"{running.url}/sdapi/v1/sd-models", headers=bearer(K1), timeout=30)
            return answer.status_code == 200 and all(entry.get("hash") for entry in answer.json())

        # titles without hashes ("two") are A1111's form too; the tests read what is listed
        with contextlib.suppress(AssertionError):
            until(hashed, 60, "every library model hashed")
        yield running


def listed(server: Server, headers: dict[str, str]) -> list[dict[str, Any]]:
    answer = httpx.get(f"{server.url}/sdapi/v1/sd-models", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    models: list[dict[str, Any]] = answer.json()
    return models


def title_of(server: Server, model_name: str) -> str:
    models = listed(server, bearer(K1))
    titles = [m["title"] for m in models if m["model_name"] == model_name]
    assert len(titles) == 1, f"GET /sdapi/v1/sd-models lists no one {model_name!r}: {models}"
    return str(titles[0])


def default_model(server: Server) -> dict[str, Any]:
    """The default model's entry of GET /sdapi/v1/sd-models (the one not from SD_MODELS)."""
    others = [m for m in listed(server, bearer(K1)) if m["model_name"] not in ("two", "paint")]
    assert len(others) == 1, others
    return others[0]


def score(server: Server, prompt: str, model: str, **parameters: Any) -> np.ndarray:
    """What /score draws for one prompt with these parameters, naming ``model`` (``parameters.model``:
    named always, so that no per-key default could stand in for it)."""
    body = {
        "input_data": {"columns": ["prompt"], "data": [prompt], "parameters": {**parameters, "model": model}}
    }
    answer = httpx.post(f"{server.url}/score", json=body, headers=bearer(K1), timeout=TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    [record] = answer.json()
    return decode_png(record["generated_image"])


def assert_drawn_by_two_not_default(server: Server, png: np.ndarray, prompt: str, **parameters: Any) -> None:
    expected = score(server, prompt, PICKED, **parameters)
    assert png.shape == expected.shape
    assert np.array_equal(png, expected), "the client's image is not what the picked model draws"
    default = default_model(server)["model_name"]
    assert not np.array_equal(png, score(server, prompt, default, **parameters)), "the default model drew it"


# ----------------------------------------------------------------------------- SillyTavern
# SillyTavern 1.12.6 (ba6f7b7a), public/scripts/extensions/stable-diffusion/index.js
# getSdRequestBody(): {url: auto_url, auth: auto_auth}, sent with every /api/sd/* call.
ST_RELAY = {"url": "http://127.0.0.1:7860", "auth": f"st-user:{K1}"}


def st_get_model(server: Server) -> str:
    """index.js getAutoRemoteModel() -> stable-diffusion.js POST /api/sd/get-model:
    GET /sdapi/v1/options (Authorization: Basic), answered with data['sd_model_checkpoint']."""
    answer = httpx.get(f"{server.url}/sdapi/v1/options", headers=basic("st-user", K1), timeout=30)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["sd_model_checkpoint"])


def st_models(server: Server) -> list[dict[str, str]]:
    """index.js loadAutoModels() -> POST /api/sd/models: GET /sdapi/v1/sd-models (Authorization:
    Basic; must be ok), mapped to options {value: x.title, text: x.title}."""
    return [{"value": m["title"], "text": m["title"]} for m in listed(server, basic("st-user", K1))]


def st_set_model(server: Server, model: str) -> httpx.Response:
    """index.js onModelChange() -> updateAutoRemoteModel() -> POST /api/sd/set-model: POST
    /sdapi/v1/options {"sd_model_checkpoint": model} (Content-Type: application/json, Authorization:
    Basic; not ok -> "SD WebUI returned an error."), then up to 10 polls of GET /sdapi/v1/progress
    (every 2 s) until progress == 0.0 and state.job_count === 0."""
    headers = {"Content-Type": "application/json", **basic("st-user", K1)}
    answer = httpx.post(
        f"{server.url}/sdapi/v1/options",
        content=json.dumps({"sd_model_checkpoint": model}),
        headers=headers,
        timeout=TIMEOUT_S,
    )
    if not answer.is_success:
        return answer
    for _ in range(10):
        progress = httpx.get(f"{server.url}/sdapi/v1/progress", headers=basic("st-user", K1), timeout=30)
        assert progress.status_code == 200, progress.text
        state = progress.json()
        if state["progress"] == 0.0 and state["state"]["job_count"] == 0:
            break
    else:
        raise AssertionError(f"SillyTavern would still be waiting for the model to load: {state}")
    return answer


def st_generate(server: Server, prompt: str, negative: str, **settings: Any) -> dict[str, Any]:
    """index.js generateAutoImage() -> POST /api/sd/generate, which posts its whole request body
    (url and auth included) to /sdapi/v1/txt2img (Content-Type: application/json, Authorization:
    Basic). extension_settings.sd defaults: sampler "DDIM", scheduler "normal", steps 20, scale 7,
    512x512, clip_skip 1, seed -1 (sent as undefined: left out), restore_faces/enable_hr false,
    hr_upscaler "Latent", hr_scale 2.0, denoising_strength 0.7, hr_second_pass_steps 0; sd_vae
    undefined (no VAE picked) is left out of override_settings by JSON.stringify."""
    defaults = {"sampler": "DDIM", "scheduler": "normal", "steps": 20, "scale": 7, "width": 512,
                "height": 512, "seed": -1}  # fmt: skip
    sd: dict[str, Any] = defaults | settings
    body = {
        **ST_RELAY, "prompt": prompt, "negative_prompt": negative, "sampler_name": sd["sampler"],
        "scheduler": sd["scheduler"], "steps": sd["steps"], "cfg_scale": sd["scale"], "width": sd["width"],
        "height": sd["height"], "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent",
        "hr_scale": 2.0, "denoising_strength": 0.7, "hr_second_pass_steps": 0,
        **({"seed": sd["seed"]} if sd["seed"] >= 0 else {}),
        "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
        "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
        "do_not_save_samples": False,
    }  # fmt: skip
    headers = {"Content-Type": "application/json", **basic("st-user", K1)}
    answer = httpx.post(
        f"{server.url}/sdapi/v1/txt2img", content=json.dumps(body), headers=headers, timeout=TIMEOUT_S
    )
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


def test_sillytavern_lists_picks_and_draws_with_the_picked_model(server: Server) -> None:
    # loadAutoModels(): the current model first, then the list; the dropdown selects the option
    # whose value === the current model, so the current model must be one of the listed titles.
    current = st_get_model(server)
    models = st_models(server)
    values = [option["value"] for option in models]
    assert current in values, (current, values)
    two = title_of(server, PICKED)
    assert two in values and two.split(" [")[0] == PICKED  # "two" or "two [hash10]": A1111's title
    # The user picks "two" in the dropdown: onModelChange() sends the option's value, the title.
    answer = st_set_model(server, two)
    assert answer.status_code == 200, answer.text
    assert st_get_model(server) == two  # reloaded, the dropdown shows "two" selected
    # The user's settings: a small image, few steps, a fixed seed (prompt and negative as composed).
    data = st_generate(server, "a red fox", "blurry, lowres", steps=3, width=128, height=128, seed=11)
    info = json.loads(data["info"])
    assert info["sd_model_name"] == PICKED, info
    png = decode_png(data["images"][0])
    assert_drawn_by_two_not_default(
        server, png, "a red fox", negative_prompt="blurry, lowres", scheduler="ddim",
        num_inference_steps=3, guidance_scale=7, width=128, height=128, seed=11,
    )  # fmt: skip


def test_sillytavern_picking_a_model_not_served_is_an_error_it_shows(server: Server) -> None:
    before = st_get_model(server)
    answer = st_set_model(server, "sdxl_base_1.0.safetensors [31e35c80fc]")
    assert answer.status_code == 404, answer.text  # SillyTavern: "SD WebUI returned an error."
    assert "two" in answer.text  # what is served, for the log it prints
    assert st_get_model(server) == before


# ----------------------------------------------------------------------------- Open WebUI
# Open WebUI (02530d50), backend/open_webui/routers/images.py, engine "automatic1111".
def owui_headers(key: str) -> dict[str, str]:
    """headers={'authorization': get_automatic1111_api_auth(image_config)} (aiohttp adds the JSON type)."""
    return {k.lower(): v for k, v in basic("webui", key).items()}


def owui_get_models(server: Server, key: str) -> list[dict[str, str]]:
    """get_models(): GET {AUTOMATIC1111_BASE_URL}/sdapi/v1/sd-models -> [{id: title, name: model_name}]."""
    return [{"id": m["title"], "name": m["model_name"]} for m in listed(server, owui_headers(key))]


def owui_get_image_model(server: Server, key: str) -> str:
    """get_image_model(): GET /sdapi/v1/options -> options['sd_model_checkpoint']."""
    answer = httpx.get(f"{server.url}/sdapi/v1/options", headers=owui_headers(key), timeout=30)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["sd_model_checkpoint"])


def owui_set_image_model(server: Server, key: str, model: str) -> httpx.Response | None:
    """set_image_model() (from update_config, the admin's save): GET /sdapi/v1/options; if model !=
    options['sd_model_checkpoint'], POST the whole options back with it changed (raise_for_status;
    Open WebUI only logs a failure at debug level, so it is asserted here). None: nothing posted."""
    answer = httpx.get(f"{server.url}/sdapi/v1/options", headers=owui_headers(key), timeout=30)
    assert answer.status_code == 200, answer.text
    options = answer.json()
    if model == options["sd_model_checkpoint"]:
        return None
    options["sd_model_checkpoint"] = model
    return httpx.post(
        f"{server.url}/sdapi/v1/options", json=options, headers=owui_headers(key), timeout=TIMEOUT_S
    )


def owui_a1111_generate(server: Server, key: str, prompt: str, size: str, steps: int) -> dict[str, Any]:
    """image_generations(), engine "automatic1111": get_image_model() first, then POST
    /sdapi/v1/txt2img {prompt, batch_size: n (1), width, height, steps: IMAGE_STEPS} (no
    negative_prompt: the form has none; AUTOMATIC1111_PARAMS unset), reading res['images'] and
    res['info']."""
    owui_get_image_model(server, key)
    width, height = map(int, size.split("x"))
    data = {"prompt": prompt, "batch_size": 1, "width": width, "height": height, "steps": steps}
    answer = httpx.post(
        f"{server.url}/sdapi/v1/txt2img", json=data, headers=owui_headers(key), timeout=TIMEOUT_S
    )
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_open_webui_automatic1111_lists_picks_and_draws_with_the_picked_model(server: Server) -> None:
    models = owui_get_models(server, K2)
    [two] = [model["id"] for model in models if model["name"] == PICKED]  # the admin picks by name
    assert two == title_of(server, PICKED)
    answer = owui_set_image_model(server, K2, two)
    if answer is not None:
        assert answer.status_code == 200, answer.text
    assert owui_get_image_model(server, K2) == two  # the admin page shows the saved model
    # Settings: IMAGE_SIZE "128x128", IMAGE_STEPS 3 (the admin's); no seed: A1111 picks one.
    result = owui_a1111_generate(server, K2, "a lighthouse at dusk", "128x128", 3)
    info = json.loads(result["info"])
    assert info["sd_model_name"] == PICKED, info
    [image] = result["images"]
    assert_drawn_by_two_not_default(
        server, decode_png(image), "a lighthouse at dusk",
        num_inference_steps=3, guidance_scale=7, width=128, height=128, seed=info["seed"],
    )  # fmt: skip
    # Saving the settings again (same model) posts nothing: the server reports what was set.
    assert owui_set_image_model(server, K2, two) is None


def owui_openai_generate(server: Server, key: str, model: str, prompt: str, **config: Any) -> httpx.Response:
    """image_generations(), engine "openai": POST {IMAGES_OPENAI_API_BASE_URL}/images/generations
    (Authorization: Bearer IMAGES_OPENAI_API_KEY, Content-Type: application/json) with {model:
    IMAGE_GENERATION_MODEL (default "dall-e-2"), prompt, n: 1, size: IMAGE_SIZE, response_format:
    "b64_json" (the model does not match ^gpt-image), **IMAGES_OPENAI_API_PARAMS}; reads
    res['data'][i]['b64_json']."""
    data = {
        "model": model, "prompt": prompt, "n": 1, "size": config.get("size", "512x512"),
        "response_format": "b64_json", **config.get("params", {}),
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}/v1/images/generations", json=data, headers=headers, timeout=TIMEOUT_S)


def test_open_webui_openai_engine_draws_with_the_model_it_names(server: Server) -> None:
    # Open WebUI's get_models() for "openai" lists DALL-E and GPT-IMAGE without asking the server;
    # the admin types the model's id into IMAGE_GENERATION_MODEL, the id GET /v1/models lists.
    ids = [entry["id"] for entry in httpx.get(f"{server.url}/v1/models", headers=bearer(K1)).json()["data"]]
    assert PICKED in ids and "paint" in ids, ids
    # IMAGE_SIZE "128x128"; IMAGES_OPENAI_API_PARAMS {"num_inference_steps": 3}, the admin's JSON.
    answer = owui_openai_generate(
        server, K1, PICKED, "a lighthouse at dusk", size="128x128", params={"num_inference_steps": 3}
    )
    assert answer.status_code == 200, answer.text
    [entry] = answer.json()["data"]
    assert_drawn_by_two_not_default(
        server, decode_png(entry["b64_json"]), "a lighthouse at dusk",
        num_inference_steps=3, width=128, height=128, seed=entry["seed"],
    )  # fmt: skip


def test_open_webui_openai_engine_on_its_default_model_or_a_typo(server: Server) -> None:
    # An empty IMAGE_GENERATION_MODEL: get_image_model() sends "dall-e-2", one of OpenAI's ids that
    # name the default model here (service/web/openai.py OPENAI_IDS, SD_SERVED_MODEL_NAMES unset).
    answer = owui_openai_generate(
        server, K1, "dall-e-2", "a lighthouse at dusk", size="128x128", params={"num_inference_steps": 2}
    )
    assert answer.status_code == 200, answer.text
    [entry] = answer.json()["data"]
    expected = score(
        server, "a lighthouse at dusk", default_model(server)["model_name"],
        num_inference_steps=2, width=128, height=128, seed=entry["seed"],
    )  # fmt: skip
    assert np.array_equal(decode_png(entry["b64_json"]), expected)
    # A model typed wrong: 404, and Open WebUI shows aiohttp's message (the reason phrase).
    answer = owui_openai_generate(server, K1, "tow", "x", size="128x128")
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert error["code"] == "model_not_found" and "'two'" in error["message"], error
    assert "'two'" in answer.reason_phrase, answer.reason_phrase


# ----------------------------------------------------------------------------- one key, one pick
def test_one_keys_pick_leaves_the_other_keys_alone(server: Server) -> None:
    """SillyTavern on K1 and Open WebUI on K2 against one server: each sets its checkpoint its own
    way; each reads back its own, and each draws with its own."""
    default, two = default_model(server), title_of(server, PICKED)
    settings = {"steps": 2, "width": 128, "height": 128, "seed": 21}  # SillyTavern's
    # K2 (Open WebUI) on the default model, then K1 (SillyTavern) picks "two".
    posted = owui_set_image_model(server, K2, default["title"])
    assert posted is None or posted.status_code == 200, posted and posted.text
    assert st_set_model(server, two).status_code == 200
    assert (st_get_model(server), owui_get_image_model(server, K2)) == (two, default["title"])
    st_image = decode_png(st_generate(server, "a heron", "", **settings)["images"][0])
    parameters = {"num_inference_steps": 2, "guidance_scale": 7, "width": 128, "height": 128}
    assert np.array_equal(st_image, score(server, "a heron", PICKED, scheduler="ddim", seed=21, **parameters))
    result = owui_a1111_generate(server, K2, "a heron", "128x128", 2)
    seed = json.loads(result["info"])["seed"]
    assert np.array_equal(
        decode_png(result["images"][0]),
        score(server, "a heron", default["model_name"], seed=seed, **parameters),
    )
    # Now the other way round: K2 picks "two", K1 goes back to the default; neither moves the other.
    posted = owui_set_image_model(server, K2, two)
    assert posted is not None and posted.status_code == 200, posted and posted.text
    assert st_set_model(server, default["title"]).status_code == 200
    assert (st_get_model(server), owui_get_image_model(server, K2)) == (default["title"], two)
