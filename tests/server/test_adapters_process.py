"""LoRA adapters in a real `sd-endpoint serve` process (SD_ADAPTERS, random:tiny): listed in /info
and /v1/models, broken ones named in the log and refused with 422, and images with different
adapters, sent at once on /score and OpenAI's route, running side by side in the step loop, each
equal to diffusers' load_lora_weights + set_adapters. With room for one adapter on the device
(SD_MAX_ADAPTERS=1), images asking for different adapters, one after the other and all at once,
still equal diffusers' while the adapters go on and off the device; a set larger than the cap is
refused with 422; metrics count images and step time by adapter set, labels only from SD_ADAPTERS."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model.types import MAX_ADAPTER_SCALE, MAX_ADAPTERS_PER_ITEM, GenerationItem, adapter_set
from schemas.score import MAX_ADAPTER_SCALE as WIRE_MAX_SCALE
from schemas.score import MAX_ADAPTERS
from tests.helpers import loras
from tests.helpers.processes import REPO, Server, clean_env, serving
from tests.helpers.servers import decode_png, metric_value

SIZE = 128
TOLERANCE = 2 / 255
STEPS = 4
PROMPT = "a lighthouse"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return loras.adapter_folder(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def server(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("adapters-server") / "server.log"
    with serving(log, SD_ADAPTERS=str(folder), SD_MAX_BATCH_SIZE="8") as running:
        yield running


@pytest.fixture(scope="module")
def one_place(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Room for one adapter on the device (SD_MAX_ADAPTERS=1)."""
    log = tmp_path_factory.mktemp("adapter-memory") / "server.log"
    with serving(log, SD_ADAPTERS=str(folder), SD_MAX_ADAPTERS="1", SD_MAX_BATCH_SIZE="8") as running:
        yield running


def score(prompt: str, seed: int, steps: int, adapters: dict[str, float] | None) -> dict[str, Any]:
    parameters: dict[str, Any] = {"num_inference_steps": steps, "seed": seed}
    if adapters is not None:
        parameters["adapters"] = adapters
    return {"input_data": {"columns": ["prompt"], "data": [prompt], "parameters": parameters}}


def test_the_bounds_of_the_wire_and_the_engine_agree() -> None:
    assert (MAX_ADAPTERS, WIRE_MAX_SCALE) == (MAX_ADAPTERS_PER_ITEM, MAX_ADAPTER_SCALE)


def test_adapters_are_listed_and_broken_ones_named_once_in_the_log(server: Server) -> None:
    assert httpx.get(f"{server.url}/info").json()["adapters"] == ["kohya", "style", "unet-only"]
    ids = [entry["id"] for entry in httpx.get(f"{server.url}/v1/models").json()["data"]]
    assert ids == ["random:tiny", "kohya", "style", "unet-only"]
    assert httpx.get(f"{server.url}/v1/models/style").status_code == 200
    log = server.log_path.read_text()
    for name in ("wrong-shape", "foreign", "garbage"):
        lines = [line for line in log.splitlines() if f"adapter {name} left out" in line]
        assert len(lines) == 1, f"{name}: {lines}"


def test_images_with_different_adapters_run_side_by_side_and_equal_diffusers(
    server: Server, folder: Path
) -> None:
    requests = [  # (adapters, seed, steps): the long first one runs while the others join it
        ({"style": 0.8, "kohya": 1.0}, 31, 24),
        (None, 32, 6),
        ({"kohya": -0.5}, 33, 6),
        ({"unet-only": 1.5, "style": 0.3}, 34, 6),
    ]
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        url = f"{server.url}/score"
        first = pool.submit(httpx.post, url, json=score("a lighthouse", 31, 24, requests[0][0]), timeout=300)
        deadline = time.monotonic() + 60
        while metric_value(httpx.get(f"{server.url}/metrics").text, "sd_running_images") < 1:
            assert time.monotonic() < deadline, "the first image never started"
            time.sleep(0.01)
        others = [
            pool.submit(httpx.post, url, json=score("a lighthouse", seed, steps, adapters), timeout=300)
            for adapters, seed, steps in requests[1:]
        ]
        openai = pool.submit(
            httpx.post,
            f"{server.url}/v1/images/generations",
            json={"prompt": "a lighthouse", "model": "kohya", "seed": 35, "num_inference_steps": 6},
            timeout=300,
        )
        responses = [first.result(), *(future.result() for future in others)]
        openai_response = openai.result()
    for response, (adapters, seed, steps) in zip(responses, requests, strict=True):
        assert response.status_code == 200, response.text
        ours = decode_png(response.json()[0]["generated_image"]) / 255
        item = GenerationItem("a lighthouse", seed=seed, num_inference_steps=steps, height=SIZE, width=SIZE,
                              adapters=adapter_set(adapters))  # fmt: skip
        assert loras.difference(ours, loras.reference(folder, item)) < TOLERANCE, f"adapters {adapters}"
    assert openai_response.status_code == 200, openai_response.text
    ours = decode_png(openai_response.json()["data"][0]["b64_json"]) / 255
    item = GenerationItem("a lighthouse", seed=35, num_inference_steps=6, height=SIZE, width=SIZE,
                          adapters=(("kohya", 1.0),))  # fmt: skip
    assert loras.difference(ours, loras.reference(folder, item)) < TOLERANCE


def test_the_generate_command_picks_adapters(server: Server, folder: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "service.cli.main", "generate", "a lighthouse", "--url", server.url,
               "--seed", "41", "--steps", "6",
               "--adapter", "style:0.8", "--adapter", "kohya", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.split("\t")[0])
    ours = np.asarray(Image.open(path).convert("RGB")) / 255
    item = GenerationItem("a lighthouse", seed=41, num_inference_steps=6, height=SIZE, width=SIZE,
                          adapters=(("kohya", 1.0), ("style", 0.8)))  # fmt: skip
    assert loras.difference(ours, loras.reference(folder, item)) < TOLERANCE
    for bad in ("style:much", ":1", "style:nan", "style:inf"):
        refused = subprocess.run([*command[:-6], "--adapter", bad], capture_output=True, text=True,
                                 env=clean_env(), cwd=REPO, timeout=600)  # fmt: skip
        assert refused.returncode == 2 and "is not NAME or NAME:SCALE" in refused.stderr, bad


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        ({"wrong-shape": 1.0}, "adapter wrong-shape could not be loaded"),
        ({"foreign": 0.5}, "adapter foreign could not be loaded"),
        ({"nope": 1.0}, "unknown adapter"),
        ({"Style": 1.0}, "unknown adapter"),
        ({"../style": 1.0}, "adapter names are"),
        ({"": 1.0}, "adapter names are"),
        ({"style": 2.5}, "scale must be a finite number from -2.0 to 2.0"),
        ({"style": -100}, "scale must be a finite number"),
        ({"style": True}, "valid number"),
        ({"style": "1"}, "valid number"),
        ({"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}, "at most 4 adapters"),
        (["style"], "valid dictionary"),
    ],
)
def test_bad_adapters_get_422_saying_why(server: Server, adapters: Any, message: str) -> None:
    response = httpx.post(f"{server.url}/score", json=score("x", 1, 2, adapters), timeout=60)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]
    openai = {"prompt": "x", "num_inference_steps": 2, "adapters": adapters}
    response = httpx.post(f"{server.url}/v1/images/generations", json=openai, timeout=60)
    assert response.status_code in (400, 422), response.text
    assert message in response.json()["error"]["message"]


def test_an_infinite_scale_is_refused(server: Server) -> None:
    body = b'{"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {"adapters": {"s": 1e999}}}}'
    assert math.isinf(1e999)
    response = httpx.post(f"{server.url}/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "finite" in response.json()["error"]["message"]


def openai_image(server: Server, **fields: Any) -> str:
    body = {"prompt": PROMPT, "num_inference_steps": 2, "seed": 4, "size": f"{SIZE}x{SIZE}", **fields}
    response = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    image: str = response.json()["data"][0]["b64_json"]
    return image


def test_an_openai_model_naming_an_adapter_applies_it_beside_empty_or_other_adapters(server: Server) -> None:
    named = openai_image(server, model="style")
    assert named != openai_image(server)  # the adapter changes the image
    assert openai_image(server, model="style", adapters={}) == named  # once silently the bare model
    assert openai_image(server, model="style", adapters={"style": 1}) == named
    both = openai_image(server, model="style", adapters={"kohya": 1})
    assert both == openai_image(server, adapters={"style": 1, "kohya": 1})


def test_an_adapter_file_replaced_after_start_up_is_refused_without_the_servers_paths(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = loras.adapter_folder(tmp_path_factory.mktemp("replaced"))
    with serving(folder.parent / "server.log", SD_ADAPTERS=str(folder)) as server:
        (folder / "kohya.safetensors").write_bytes(b"\x00\x01not a safetensors file any more")
        (folder / "style" / loras.DIFFUSERS_FILE).unlink()
        for name in ("kohya", "style", "wrong-shape", "kohya"):  # the first use, then as left out
            response = httpx.post(f"{server.url}/score", json=score("x", 1, 2, {name: 1}), timeout=60)
            assert response.status_code == 422, response.text
            message = response.json()["error"]["message"]
            assert name in message and str(folder) not in message and str(folder.parent) not in message, (
                message
            )
        assert str(folder) in server.log_path.read_text()  # the operator's log keeps where


def test_a1111_lora_tags_in_the_prompt_pick_adapters_and_equal_score(server: Server) -> None:
    """Open WebUI's and SillyTavern's users write <lora:NAME:SCALE> in the prompt, as on A1111."""
    loras_listed = httpx.get(f"{server.url}/sdapi/v1/loras").json()
    assert [entry["name"] for entry in loras_listed] == ["kohya", "style", "unet-only"]
    body = {"prompt": "<lora:style:0.8> a lighthouse <LORA:kohya>", "steps": 6, "seed": 41, "cfg_scale": 7.5}
    tagged = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=300)
    assert tagged.status_code == 200, tagged.text
    plain = httpx.post(
        f"{server.url}/score", json=score("a lighthouse", 41, 6, {"style": 0.8, "kohya": 1.0}), timeout=300
    )
    without = httpx.post(f"{server.url}/score", json=score("a lighthouse", 41, 6, None), timeout=300)
    ours = decode_png(tagged.json()["images"][0]) / 255
    assert np.abs(ours - decode_png(plain.json()[0]["generated_image"]) / 255).max() == 0
    assert np.abs(ours - decode_png(without.json()[0]["generated_image"]) / 255).max() > TOLERANCE


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora:nope:1> a cat", "nope"),  # not an adapter of this server
        ("<lora::1> a cat", "names no adapter"),
        ("<lora:style:0.5:1> a cat", "two weights"),
        ("<lora:style:x> a cat", "not a number"),
        ("<lora:style:nan> a cat", "finite"),
        ("<lora:style:3> a cat", "from"),  # beyond the scale range
        ("<lora:a:1><lora:b:1><lora:c:1><lora:d:1><lora:e:1>", "at most"),
        ("<lora:../../etc/passwd:1> x", "names no adapter"),
    ],
)
def test_bad_a1111_lora_tags_get_422_saying_why(server: Server, prompt: str, message: str) -> None:
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 2}, timeout=60)
    assert answer.status_code == 422, answer.text
    assert message in answer.json()["detail"]


# ------------------------------------------------- SD_MAX_ADAPTERS=1: adapters on the device on first use
def post(server: Server, seed: int, adapters: dict[str, float] | None) -> httpx.Response:
    return httpx.post(f"{server.url}/score", json=score(PROMPT, seed, STEPS, adapters), timeout=300)


def check_image(response: httpx.Response, folder: Path, seed: int, adapters: dict[str, float] | None) -> None:
    assert response.status_code == 200, response.text
    ours = decode_png(response.json()[0]["generated_image"]) / 255
    item = GenerationItem(PROMPT, seed=seed, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                          adapters=adapter_set(adapters))  # fmt: skip
    assert loras.difference(ours, loras.reference(folder, item)) < TOLERANCE, f"seed {seed}, {adapters}"


def swaps(server: Server) -> list[str]:
    """The log's record of adapters put on the device: one line per change."""
    return re.findall(r"adapters on the device: (\S+) \(in: (\S+); out: (\S+)\)", server.log_path.read_text())


def test_two_adapters_alternately_with_room_for_one_match_diffusers(one_place: Server, folder: Path) -> None:
    assert httpx.get(f"{one_place.url}/info").json()["adapters"] == ["kohya", "style", "unet-only"]
    assert swaps(one_place) == []  # checked at start-up, put on the device only when asked for
    sequence = [
        ({"style": 0.8}, 51),
        ({"kohya": 1.0}, 52),
        ({"style": 0.8}, 53),
        (None, 54),
        ({"kohya": -0.5}, 55),
    ]
    for adapters, seed in sequence:
        check_image(post(one_place, seed, adapters), folder, seed, adapters)
    assert [on_device for on_device, _, _ in swaps(one_place)] == ["style", "kohya", "style", "kohya"]
    assert [out for _, _, out in swaps(one_place)] == ["none", "style", "kohya", "style"]


def test_two_adapters_at_once_with_room_for_one_match_diffusers(one_place: Server, folder: Path) -> None:
    """Sent together: each waits (without holding up the others) until its adapter is on the device
    and the other adapter's images are done; images whose adapter is on the device already run
    first."""
    requests = [({"style": 1.2}, 61), ({"kohya": 1.0}, 62), (None, 63), ({"style": 0.3}, 64),
                ({"kohya": 0.7}, 65), ({"unet-only": 1.0}, 66)]  # fmt: skip
    before = len(swaps(one_place))
    resident = swaps(one_place)[-1][0] if before else ""  # on the device as the test starts
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(post, one_place, seed, adapters) for adapters, seed in requests]
        responses = [future.result() for future in futures]
    for response, (adapters, seed) in zip(responses, requests, strict=True):
        check_image(response, folder, seed, adapters)
    changes = swaps(one_place)[before:]
    assert changes, "no adapter was put on the device"
    assert all(len(on_device.split(",")) == 1 for on_device, _, _ in changes)  # never two at once
    # every adapter asked for that was not on the device already was put there
    assert {name for _, name, _ in changes} >= {"style", "kohya", "unet-only"} - {resident}


@pytest.mark.parametrize(
    "adapters", [{"style": 1.0, "kohya": 1.0}, {"style": 0.5, "unet-only": 0.5, "kohya": 1.0}]
)
def test_more_adapters_at_once_than_the_device_holds_gets_422_saying_so(
    one_place: Server, adapters: dict[str, float]
) -> None:
    response = post(one_place, 1, adapters)
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert f"asks for {len(adapters)} adapters at once" in message and "SD_MAX_ADAPTERS" in message


def test_metrics_count_images_and_steps_by_adapter_set_with_served_names_only(one_place: Server) -> None:
    def images(label: str) -> float:
        return metric_value(metrics(), "sd_adapter_images_generated_total", f'adapters="{label}"')

    def metrics() -> str:
        return httpx.get(f"{one_place.url}/metrics").text

    before = {label: images(label) for label in ("style", "kohya", "none")}
    for adapters, seed in (({"style": 1.0}, 71), ({"style": 0.5}, 72), ({"kohya": 1.0}, 73), (None, 74)):
        assert post(one_place, seed, adapters).status_code == 200
    assert images("style") - before["style"] == 2  # scales are left out of the label
    assert images("kohya") - before["kohya"] == 1
    assert images("none") - before["none"] == 1
    text = metrics()
    for label in ("style", "kohya", "none"):
        steps = metric_value(text, "sd_adapter_step_seconds_count", f'adapters="{label}"')
        assert steps >= STEPS, label
    # names a client sends never become labels: only SD_ADAPTERS' names, "none" and "other"
    for hostile in ({"nope": 1.0}, {"<script>": 1.0}, {"a" * 64: 1.0}, {"wrong-shape": 1.0}):
        assert post(one_place, 1, hostile).status_code == 422
    labels = set(re.findall(r'sd_adapter_\w+\{[^}]*adapters="([^"]*)"', metrics()))
    assert labels <= {"style", "kohya", "unet-only", "none", "other"}, labels
