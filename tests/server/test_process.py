"""The server as a process: `sd-endpoint serve` on a make-model folder, the SIGTERM drain, the logs;
plus the flagged-image path, the settings' defaults and the Azure ML entry script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from schemas.score import SAMPLE_REQUEST
from service.hosts import azureml_online as azureml_score
from service.settings import Settings
from tests.helpers.ports import free_port
from tests.helpers.processes import SERVE
from tests.helpers.servers import (
    ThreadServer,
    decode_png,
    gated_server,
    request_body,
    wait_for_metric,
    wait_held,
    wait_ready,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET = "PLUM-TREE-4411"  # in prompts; must never reach the log
LONG_PROMPT = " ".join(["a very long prompt about", SECRET] * 40)  # far past CLIP's 77 tokens


def sd_endpoint(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "sd-endpoint"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "service.cli.main", *args]


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without SD_* or AZUREML_* settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SD_", "AZUREML_"))}
    return {**env, "PYTHONPATH": str(ROOT), **settings}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    subprocess.run(
        sd_endpoint("make-model", "--arch", "tiny", "--out", str(folder)), check=True, env=clean_env()
    )
    return folder


@pytest.fixture(scope="module")
def flag_everything_checker(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's safety checker with every concept threshold below any score."""
    folder = tmp_path_factory.mktemp("checker")
    for part in ("safety_checker", "feature_extractor"):
        (folder / part).mkdir()
        for file in (model_folder / part).iterdir():
            (folder / part / file.name).write_bytes(file.read_bytes())
    weights_file = folder / "safety_checker" / "model.safetensors"
    weights = load_file(weights_file)
    weights["concept_embeds_weights"].fill_(-1.0)
    save_file(weights, weights_file, metadata={"format": "pt"})
    return folder


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=120)


def test_serve_a_model_folder_end_to_end(model_folder: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    env = clean_env(SD_LOG_FORMAT="json", SD_PORT=str(port))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            sd_endpoint("serve", "--model", str(model_folder)), env=env, stderr=log, stdout=log
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        response = httpx.post(
            f"{url}/score", json=SAMPLE_REQUEST, headers={"x-request-id": "e2e-1"}, timeout=300
        )
        assert response.status_code == 200, response.text
        records = response.json()
        assert [r["prompt"] for r in records] == SAMPLE_REQUEST["input_data"]["data"]
        assert all(decode_png(r["generated_image"]).shape == (128, 128, 3) for r in records)
        long_one = httpx.post(
            f"{url}/score", json=request_body([LONG_PROMPT]), headers={"x-request-id": "e2e-2"}
        )
        assert long_one.status_code == 200
    finally:
        code = stop(process)
    assert code == 0
    lines = [
        json.loads(line) for line in log_path.read_text().splitlines() if line.strip()
    ]  # JSON, every one
    assert any(line["request_id"] == "e2e-1" and "/score" in line["message"] for line in lines)
    assert any(line["request_id"] == "e2e-2" and "scored" in line["message"] for line in lines)
    assert any("RANDOM WEIGHTS" in line["message"] for line in lines)  # a make-model folder is noise
    assert SECRET not in log_path.read_text()
    assert SAMPLE_REQUEST["input_data"]["data"][0] not in log_path.read_text()


def test_a_model_that_cannot_load_ends_the_process_with_status_1(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    command = sd_endpoint("serve", "--model", str(missing), "--port", str(free_port()))
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "could not be loaded" in result.stderr and "SD_MODEL" in result.stderr


def test_sigterm_drains_in_flight_and_queued_requests_then_exits_0(tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    with gated_server(tmp_path, SD_DRAIN_TIMEOUT_S="300") as (url, process):
        with ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(httpx.post, f"{url}/score", json=request_body(["in flight"]), timeout=300)
            wait_held(tmp_path, process, in_flight)
            queued = pool.submit(httpx.post, f"{url}/score", json=request_body(["queued"]), timeout=300)
            wait_for_metric(url, "sd_queue_depth", 1)
            process.send_signal(signal.SIGTERM)
            # Readiness turns 503 at once; new work is refused; the two requests are still held.
            deadline = time.monotonic() + 60
            while (probe := httpx.get(f"{url}/")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert probe.status_code == 503 and probe.json()["error"]["code"] == "shutting_down"
            refused = httpx.post(f"{url}/score", json=request_body(["too late"]))
            assert refused.status_code == 503 and "retry-after" in refused.headers
            assert not in_flight.done() and not queued.done()
            (tmp_path / "release").touch()
            assert in_flight.result().status_code == 200
            assert queued.result().status_code == 200
        assert process.wait(timeout=120) == 0, log_path.read_text()


def test_flagged_images_are_black_pngs_marked_true(flag_everything_checker: Path) -> None:
    settings = Settings(model="random:tiny", safety_checker=flag_everything_checker)
    with ThreadServer(settings) as server:  # no engine given: the app loads what the settings name
        response = httpx.post(f"{server.url}/score", json=request_body(["a", "b"]), timeout=120)
        metrics = httpx.get(f"{server.url}/metrics").text
    assert response.status_code == 200
    for record in response.json():
        assert record["nsfw_content_detected"] is True
        assert not decode_png(record["generated_image"]).any()  # every pixel 0
    assert "sd_images_flagged_total 2.0" in metrics


def test_settings_default_to_azureml_model_dir_then_random_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SD_MODEL", "AZUREML_MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().model_spec == "random:tiny"
    monkeypatch.setenv("AZUREML_MODEL_DIR", "/mnt/model")
    assert Settings().model_spec == "/mnt/model"
    monkeypatch.setenv("SD_MODEL", "/models/sd")
    assert Settings().model_spec == "/models/sd"
    monkeypatch.setenv("SD_API_KEYS", " one, two ,")
    assert Settings().api_key_list == (b"one", b"two")
    monkeypatch.setenv("SD_SERVED_MODEL_NAMES", " sd-v1-4, dall-e-3 ,")
    assert Settings().served_model_name_list == ("sd-v1-4", "dall-e-3")
    monkeypatch.setenv("SD_SERVED_MODEL_NAMES", " , ")
    assert Settings().served_model_name_list == ()
    for bad in ("ok,bad\tname", "x" * 201):
        monkeypatch.setenv("SD_SERVED_MODEL_NAMES", bad)
        with pytest.raises(ValidationError, match="SD_SERVED_MODEL_NAMES"):
            Settings()
    monkeypatch.delenv("SD_SERVED_MODEL_NAMES")
    monkeypatch.setenv("SD_LOG_LEVEL", " debug")
    assert Settings().log_level == "DEBUG"


def test_bad_settings_stop_the_server_with_one_line_naming_each_variable_and_never_a_key() -> None:
    # A key variable set but empty (a secret mounted without content) must not serve without keys.
    env = clean_env(
        SD_MAX_BATCH_SIZE="0", SD_LOG_LEVEL="LOUD", SD_PORT="http", SD_API_KEYS=" , ",
        SD_SERVED_MODEL_NAMES="secret-looking\tname",
    )  # fmt: skip
    done = subprocess.run(SERVE, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()  # no traceback, no pydantic report
    assert line.startswith("sd-endpoint serve: error: ")
    for variable in ("SD_MAX_BATCH_SIZE", "SD_LOG_LEVEL", "SD_PORT", "SD_API_KEYS", "SD_SERVED_MODEL_NAMES"):
        assert variable in line, variable
    assert "LOUD" not in line and "http" not in line  # the values stay out (one may be a key)
    assert done.stdout == ""
    with_key = subprocess.run(
        SERVE, env=clean_env(SD_API_KEYS="the-real-key", SD_MAX_PROMPTS="-1"), cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert with_key.returncode == 2 and "SD_MAX_PROMPTS" in with_key.stderr
    assert "the-real-key" not in with_key.stderr


@pytest.fixture()
def azureml_entry() -> Iterator[None]:
    azureml_score.init(Settings(model="random:tiny", max_prompts=2))
    try:
        yield
    finally:
        azureml_score.shutdown()


def test_azureml_entry_script_serves_the_same_contract(azureml_entry: None) -> None:
    records = azureml_score.run(json.dumps(request_body(["a", "b"], seed=3)))
    assert [(r["prompt"], r["seed"]) for r in records] == [("a", 3), ("b", 4)]
    assert decode_png(records[0]["generated_image"]).shape == (128, 128, 3)
    # Without the inference server's AMLResponse class, an error comes back as the error body.
    error = azureml_score.run(json.dumps(request_body(["a", "b", "c"])))
    assert error["error"]["status"] == 422 and "at most 2" in error["error"]["message"]
    assert azureml_score.run(b"{not json")["error"]["status"] == 400
    # Already parsed, a lone surrogate in text, something that is not JSON at all: answers, not crashes.
    assert len(azureml_score.run(request_body(["parsed"], seed=3))) == 1
    assert azureml_score.run('{"input_data": {"columns": ["prompt"], "data": ["\ud800"]}}')["error"][
        "status"
    ] in (400, 422)
    assert azureml_score.run(object())["error"]["status"] == 400
    assert np.array_equal(
        decode_png(azureml_score.run(json.dumps(request_body(["a"], seed=3)))[0]["generated_image"]),
        decode_png(azureml_score.run(json.dumps(request_body(["a"], seed=3)))[0]["generated_image"]),
    )
