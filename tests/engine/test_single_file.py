"""Single checkpoint files, converted from a folder diffusers saved: they load as the folder does,
a pickle that would run code is refused before it can, and the published architectures are told
apart by their tensors' names and shapes alone."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

import model
from model.architectures import CONFIGS
from model.loading.single_file import recognise, unet_channels, write_configs
from model.types import GenerationItem
from tests.helpers.weights import save_single_file, save_with_diffusers, unet_to_ldm

ITEMS = [
    GenerationItem(prompt="a lighthouse", seed=s, num_inference_steps=2, height=128, width=128)
    for s in (1, 2)
]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_with_diffusers(tmp_path_factory.mktemp("sd") / "sd", seed=6)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_single_file_loads_as_its_folder_and_as_diffusers_loads_it(
    folder: Path, tmp_path: Path, suffix: str
) -> None:
    single = save_single_file(folder, tmp_path / f"model{suffix}")
    engine = model.load(str(single), device="cpu", config=str(folder))
    reference = StableDiffusionPipeline.from_single_file(
        str(single), config=str(folder), local_files_only=True, safety_checker=None, feature_extractor=None
    )
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(engine.components, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    from_folder = model.load(str(folder), device="cpu")
    for a, b in zip(engine.generate(ITEMS), from_folder.generate(ITEMS), strict=True):
        assert np.array_equal(a.image, b.image)
    assert not engine.info.safety_checker  # a checkpoint holds none; the server says so loudly


class RunsCode:
    """A pickle that calls ``function(*args)`` when loaded: what a hostile .ckpt holds."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.call = (function, args)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.call


def payloads(marker: Path) -> dict[str, Any]:
    return {
        "os.system": RunsCode(os.system, f"touch {marker}"),
        "builtins.exec": RunsCode(exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.open": RunsCode(open, str(marker), "w"),
        "subprocess.call": RunsCode(subprocess.call, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "builtins.open", "subprocess.call"])
def test_a_ckpt_whose_pickle_would_run_code_is_refused_and_the_code_never_runs(
    tmp_path: Path, payload: str, zipped: bool
) -> None:
    marker = tmp_path / "ran"
    hostile = tmp_path / "model.ckpt"
    state = {"state_dict": {"x": torch.zeros(2)}, "callback": payloads(marker)[payload]}
    torch.save(state, hostile, _use_new_zipfile_serialization=zipped)
    with pytest.raises(model.ModelLoadError) as error:
        model.load(str(hostile), device="cpu")
    message = str(error.value)
    assert "\n" not in message and str(hostile) in message
    assert "refused" in message and ".safetensors" in message
    assert not marker.exists()
    torch.load(hostile, weights_only=False)  # the payload is live: a plain unpickler runs it
    assert marker.exists()


def ldm_keys(arch: str, text_key: str) -> dict[str, torch.Tensor]:
    """A full-size checkpoint's tensor names and shapes (on the meta device: no memory, no time)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[arch].unet)
        keys = unet_to_ldm(unet.state_dict(), dict(unet.config))
        keys[text_key] = torch.empty(77, 768)
    return keys


def test_full_size_sd1_and_sd2_are_recognised_by_names_and_shapes_alone() -> None:
    sd1 = ldm_keys("sd-v1-4", "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight")
    sd2 = ldm_keys("sd-2-base", "cond_stage_model.model.token_embedding.weight")
    assert (recognise(sd1), recognise(sd2)) == ("sd-v1-4", "sd-2-base")
    assert recognise(ldm_keys("tiny", "cond_stage_model.transformer.text_model.x")) is None
    assert recognise(ldm_keys("sd-v1-4", "cond_stage_model.model.token_embedding.weight")) is None  # mixed


def test_an_inpainting_checkpoint_is_converted_with_a_9_channel_unet(tmp_path: Path) -> None:
    """runwayml's and stabilityai's inpainting files: their first convolution takes 9 channels, and
    the configs written for the conversion say so (an inpainting model, offline)."""
    keys = ldm_keys("sd-v1-4", "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight")
    assert unet_channels(keys) == 4
    keys["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    assert (recognise(keys), unet_channels(keys)) == ("sd-v1-4", 9)
    write_configs("sd-v1-4", tmp_path / "configs", unet_channels(keys))
    config = json.loads((tmp_path / "configs" / "unet" / "config.json").read_text())
    assert config["in_channels"] == 9 and config["out_channels"] == 4


def test_an_unrecognised_file_without_sd_model_config_says_to_set_it(folder: Path, tmp_path: Path) -> None:
    single = save_single_file(folder, tmp_path / "tiny.safetensors")
    with pytest.raises(model.ModelLoadError, match="SD_MODEL_CONFIG") as error:
        model.load(str(single), device="cpu")
    assert str(single) in str(error.value) and "\n" not in str(error.value)


def write_configs_offline(arch: str, configs: Path, hf_home: Path) -> None:
    """``write_configs`` in a fresh process with the hub offline and ``hf_home`` as its cache: what
    an air-gapped machine does, without this process's already imported or cached state."""
    code = (
        "import pathlib\nfrom model.loading.single_file import write_configs\n"
        f"write_configs({arch!r}, pathlib.Path({str(configs)!r}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# What the hub's CLIP tokenizer gives for diffusers' own example prompt (openai/clip-vit-large-patch14).
HUB_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]


@pytest.mark.parametrize(("arch", "pad"), [("sd-v1-4", "<|endoftext|>"), ("sd-2-base", "!")])
def test_a_recognised_architecture_without_its_tokenizer_cached_builds_it_offline(
    tmp_path: Path, arch: str, pad: str
) -> None:
    # An air-gapped machine with an empty Hugging Face cache: the tokenizer comes from CLIP's merges.
    write_configs_offline(arch, tmp_path / "c", hf_home=tmp_path / "hf")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "c" / "tokenizer", local_files_only=True)
    assert len(tokenizer) == CONFIGS[arch].text_encoder["vocab_size"] and tokenizer.model_max_length == 77
    assert tokenizer.pad_token == pad
    assert tokenizer("a photo of an astronaut riding a horse on mars").input_ids == HUB_IDS
    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {tokenizer.pad_token_id}
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").iterdir())
    assert write_configs.__doc__


PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Red FOX in the snow, 8k, highly-detailed!!, trending on artstation, by greg rutkowski",
    "(masterpiece:1.2), best quality, 1girl, solo, looking at viewer <lora:style:0.8>",
    "portrait of a cyberpunk samurai, neon lights, rain, cinematic lighting, octane render, 35mm",
    "café naïve résumé, Zürich, São Paulo, Ελληνικά, русский текст, 東京の夜景, 서울, عربى",
    "emoji 🚀🔥👩‍🚀 and symbols © ® ™ ° ± × ÷ → ★ ♪",
    "don't won't it's I'm you're they've we'll she'd",
    "numbers 1234567890 3.14159 1,000,000 2024-06-01 12:30pm #hashtag @user",
    "   spaces\tand\nnewlines   everywhere  ",
    "UPPER lower MiXeD CaSe ALLCAPSWORDTHATISVERYLONGINDEED supercalifragilisticexpialidocious",
    "negative: blurry, lowres, bad anatomy, extra fingers, (worst quality:1.4), jpeg artifacts",
    "a " * 100,
    "",
]


def test_the_built_tokenizer_equals_clips_own_byte_pair_encoding_on_a_corpus_of_prompts() -> None:
    """The reference: OpenAI's SimpleTokenizer (the BPE the hub's CLIP tokenizers were made to match),
    as openai-clip ships it beside the merges. HTML entities are left out: OpenAI's cleans them
    (html.unescape), the hub's tokenizers do not."""
    import importlib.util

    from model.loading.tokenizer import bpe_path, clip_tokenizer

    spec = importlib.util.spec_from_file_location("clip_reference", bpe_path().parent / "simple_tokenizer.py")
    assert spec is not None and spec.loader is not None
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    bpe = reference.SimpleTokenizer(str(bpe_path()))
    start, end = bpe.encoder["<|startoftext|>"], bpe.encoder["<|endoftext|>"]
    tokenizer = clip_tokenizer()
    for prompt in PROMPTS:
        assert tokenizer(prompt).input_ids == [start, *bpe.encode(prompt), end], prompt


def saved(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


BAD_FILES = [
    ("model.pt", b"x" * 10, "not a checkpoint"),
    ("model.safetensors", b"", "0 bytes"),
    ("model.safetensors", b"\xff" * 8 + b"{}", "cannot be read"),
    ("model.ckpt", b"PK\x03\x04junk", "cannot be read"),
    ("model.ckpt", saved({"epoch": 3, "global_step": 10}), "no state dict"),
]


@pytest.mark.parametrize(("name", "content", "words"), BAD_FILES)
def test_a_bad_file_is_one_line_naming_it(tmp_path: Path, name: str, content: bytes, words: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(model.ModelLoadError) as error:
        model.load(str(tmp_path / name), device="cpu")
    message = str(error.value)
    assert str(tmp_path / name) in message and words in message and "\n" not in message, message


def test_batch_takes_a_single_file_with_sd_model_config(folder: Path, tmp_path: Path) -> None:
    single = save_single_file(folder, tmp_path / "model.safetensors")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a red cat\n")
    command = [sys.executable, "-m", "service.cli.main", "batch", "--input", str(tmp_path / "in"),
               "--output", str(tmp_path / "out"), "--model", str(single), "--steps", "1"]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith("SD_")}
    done = subprocess.run(
        command,
        env={**env, "SD_MODEL_CONFIG": str(folder)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "out").rglob("*.png"))) == 1
    command[command.index("--output") + 1] = str(tmp_path / "out2")
    without = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert without.returncode == 2 and "SD_MODEL_CONFIG" in without.stderr


def cache_tokenizer(home: Path, repo: str, subfolder: str) -> None:
    """A CLIP tokenizer of the published vocabulary's size in a Hugging Face cache's layout (the
    real one cannot be downloaded here; only its size and kind matter to the configs)."""
    from transformers import CLIPTokenizer

    from model.architectures import BOS, EOS, _byte_alphabet

    alphabet = _byte_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet]
    tokens += [f"filler{index}</w>" for index in range(49408 - len(tokens) - 2)] + [BOS, EOS]
    revision = "1" * 40
    cached = home / "hub" / f"models--{repo.replace('/', '--')}"
    CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[]).save_pretrained(
        cached / "snapshots" / revision / subfolder
    )
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(revision)


@pytest.mark.parametrize("arch", ["sd-v1-4", "sd-2-base"])
def test_a_recognised_architecture_gets_the_published_configs_offline(tmp_path: Path, arch: str) -> None:
    from model.loading.single_file import TOKENIZERS

    repo, subfolder = TOKENIZERS[arch]
    cache_tokenizer(tmp_path / "hf", repo, subfolder)
    write_configs_offline(arch, tmp_path / "c", hf_home=tmp_path / "hf")
    configs = tmp_path / "c"
    unet = UNet2DConditionModel.load_config(configs / "unet")
    for key, value in CONFIGS[arch].unet.items():
        assert unet[key] == (list(value) if isinstance(value, tuple) else value), key
    text = json.loads((configs / "text_encoder" / "config.json").read_text())
    assert text["num_hidden_layers"] == CONFIGS[arch].text_encoder["num_hidden_layers"]
    assert json.loads((configs / "model_index.json").read_text())["safety_checker"] == [None, None]
