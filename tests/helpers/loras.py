"""LoRA adapters as users bring them, built in the test: peft layers with random non-zero weights on
random:tiny's UNet and text encoder, written by diffusers' own ``save_lora_weights`` (its
``pytorch_lora_weights.safetensors``) or renamed to the kohya/A1111 single-file layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tests.helpers.stock import stock_image

if TYPE_CHECKING:
    from model.types import GenerationItem

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def lora_layers(seed: int, *, text_encoder: bool = True, rank: int = 4, alpha: int = 8) -> dict[str, Any]:
    """Random LoRA layers for random:tiny: the UNet's and (optionally) the text encoder's, in
    diffusers' key names, with the peft configs that made them."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from model.architectures import build_components

    parts = build_components("tiny", 0)
    torch.manual_seed(seed)
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS)
    parts["unet"].add_adapter(unet_config, adapter_name="made")
    layers: dict[str, Any] = {
        "unet_lora_layers": _scaled(get_peft_model_state_dict(parts["unet"], adapter_name="made")),
        "unet_lora_adapter_metadata": unet_config.to_dict(),
    }
    if text_encoder:
        text_config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=TEXT_TARGETS
        )
        inject_adapter_in_model(text_config, parts["text_encoder"], adapter_name="made")
        layers["text_encoder_lora_layers"] = _scaled(
            get_peft_model_state_dict(parts["text_encoder"], adapter_name="made")
        )
        layers["text_encoder_lora_adapter_metadata"] = text_config.to_dict()
    return layers


def _scaled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's random init as is (A and B both random): it changes a tiny model's image by about a
    third of the range. Much larger weights make the image chaotic (it then changes with the CPU
    thread count, in diffusers' own pipeline too), which would hide what the tests compare."""
    return {key: tensor.contiguous() for key, tensor in state.items()}


def save_diffusers(folder: Path, seed: int, **options: Any) -> Path:
    """A folder holding ``pytorch_lora_weights.safetensors``, written by diffusers."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(str(folder), **lora_layers(seed, **options))
    return folder


def save_kohya(path: Path, seed: int, *, alpha: int = 8) -> Path:
    """``NAME.safetensors`` in the kohya/A1111 layout: lora_unet_*/lora_te_* modules with
    lora_down/lora_up weights and an alpha each, as sd-scripts writes them."""
    from safetensors.torch import save_file

    layers = lora_layers(seed, alpha=alpha)
    state: dict[str, torch.Tensor] = {}
    for kohya, key in (("lora_unet_", "unet_lora_layers"), ("lora_te_", "text_encoder_lora_layers")):
        for name, tensor in layers[key].items():
            inner, _, leaf = name.rpartition(".lora_")
            if kohya == "lora_te_":
                inner = "text_model." + inner  # sd-scripts names CLIP's modules from text_model
            stem = kohya + inner.replace(".", "_")
            state[f"{stem}.{'lora_down' if leaf.startswith('A') else 'lora_up'}.weight"] = tensor
            state[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(state, str(path))
    return path


def adapter_folder(root: Path) -> Path:
    """SD_ADAPTERS as a user fills it: two diffusers folders (UNet and text encoder; UNet only), a
    kohya file, and three that cannot serve (a tensor of the wrong shape, another model's names,
    not safetensors at all), beside a file that is no adapter."""
    from safetensors.torch import load_file, save_file

    for name, seed, options in (("style", 1, {}), ("unet-only", 3, {"text_encoder": False})):
        (root / name).mkdir()
        save_diffusers(root / name, seed, **options)
    save_kohya(root / "kohya.safetensors", 2)
    # broken ones: a tensor of the wrong shape, names of no layer of this model, not safetensors at all
    (root / "wrong-shape").mkdir()
    save_diffusers(root / "wrong-shape", 4)
    path = root / "wrong-shape" / DIFFUSERS_FILE
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = torch.randn(state[key].shape[0] + 8, state[key].shape[1])
    save_file(state, str(path))
    save_file({"other_model.blocks.0.lora_A.weight": torch.ones(4, 4)}, str(root / "foreign.safetensors"))
    (root / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    (root / "notes.txt").write_text("not an adapter")
    return root


def reference(folder: Path, it: GenerationItem, seed: int = 0) -> np.ndarray:
    """What a diffusers user gets: the same weights (random:tiny:``seed``'s), load_lora_weights and
    set_adapters."""
    from diffusers import StableDiffusionPipeline

    from model.architectures import build_components

    pipe = StableDiffusionPipeline(**build_components("tiny", seed), requires_safety_checker=False)
    for name, _ in it.adapters:
        path = folder / name / DIFFUSERS_FILE if (folder / name).is_dir() else folder / f"{name}.safetensors"
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    if it.adapters:
        pipe.set_adapters([n for n, _ in it.adapters], adapter_weights=[s for _, s in it.adapters])
    return stock_image(pipe, it)


def difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max())
