"""Weight folders as diffusers saves them, whole and broken: variants, and errors that name the
component and the file, with what to do, in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import model
from model.types import GenerationItem
from tests.helpers.weights import save_with_diffusers

ITEM = GenerationItem(prompt="a lighthouse", seed=3, num_inference_steps=2, height=128, width=128)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_with_diffusers(tmp_path_factory.mktemp("plain") / "sd", seed=4)


@pytest.fixture(scope="module")
def fp16_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What downloading only a repository's fp16 files gives: every network as *.fp16.safetensors."""
    return save_with_diffusers(tmp_path_factory.mktemp("fp16") / "sd", seed=4, variant="fp16")


def image(engine: model.Engine) -> np.ndarray:
    return engine.generate([ITEM])[0].image


# -- 4. variants ----------------------------------------------------------------------------------
def test_a_folder_with_only_fp16_files_loads_upcast_on_the_cpu(plain: Path, fp16_only: Path) -> None:
    assert not list(fp16_only.glob("*/diffusion_pytorch_model.safetensors"))
    engine = model.load(str(fp16_only), device="cpu")
    assert engine.info.dtype == "fp32"
    ours = image(engine).astype(np.int16)
    reference = image(model.load(str(plain), device="cpu")).astype(np.int16)
    assert np.abs(ours - reference).mean() < 2  # the same model, rounded to fp16 and back


def test_sd_model_variant_picks_one_where_several_are_there(
    plain: Path, fp16_only: Path, tmp_path: Path
) -> None:
    both = shutil.copytree(plain, tmp_path / "both")
    for file in fp16_only.rglob("*.fp16.safetensors"):
        shutil.copy(file, both / file.relative_to(fp16_only))
    name = "conv_in.weight"
    plain_weight = load_file(plain / "unet" / "diffusion_pytorch_model.safetensors")[name]
    fp16_weight = load_file(both / "unet" / "diffusion_pytorch_model.fp16.safetensors")[name]
    assert not torch.equal(plain_weight, fp16_weight.float())
    default = model.load(str(both), device="cpu")
    chosen = model.load(str(both), device="cpu", variant="fp16")
    assert torch.equal(default.components.unet.state_dict()[name], plain_weight)
    assert torch.equal(chosen.components.unet.state_dict()[name], fp16_weight.float())
    with pytest.raises(model.ModelLoadError) as error:
        model.load(str(fp16_only), device="cpu", variant="ema")
    assert "unet" in str(error.value) and "'ema'" in str(error.value) and "fp16" in str(error.value)
    two = shutil.copytree(fp16_only, tmp_path / "two")  # fp16 and ema files, no plain ones
    unet = two / "unet"
    shutil.copy(
        unet / "diffusion_pytorch_model.fp16.safetensors", unet / "diffusion_pytorch_model.ema.safetensors"
    )
    with pytest.raises(model.ModelLoadError, match=r"several weight variants.*SD_MODEL_VARIANT"):
        model.load(str(two), device="cpu")


# -- 5. errors that name the component and the file ------------------------------------------------
def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "text_encoder/model.safetensors"
NOT_JSON_HEADER = b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"


def empty_folder(path: Path) -> None:
    remove(path)
    path.mkdir()


# name: (what to do to the folder, the component the message starts with, the path it names, words)
BREAKAGES: dict[str, tuple[Callable[[Path], object], str, str, str]] = {
    "no unet folder": (lambda f: remove(f / "unet"), "unet", "unet", "no folder"),
    "empty vae folder": (lambda f: empty_folder(f / "vae"), "vae", "vae", "empty"),
    "checker listed, absent": (
        lambda f: remove(f / "safety_checker"), "safety_checker", "safety_checker", "[null, null]"
    ),
    "zero-byte text encoder": (
        lambda f: (f / TEXT_WEIGHTS).write_bytes(b""), "text_encoder", TEXT_WEIGHTS, "empty (0 bytes)"
    ),
    "truncated vae": (lambda f: truncate(f / VAE_WEIGHTS), "vae", VAE_WEIGHTS, "truncated"),
    "garbage unet": (
        lambda f: (f / UNET_WEIGHTS).write_bytes(NOT_JSON_HEADER), "unet", UNET_WEIGHTS, "not a whole"
    ),
    "no unet config": (lambda f: remove(f / "unet" / "config.json"), "unet", "unet", "config.json"),
    "no unet weights": (lambda f: remove(f / UNET_WEIGHTS), "unet", "unet", "holds no weights"),
    "config does not fit": (
        lambda f: edit_json(f / "unet" / "config.json", cross_attention_dim=48),
        "unet", "unet", "do not fit its config.json (down_blocks",
    ),
    "index not json": (
        lambda f: (f / "model_index.json").write_text("{not json"),
        "model_index.json", "model_index.json", "JSON",
    ),
    "unknown class": (
        lambda f: edit_json(f / "model_index.json", vae=["diffusers", "NoSuchAutoencoder"]),
        "vae", "model_index.json", "NoSuchAutoencoder",
    ),
}  # fmt: skip


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_folder_is_one_line_naming_the_component_and_the_file(
    plain: Path, tmp_path: Path, breakage: str
) -> None:
    folder = shutil.copytree(plain, tmp_path / "sd")
    damage, component, where, words = BREAKAGES[breakage]
    damage(folder)
    with pytest.raises(model.ModelLoadError) as error:
        model.load(str(folder), device="cpu")
    message = str(error.value)
    assert "\n" not in message and message.startswith(component), message
    assert str(folder / where) in message and words in message, message
    assert "low_cpu_mem_usage" not in message and "ignore_mismatched_sizes" not in message


@pytest.mark.parametrize("spec", ["models/sd-v1-4x", "my-org/no-such-model"])
def test_a_spec_that_could_be_a_path_or_a_hub_id_says_both(spec: str, tmp_path: Path) -> None:
    code = f"import model\ntry:\n    model.load({spec!r})\nexcept model.ModelLoadError as e:\n    print(e)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    [message] = done.stdout.strip().splitlines()
    assert f"no folder here (looked for {tmp_path / spec})" in message and "Hugging Face Hub id" in message
    assert "cache" in message


def test_sd_model_variant_reaches_the_loader_and_odd_values_are_refused(fp16_only: Path) -> None:
    from service.runtime.engines import load_serving_engine
    from service.settings import SettingsError, load_settings

    engine = load_serving_engine(load_settings(model=str(fp16_only), model_variant="fp16"), "cpu")
    assert engine.info.dtype == "fp32"
    with pytest.raises(model.ModelLoadError, match="'ema'"):
        load_serving_engine(load_settings(model=str(fp16_only), model_variant="ema"), "cpu")
    for odd in ("../fp16", "fp16.safetensors", "", "a b", "x" * 41):
        with pytest.raises(SettingsError, match="SD_MODEL_VARIANT"):
            load_settings(model_variant=odd)


def test_a_hub_id_resolves_offline_from_a_populated_cache(plain: Path, tmp_path: Path) -> None:
    """The Hugging Face cache's layout (hub/models--org--name/{refs/main, snapshots/REV/}), filled
    with a folder diffusers saved: no network is needed, nor tried (HF_HUB_OFFLINE=1)."""
    revision = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--my-org--tiny-sd"
    shutil.copytree(plain, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = "import model\ne = model.load('my-org/tiny-sd', device='cpu')"
    code += "\nprint(e.info.name, e.info.safety_checker)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["my-org/tiny-sd", "True"]
