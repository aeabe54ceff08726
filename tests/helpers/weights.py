"""Weights as users bring them: folders written by diffusers' own ``save_pretrained`` (no marker
file, nothing of this project's), and single checkpoint files converted from them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


def save_with_diffusers(out: Path, arch: str = "tiny", seed: int = 0, **save: Any) -> Path:
    """random:<arch>:<seed>'s components, saved by ``StableDiffusionPipeline.save_pretrained``.

    ``save`` goes to save_pretrained as is (``variant="fp16"``, ...).
    """
    from diffusers import StableDiffusionPipeline

    from model.architectures import build_components

    parts = build_components(arch, seed)
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=parts["safety_checker"] is not None)
    if save.get("variant") == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=save.pop("safe_serialization", True), **save)
    return out


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# ---------------------------------------------------------------- single files (the LDM layout)
# The original Stable Diffusion releases' tensor names, written from a diffusers folder: the inverse
# of what diffusers' from_single_file converts (its own scripts/convert_diffusers_to_original_*).
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))  # fmt: skip


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str] | None = None) -> str:
    """``key`` with its prefix renamed; with ``inner``, so is the first name after a resnet's prefix."""
    for old, new in prefixes.items():
        if key.startswith(old):
            rest = key[len(old) :]
            if inner is not None and ".resnets." in old:
                name, _, tail = rest.partition(".")
                rest = f"{inner.get(name, name)}.{tail}"
            return new + rest
    return key


def _mid_resnets(diffusers: str, ldm: tuple[str, str]) -> dict[str, str]:
    """The renames of a mid block's two resnets (``diffusers`` + index to the LDM name at that index):
    the UNet's and the VAE's both have exactly two, numbered differently in the LDM layout."""
    return {f"{diffusers}{j}.": name for j, name in enumerate(ldm)}


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet's tensors under the LDM names (model.diffusion_model.*)."""
    layers = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
    }  # fmt: skip
    prefixes |= _mid_resnets("mid_block.resnets.", ("middle_block.0.", "middle_block.2."))
    for i in range(levels):
        for j in range(layers):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(layers + 1) * i + j + 1}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(layers + 1) * i + j + 1}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op."
        for j in range(layers + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(layers + 1) * i + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(layers + 1) * i + j}.1."
        has_attention = "CrossAttn" in config["up_block_types"][i]
        upsampler = f"output_blocks.{(layers + 1) * i + layers}.{2 if has_attention else 1}."
        prefixes[f"up_blocks.{i}.upsamplers.0."] = upsampler
    return {f"model.diffusion_model.{_rename(key, prefixes, _RESNET)}": value for key, value in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers VAE's tensors under the LDM names (first_stage_model.*)."""
    layers = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    prefixes: dict[str, str] = {}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        prefixes[f"{part}.conv_norm_out."] = f"{part}.norm_out."
        prefixes |= _mid_resnets(
            f"{part}.mid_block.resnets.", (f"{part}.mid.block_1.", f"{part}.mid.block_2.")
        )
    for i in range(levels):
        for j in range(layers):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        for j in range(layers + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    converted = {}
    for key, value in state.items():
        new = _rename(key, prefixes).replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in new:
            for old, ldm in _VAE_ATTENTION:
                new = new.replace(f".attn_1.{old}", f".attn_1.{ldm}")
            if new.endswith(".weight") and value.dim() == 2:  # linear in diffusers, 1x1 conv in LDM
                value = value[:, :, None, None]
        converted[f"first_stage_model.{new}"] = value
    return converted


def save_single_file(folder: Path, out: Path) -> Path:
    """The diffusers folder's UNet, VAE and (CLIP) text encoder as one LDM-layout checkpoint;
    ``.ckpt`` (a plain tensor pickle, as torch.save writes) or ``.safetensors`` by ``out``'s suffix."""
    import json

    from safetensors.torch import load_file, save_file

    def part(name: str, file: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        config = json.loads((folder / name / "config.json").read_text())
        return load_file(folder / name / file), config

    unet, unet_config = part("unet", "diffusion_pytorch_model.safetensors")
    vae, vae_config = part("vae", "diffusion_pytorch_model.safetensors")
    text, _ = part("text_encoder", "model.safetensors")
    tensors = {**unet_to_ldm(unet, unet_config), **vae_to_ldm(vae, vae_config)}
    # The releases' names: transformers.CLIPTextModel's with its text_model. wrapper (which
    # transformers 5.6 dropped from its own files).
    text = {
        key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in text.items()
    }
    tensors.update({f"cond_stage_model.transformer.{key}": value for key, value in text.items()})
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    if out.suffix == ".safetensors":
        save_file(tensors, out)
    else:
        torch.save({"state_dict": tensors, "global_step": 1}, out)
    return out


def save_library(root: Path, scratch: Path) -> Path:
    """A model library as users bring one (SD_MODELS): ``base/`` (a folder saved by diffusers,
    random:tiny:0), ``single.safetensors`` (a single file converted from random:tiny:1's folder, made
    in ``scratch``, with its configs beside it in ``single/``: a tiny UNet is no published
    architecture) and ``paint/`` (an inpainting model, random:tiny-inpaint:2)."""
    save_with_diffusers(root / "base", "tiny", seed=0)
    source = save_with_diffusers(scratch / "single", "tiny", seed=1)
    save_single_file(source, root / "single.safetensors")
    shutil.copytree(source, root / "single", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    save_with_diffusers(root / "paint", "tiny-inpaint", seed=2)
    return root
