"""Adapter files: found in SD_ADAPTERS, checked against the model at start-up from their shapes
alone, and read (the slow part: tensors from disk, kohya/A1111 names converted) when first used.

Both go through diffusers' own ``lora_state_dict`` (its diffusers and kohya/A1111 converters), so
a file serves exactly as ``load_lora_weights`` would take it. Nothing here touches the model's
module tree: that is the engine thread's job (manager.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.errors import ModelLoadError

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
SUFFIX = ".safetensors"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def find_adapters(directory: Path) -> dict[str, Path]:
    """Each entry of ``directory`` that looks like an adapter: a folder holding diffusers' LoRA file
    (named after the folder) or a ``NAME.safetensors`` file (named after its stem), by name."""
    if not directory.is_dir():
        raise ModelLoadError(
            f"SD_ADAPTERS={directory} is not a folder; point it at a folder of LoRA adapters"
        )
    found: dict[str, Path] = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and (entry / DIFFUSERS_FILE).is_file():
            found[entry.name] = entry / DIFFUSERS_FILE
        elif entry.is_file() and entry.suffix == SUFFIX:
            found[entry.stem] = entry
    return found


# A path's folders, as OS and library errors quote them ("/srv/adapters/x.safetensors", "C:\\a\\x").
_FOLDERS = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[\\/](?:[^\s'\"\\/]+[\\/])+")


def without_folders(text: str) -> str:
    """``text`` with each quoted path cut to its last part: what a client may read of why an adapter
    is left out (the log keeps the whole path, for the operator)."""
    return _FOLDERS.sub("", text)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


@dataclass
class AdapterFile:
    """One adapter as read from disk, in diffusers' names, ready to inject."""

    state: dict[str, torch.Tensor]
    network_alphas: dict[str, float] | None
    metadata: dict[str, Any] | None


def read_adapter(path: Path) -> AdapterFile:
    """Read ``path`` the way ``load_lora_weights`` does (safe to run outside the engine thread)."""
    from diffusers import StableDiffusionPipeline

    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(path.parent), weight_name=path.name, return_lora_metadata=True
    )
    if not all("lora" in key for key in state):
        raise ValueError("Invalid LoRA checkpoint: some names hold no 'lora'")
    return AdapterFile(state, alphas, metadata)


def fit_problem(name: str, path: Path, unet: Any, text_encoder: Any) -> str | None:
    """Why the adapter at ``path`` cannot serve this model, or None; reads only the file's header
    (and its one-number tensors, kohya's alphas), so a folder of large adapters checks quickly."""
    from diffusers import StableDiffusionPipeline

    # 1. A name requests can carry.
    if not NAME.fullmatch(name):
        return "its name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    # 2. The header: every tensor's shape.
    try:
        shapes = _header(path)
    except Exception as error:  # any failure leaves the adapter out, never the server
        return f"{path.name} is not a readable safetensors file ({first_line(error)})"
    # 3. diffusers' converters, on shapes only.
    try:
        state, _ = StableDiffusionPipeline.lora_state_dict(shapes)
    except Exception as error:
        return f"{path.name} does not fit this model ({first_line(error)})"
    if not all("lora" in key for key in state):
        return f"{path.name} does not fit this model (names without 'lora': not a LoRA file)"
    # 4. Every LoRA layer against the model layer it adapts.
    layers = 0
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        part = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
        if not part:
            continue
        problem, count = _fits(_peft_names(part, model, prefix == "unet"), model)
        if problem:
            return f"{path.name} does not fit this model ({prefix}.{problem})"
        layers += count
    if not layers:
        return f"{path.name} holds no LoRA layer of this model's UNet or text encoder"
    return None


def _header(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as shapes (meta tensors), bar the one-number ones, which converters read."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as file:
        for key in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
            shape = file.get_slice(key).get_shape()
            small = math.prod(shape) <= 1
            tensors[key] = file.get_tensor(key) if small else torch.empty(shape, device="meta")
    return tensors


def _peft_names(part: dict[str, torch.Tensor], model: Any, unet: bool) -> dict[str, torch.Tensor]:
    """The layer names peft will use, converted as diffusers' loaders convert them."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if unet:
        return part if "lora_A" in next(iter(part)) else dict(convert_unet_state_dict_to_peft(part))
    converted: dict[str, torch.Tensor] = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(model, "text_model"):  # CLIP flattened by newer transformers
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return converted


def _fits(state: dict[str, torch.Tensor], model: Any) -> tuple[str | None, int]:
    """(the first mismatch, or None; how many layers of ``model`` the state adapts). Down (A) takes
    the layer's input features, up (B) gives its output features, and their ranks agree."""
    ranks: dict[str, dict[str, int]] = {}
    for key, tensor in state.items():
        module_name, _, which = key.rpartition(".")[0].rpartition(".")
        if which not in ("lora_A", "lora_B") or not key.endswith(".weight"):
            continue
        try:
            weight = model.get_submodule(module_name).weight
        except AttributeError:
            continue  # a layer this model lacks: peft leaves it out too
        side = 1 if which == "lora_A" else 0
        if tensor.dim() != weight.dim() or tensor.shape[side] != weight.shape[side]:
            return f"{key}: shape {tuple(tensor.shape)} for a layer of shape {tuple(weight.shape)}", 0
        ranks.setdefault(module_name, {})[which] = int(tensor.shape[1 - side])
    for module_name, rank in ranks.items():
        if len(set(rank.values())) > 1:
            return f"{module_name}: down and up of different ranks {sorted(rank.values())}", 0
    return None, len(ranks)
