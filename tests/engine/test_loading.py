"""Every way of naming a model: random architectures, folders, Azure ML layout, hub ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import model
from model.architectures import CONFIGS, count_unet_parameters
from model.types import GenerationItem

ITEMS = [
    GenerationItem(prompt=p, seed=s, num_inference_steps=2, height=128, width=128)
    for p, s in (("a lighthouse", 3), ("a teapot", 4))
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written by the real command, as a user would."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli.main",
            "make-model",
            "--arch",
            "tiny",
            "--out",
            str(out),
            "--seed",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return out


def images(engine: model.Engine) -> list[np.ndarray]:
    return [result.image for result in engine.generate(ITEMS)]


def test_make_model_writes_the_published_layout(tiny_folder: Path) -> None:
    for part in (
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "safety_checker",
        "feature_extractor",
    ):
        assert (tiny_folder / part).is_dir(), part
    assert list((tiny_folder / "unet").glob("*.safetensors"))
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]


def test_folder_gives_the_same_images_as_the_random_model_with_that_seed(tiny_folder: Path) -> None:
    from_folder = model.load(str(tiny_folder), device="cpu")
    in_process = model.load("random:tiny:5", device="cpu")
    other_seed = model.load("random:tiny", device="cpu")
    assert from_folder.info.random_weights and from_folder.info.safety_checker
    assert from_folder.info.architecture == "tiny"
    for a, b in zip(images(from_folder), images(in_process), strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(images(other_seed)[0], images(in_process)[0])


def test_make_model_refuses_to_overwrite(tiny_folder: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "make-model", "--arch", "tiny", "--out", str(tiny_folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "already holds a model" in done.stderr


def test_azureml_model_folder_is_found_below(tiny_folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "azureml-model" / "mlflow_model_folder" / "artifacts" / "INPUT_model_path"
    shutil.copytree(tiny_folder, target)
    engine = model.load(str(tmp_path / "azureml-model"), device="cpu")
    assert np.array_equal(images(engine)[0], images(model.load(str(tiny_folder), device="cpu"))[0])


def test_folder_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(model.ModelLoadError, match="no diffusers model"):
        model.load(str(tmp_path), device="cpu")


def test_model_without_checker_gives_no_flag_unless_one_is_configured(
    tiny_folder: Path, tmp_path: Path
) -> None:
    """The 2-base layout: no safety_checker/ or feature_extractor/, null entries in model_index.json."""
    bare = tmp_path / "bare"
    shutil.copytree(tiny_folder, bare)
    shutil.rmtree(bare / "safety_checker")
    shutil.rmtree(bare / "feature_extractor")
    index = json.loads((bare / "model_index.json").read_text())
    index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (bare / "model_index.json").write_text(json.dumps(index))
    engine = model.load(str(bare), device="cpu")
    assert not engine.info.safety_checker
    assert [r.nsfw_content_detected for r in engine.generate(ITEMS)] == [None, None]
    checked = model.load(str(bare), device="cpu", safety_checker=str(tiny_folder))
    assert checked.info.safety_checker
    assert [r.nsfw_content_detected for r in checked.generate(ITEMS)] == [False, False]


def test_hub_id_without_network_is_one_clear_line() -> None:
    code = (
        "import model\ntry:\n    model.load('CompVis/stable-diffusion-v1-4')\n"
        "except model.ModelLoadError as e:\n    print(e)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    message = done.stdout.strip()
    assert done.returncode == 0 and "Traceback" not in done.stdout
    assert len(message.splitlines()) == 1
    assert "CompVis/stable-diffusion-v1-4" in message and "SD_MODEL" in message and "local" in message


@pytest.mark.parametrize("spec", ["random:huge", "random:tiny:abc", "no/such/thing/here", "./missing"])
def test_bad_specs_are_model_load_errors(spec: str) -> None:
    with pytest.raises(model.ModelLoadError):
        model.load(spec, device="cpu")


def test_published_architectures_are_exact() -> None:
    """The shapes that decide GPU timings, checked without allocating 4 GB."""
    assert 855e6 < count_unet_parameters("sd-v1-4") < 865e6
    assert 860e6 < count_unet_parameters("sd-2-base") < 870e6
    v14, v2 = CONFIGS["sd-v1-4"], CONFIGS["sd-2-base"]
    assert v14.unet["cross_attention_dim"] == 768 and v14.unet["attention_head_dim"] == 8
    assert v2.unet["cross_attention_dim"] == 1024 and v2.unet["use_linear_projection"]
    assert [c // h for c, h in zip((320, 640, 1280, 1280), v2.unet["attention_head_dim"], strict=True)] == [
        64
    ] * 4
    assert v14.text_encoder["num_hidden_layers"] == 12 and v14.text_encoder["hidden_size"] == 768
    assert v2.text_encoder["num_hidden_layers"] == 23 and v2.text_encoder["hidden_size"] == 1024
    for config in (v14, v2):
        assert config.vae["block_out_channels"] == [128, 256, 512, 512]
    assert v14.safety_checker is not None and v14.safety_checker["vision_config"]["patch_size"] == 14
    assert v14.safety_checker["vision_config"]["num_hidden_layers"] == 24
    assert v2.safety_checker is None
