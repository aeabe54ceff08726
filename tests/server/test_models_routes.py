"""Several models behind one endpoint (SD_MODELS), through every way in, against a real `sd-endpoint
serve` process: each route picks each model by name (the same image whichever route names it, and
not the default model's), an unknown name is each protocol's 404, each API key keeps its own
AUTOMATIC1111 checkpoint, and the lists (/v1/models, /sdapi/v1/sd-models with their hashes, /info)
show the models. The real clients drive it: `openai`, `webuiapi`, `huggingface_hub`. One more server
serves a library folder as users bring it: a folder diffusers saved, a single .safetensors file and
an inpainting folder."""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from pydantic import BaseModel

from schemas.a1111 import Txt2ImgRequest
from schemas.openai import ImageGenerationRequest
from schemas.score import ScoreLimits, ScoreRequest
from tests.helpers.processes import REPO, SERVE, Server, clean_env, serving
from tests.helpers.servers import decode_png
from tests.helpers.weights import save_library

pytestmark = pytest.mark.slow
KEY, OTHER_KEY = "k1", "k2"
LIBRARY = "two=random:tiny:1,paint=random:tiny-inpaint:2"
MODELS = ("two", "paint")
SEED, STEPS, GUIDANCE = 3, 2, 7.5  # every route: the same seed, steps, guidance, sampler and size
HASH_WAIT_S = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("models") / "server.log"
    # Every model stays on the device (SD_MAX_RESIDENT_MODELS): what is tested here is the routes.
    keys = f"{KEY},{OTHER_KEY}"
    with serving(log, SD_MODELS=LIBRARY, SD_API_KEYS=keys, SD_MAX_RESIDENT_MODELS="3") as running:
        yield running


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def score(server: Server, model: str | None = None, key: str = KEY) -> httpx.Response:
    parameters: dict[str, Any] = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "seed": SEED}
    parameters |= {"scheduler": "euler"} | ({"model": model} if model is not None else {})
    body = {"input_data": {"columns": ["prompt"], "data": ["a red fox"], "parameters": parameters}}
    return httpx.post(f"{server.url}/score", json=body, headers=bearer(key), timeout=120)


def score_image(server: Server, model: str | None = None) -> np.ndarray:
    answer = score(server, model)
    assert answer.status_code == 200, answer.text
    return decode_png(answer.json()[0]["generated_image"])


def openai_image(server: Server, model: str) -> np.ndarray:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    extra = {"seed": SEED, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "scheduler": "euler"}
    answer = client.images.generate(
        prompt="a red fox", model=model, response_format="b64_json", extra_body=extra
    )
    assert answer.data is not None
    return pixels(base64.b64decode(answer.data[0].b64_json or ""))


def webui(server: Server, key: str = KEY) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler", steps=STEPS)
    api.set_auth("user", key)
    return api


def a1111_image(server: Server, key: str = KEY, **body: Any) -> tuple[np.ndarray, dict[str, Any]]:
    result = webui(server, key).txt2img(
        prompt="a red fox", seed=SEED, cfg_scale=GUIDANCE, width=128, height=128, **body
    )
    return np.asarray(result.image.convert("RGB")), result.info


def huggingface_image(server: Server, model: str) -> np.ndarray:
    client = InferenceClient(model=f"{server.url}/models/{model}", api_key=KEY)
    image = client.text_to_image(
        "a red fox",
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        seed=SEED,
        scheduler="EulerDiscreteScheduler",
    )
    return np.asarray(image.convert("RGB"))


def client_image(server: Server, model: str, out: Path) -> np.ndarray:
    """``sd-endpoint generate --model``: the command-line client of /score."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "generate", "a red fox", "--url", server.url, "--key", KEY,
         "--model", model, "--seed", str(SEED), "--steps", str(STEPS), "--guidance", str(GUIDANCE),
         "--scheduler", "euler", "--out", str(out)],
        capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return pixels(Path(done.stdout.split("\tnsfw=")[0]).read_bytes())


def titles(server: Server) -> dict[str, dict[str, Any]]:
    """/sdapi/v1/sd-models by model name, once every checkpoint has its hash."""
    deadline = time.monotonic() + HASH_WAIT_S
    while True:
        listed = httpx.get(f"{server.url}/sdapi/v1/sd-models", headers=bearer(), timeout=30).json()
        if all(entry["sha256"] for entry in listed) or time.monotonic() > deadline:
            return {entry["model_name"]: entry for entry in listed}
        time.sleep(0.1)


@pytest.mark.parametrize("model", MODELS)
def test_every_route_draws_with_the_model_it_names(server: Server, model: str, tmp_path: Path) -> None:
    default = score_image(server)
    mine = score_image(server, model)
    assert not np.array_equal(mine, default), "the named model drew the default model's image"
    assert np.array_equal(openai_image(server, model), mine)
    assert np.array_equal(huggingface_image(server, model), mine)
    title = titles(server)[model]["title"]
    for named in (model, title, f"{model}.safetensors"):  # a name, A1111's title, a file's name
        image, info = a1111_image(server, override_settings={"sd_model_checkpoint": named})
        assert np.array_equal(image, mine), named
        assert info["sd_model_name"] == model
    assert np.array_equal(client_image(server, model, tmp_path), mine)


def test_openais_ids_and_the_default_models_name_draw_the_default(server: Server) -> None:
    default = score_image(server)
    assert np.array_equal(openai_image(server, "dall-e-3"), default)
    assert np.array_equal(openai_image(server, "random:tiny"), default)
    assert np.array_equal(score_image(server, "random:tiny"), default)


def test_an_unknown_model_is_each_protocols_404(server: Server) -> None:
    answer = score(server, "sdxl")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    assert "'two'" in answer.json()["error"]["message"]  # it names the models there are
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        client.images.generate(prompt="x", model="sdxl", extra_body={"num_inference_steps": 1})
    assert raised.value.body["code"] == "model_not_found" and raised.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("sdxl")
    assert client.models.retrieve("paint").id == "paint"
    body = {"prompt": "x", "steps": 1, "override_settings": {"sd_model_checkpoint": "sdxl [0123456789]"}}
    a1111 = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=bearer(), timeout=60)
    assert a1111.status_code == 404 and "two" in a1111.json()["detail"]
    # webuiapi returns the body of POST /options as is: A1111's detail, naming the models there are
    refused = webui(server).set_options({"sd_model_checkpoint": "sdxl"})
    assert refused["error"] == "model_not_found" and "'paint'" in refused["detail"]
    options = httpx.post(
        f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl"}, headers=bearer(), timeout=30
    )
    assert options.status_code == 404 and webui(server).get_options()["sd_model_checkpoint"].startswith(
        "random:tiny"
    )
    with pytest.raises(HfHubHTTPError) as hf:
        InferenceClient(model=f"{server.url}/models/sdxl", api_key=KEY).text_to_image(
            "x", num_inference_steps=1
        )
    assert hf.value.response is not None and hf.value.response.status_code == 404
    assert hf.value.response.json()["error_type"] == "model_not_found"
    hf_path = httpx.post(f"{server.url}/models/org/sdxl", json={"inputs": "x"}, headers=bearer(), timeout=30)
    assert hf_path.status_code == 404 and set(hf_path.json()) == {"error", "error_type"}


def test_each_key_keeps_its_own_a1111_checkpoint(server: Server) -> None:
    """Two callers choose at once (POST /sdapi/v1/options), then draw at once: each with its own."""
    listed = titles(server)
    expected = {KEY: score_image(server, "two"), OTHER_KEY: score_image(server, "paint")}
    try:
        with ThreadPoolExecutor(2) as pool:
            chose = [
                pool.submit(webui(server, KEY).util_set_model, "two"),
                pool.submit(webui(server, OTHER_KEY).set_options, {"sd_model_checkpoint": "paint"}),
            ]
            [each.result() for each in chose]
            drawn = {key: pool.submit(a1111_image, server, key) for key in (KEY, OTHER_KEY)}
            for key, future in drawn.items():
                image, info = future.result()
                assert np.array_equal(image, expected[key]), key
                assert info["sd_model_name"] == ("two" if key == KEY else "paint")
        assert webui(server, KEY).util_get_current_model() == listed["two"]["title"]
        options = webui(server, OTHER_KEY).get_options()
        assert options["sd_model_checkpoint"] == listed["paint"]["title"]
        assert options["sd_checkpoint_hash"] == listed["paint"]["sha256"]
        # A request's own checkpoint wins over the caller's; the other routes never read it.
        image, _ = a1111_image(server, KEY, override_settings={"sd_model_checkpoint": "paint"})
        assert np.array_equal(image, expected[OTHER_KEY])
        assert not np.array_equal(score_image(server), expected[KEY])
    finally:  # back to the default for the other tests
        for key in (KEY, OTHER_KEY):
            webui(server, key).set_options({"sd_model_checkpoint": "random:tiny"})
    image, info = a1111_image(server, KEY)
    assert np.array_equal(image, score_image(server)) and info["sd_model_name"] == "random:tiny"


def test_the_lists_show_every_model(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [model.id for model in client.models.list()] == ["random:tiny", "two", "paint"]
    listed = titles(server)
    assert list(listed) == ["random:tiny", "two", "paint"]
    for name, entry in listed.items():
        spec = {"random:tiny": "random:tiny", "two": "random:tiny:1", "paint": "random:tiny-inpaint:2"}[name]
        assert entry["sha256"] == hashlib.sha256(spec.encode()).hexdigest()  # a random model: its spec's
        assert entry["hash"] == entry["sha256"][:10] and entry["title"] == f"{name} [{entry['hash']}]"
        assert entry["filename"] == name and entry["config"] is None
    assert webui(server).util_get_model_names() == sorted(entry["title"] for entry in listed.values())
    info = httpx.get(f"{server.url}/info", headers=bearer(), timeout=30).json()
    assert info["name"] == "random:tiny"
    assert [(m["name"], m["architecture"], m["inpainting"], m["default"]) for m in info["models"]] == [
        ("random:tiny", "tiny", False, True),
        ("two", "tiny", False, False),
        ("paint", "tiny-inpaint", True, False),
    ]
    assert all((m["native_height"], m["native_width"]) == (128, 128) for m in info["models"])
    assert httpx.post(f"{server.url}/sdapi/v1/refresh-checkpoints", headers=bearer()).status_code == 200


def test_a_model_name_takes_the_same_rules_on_every_way_in() -> None:
    limits = {"limits": ScoreLimits()}

    def ways(value: Any) -> list[bool]:
        bodies: list[tuple[type[BaseModel], dict[str, Any]]] = [
            (
                ScoreRequest,
                {"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {"model": value}}},
            ),
            (ImageGenerationRequest, {"prompt": "x", "model": value}),
            (Txt2ImgRequest, {"override_settings": {"sd_model_checkpoint": value}}),
        ]
        answers = []
        for schema, body in bodies:
            try:
                schema.model_validate(body, context=limits)
                answers.append(True)
            except ValueError:
                answers.append(False)
        return answers

    for good in ["two", "two [0123456789]", "x" * 200]:
        assert ways(good) == [True] * 3, good
    for value in ["x" * 201, "a\nb", "tab\there", "\x00", "\ud800", 5, ["two"]]:
        assert ways(value) == [False] * 3, value


# ------------------------------------------------------------------ a library folder as users bring it
@pytest.fixture(scope="module")
def folder_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("library")
    save_library(root, tmp_path_factory.mktemp("source"))
    log = tmp_path_factory.mktemp("folder") / "server.log"
    with serving(log, SD_MODELS=str(root), SD_API_KEYS=KEY, SD_MAX_RESIDENT_MODELS="4") as running:
        yield running, root


def test_a_library_folder_serves_its_folder_file_and_inpainting_model(
    folder_server: tuple[Server, Path],
) -> None:
    server, root = folder_server
    listed = titles(server)
    assert list(listed) == ["random:tiny", "base", "paint", "single"]
    single = listed["single"]
    assert single["filename"] == "single.safetensors" and str(root) not in str(listed)
    assert single["sha256"] == hashlib.sha256((root / "single.safetensors").read_bytes()).hexdigest()
    assert listed["base"]["sha256"] and listed["base"]["filename"] == "base"
    info = httpx.get(f"{server.url}/info", headers=bearer(), timeout=30).json()
    assert {m["name"]: m["inpainting"] for m in info["models"]} == {
        "random:tiny": False, "base": False, "paint": True, "single": False,
    }  # fmt: skip
    images = {name: score_image(server, name) for name in ("base", "single", "paint")}
    default = score_image(server)
    for name, image in images.items():
        assert not np.array_equal(image, default), name
        assert np.array_equal(openai_image(server, name), image), name
        drawn, _ = a1111_image(server, override_settings={"sd_model_checkpoint": listed[name]["title"]})
        assert np.array_equal(drawn, image), name
    assert not np.array_equal(images["base"], images["single"])  # two models, two seeds


def test_a_batch_job_draws_with_the_library_model_it_names(server: Server, tmp_path: Path) -> None:
    """`sd-endpoint batch --model two` on a server's library: the image /score draws with "two"."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.jsonl").write_text('{"prompt": "a red fox", "seed": 3}\n')
    flags = ["--steps", str(STEPS), "--guidance", str(GUIDANCE), "--scheduler", "euler"]
    for model, out in (("two", "named"), ("random:tiny:1", "spec")):  # a name, then a spec as before
        command = [*SERVE[:-1], "batch", "--input", str(tmp_path / "in"), "--output", str(tmp_path / out)]
        done = subprocess.run(
            [*command, "--model", model, *flags],
            env=clean_env(SD_MODELS=LIBRARY, SD_DATA_DIR=str(tmp_path / "data")),
            capture_output=True,
            timeout=300,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    named = pixels((tmp_path / "named" / "images" / "rows" / "0.png").read_bytes())
    assert np.array_equal(named, score_image(server, "two"))
    assert np.array_equal(named, pixels((tmp_path / "spec" / "images" / "rows" / "0.png").read_bytes()))
