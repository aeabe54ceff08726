"""Single checkpoint files (``.safetensors``, ``.ckpt``): the format of Stable Diffusion's own
releases and of most community models, loaded with diffusers' ``from_single_file``.

A ``.ckpt`` is a pickle, and a pickle can run code as it loads: it is only ever read with torch's
``weights_only`` unpickler (tensors and plain values), and one that needs more is refused. The
published SD 1.x and 2.x architectures are recognised from their tensors' names and shapes; any
other needs SD_MODEL_CONFIG, a diffusers folder (or a cached hub id) whose configs describe it.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from model.errors import ModelLoadError
from model.loading.tokenizer import clip_tokenizer

SUFFIXES = (".safetensors", ".ckpt")
# The original (LDM) layout's cross-attention key projection of the first attention block: its
# width is the text encoder's (768: CLIP ViT-L, SD 1.x; 1024: OpenCLIP ViT-H, SD 2.x).
_CROSS_ATTENTION = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
# The UNet's first convolution: 4 input channels, or 9 for an inpainting model (latents, mask,
# masked-image latents: runwayml's stable-diffusion-inpainting, stabilityai's 2-inpainting).
_UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
_SD1_TEXT = "cond_stage_model.transformer."
_SD2_TEXT = "cond_stage_model.model."
# Where a recognised architecture's tokenizer lives in a Hugging Face cache (a checkpoint has none),
# and the padding token it has, for the one built offline when the cache lacks it (tokenizer.py).
TOKENIZERS = {
    "sd-v1-4": ("openai/clip-vit-large-patch14", ""),
    "sd-2-base": ("stabilityai/stable-diffusion-2-base", "tokenizer"),
}
PAD_TOKENS = {"sd-v1-4": "<|endoftext|>", "sd-2-base": "!"}
_AGAIN = "copy or download it again"
_CONVERT = "convert it to .safetensors (load it where you trust it, save it with safetensors) and give that"


def read_tensors(path: Path) -> dict[str, Any]:
    """The file's tensors, without running any code a pickle holds (the state dict under
    ``state_dict`` when the checkpoint wraps it)."""
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes); {_AGAIN}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as error:  # safetensors' own error type, and OSError
            raise ModelLoadError(
                f"{path} cannot be read as safetensors ({_first(error)}); {_AGAIN}"
            ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelLoadError(
            f"{path} is refused: its pickle would run code when loaded, which is never done here "
            f"({_first(error)}); {_CONVERT}"
        ) from None
    except Exception as error:  # a damaged zip or pickle: many types
        raise ModelLoadError(f"{path} cannot be read as a checkpoint ({_first(error)}); {_AGAIN}") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not any(isinstance(value, torch.Tensor) for value in state.values()):
        raise ModelLoadError(
            f"{path} holds no state dict of tensors; it is not a Stable Diffusion checkpoint"
        )
    return state


def _first(error: Exception) -> str:
    """An error's first paragraph as one short line."""
    text = " ".join(str(error).split("\n\n")[0].split())
    return (text if len(text) <= 200 else text[:197] + "...") or type(error).__name__


def recognise(tensors: dict[str, Any]) -> str | None:
    """The published architecture a checkpoint's names and shapes match, or None."""
    to_k = tensors.get(_CROSS_ATTENTION)
    if to_k is None or to_k.dim() != 2:
        return None
    rows, width = to_k.shape
    if rows != 320:
        return None
    if width == 768 and any(key.startswith(_SD1_TEXT) for key in tensors):
        return "sd-v1-4"
    if width == 1024 and any(key.startswith(_SD2_TEXT) for key in tensors):
        return "sd-2-base"
    return None


def unet_channels(tensors: dict[str, Any]) -> int:
    """The UNet's input channels as the checkpoint's first convolution has them (4 when unknown)."""
    weight = tensors.get(_UNET_INPUT)
    return int(weight.shape[1]) if weight is not None and weight.dim() == 4 else 4


def load_single_file(path: Path, dtype: torch.dtype, config: str | None) -> tuple[dict[str, Any], str]:
    """The pipeline's components from one checkpoint file, and the architecture's name.

    Steps: 1) read it safely (a pickle that runs code is refused before anything else), 2) the
    configs: SD_MODEL_CONFIG, else those of the recognised architecture, 3) diffusers converts.
    """
    # 1) tensors only
    tensors = read_tensors(path)
    architecture = recognise(tensors)
    # 2) what describes it
    with tempfile.TemporaryDirectory(prefix="sd-config-") as scratch:
        if config is None:
            if architecture is None:
                raise ModelLoadError(
                    f"{path}: its architecture is not one of the published SD 1.x or 2.x ones; set "
                    "SD_MODEL_CONFIG to a diffusers folder (or a cached hub id) of the model it was made from"
                )
            config = str(write_configs(architecture, Path(scratch), unet_channels(tensors)))
        # 3) diffusers' conversion, offline
        from diffusers import StableDiffusionPipeline

        del tensors  # diffusers reads the file again; do not hold two copies
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=config,
                local_files_only=True,
                torch_dtype=dtype,
                safety_checker=None,
                feature_extractor=None,
            )
        except Exception as error:  # the converters raise many types; each means "does not fit"
            text = " ".join(str(error).split())[:300] or type(error).__name__
            raise ModelLoadError(
                f"{path} could not be loaded with the configs of {config} ({text}); set SD_MODEL_CONFIG to a "
                "diffusers folder of the model the file was made from"
            ) from None
    parts = {
        name: getattr(pipe, name, None) for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    }
    parts.update(safety_checker=None, feature_extractor=None)
    return parts, architecture or "custom"


def write_configs(architecture: str, out: Path, in_channels: int = 4) -> Path:
    """A diffusers folder of configs (no weights) for a published architecture, plus its tokenizer
    (from the Hugging Face cache, else built from CLIP's merges): what ``from_single_file`` needs to
    convert the file offline. ``in_channels`` 9: the architecture's inpainting model."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    from model.architectures import _SCHEDULER, CONFIGS

    repo, subfolder = TOKENIZERS[architecture]
    arch = CONFIGS[architecture]
    try:
        tokenizer = CLIPTokenizer.from_pretrained(repo, subfolder=subfolder, local_files_only=True)
    except Exception:  # not cached: every hub error here means that
        tokenizer = None
    # transformers builds an empty tokenizer, without an error, when the files are missing; then the
    # same tokenizer is built from CLIP's merges, which a dependency ships (no network, ever)
    if tokenizer is None or len(tokenizer) != arch.text_encoder["vocab_size"]:
        tokenizer = clip_tokenizer(PAD_TOKENS[architecture])
    with torch.device("meta"):
        UNet2DConditionModel(**{**arch.unet, "in_channels": in_channels}).save_config(out / "unet")
        AutoencoderKL(**arch.vae).save_config(out / "vae")
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    text_config = CLIPTextConfig(**arch.text_encoder, **special)
    text_config.architectures = ["CLIPTextModel"]
    text_config.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    PNDMScheduler.from_config(_SCHEDULER).save_config(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    import json

    (out / "model_index.json").write_text(json.dumps(index))
    return out
