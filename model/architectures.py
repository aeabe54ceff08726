"""Random-weight Stable Diffusion components with the published architectures.

`sd-v1-4` and `sd-2-base` match the configs of CompVis/stable-diffusion-v1-4 and
stabilityai/stable-diffusion-2-base exactly (so GPU timings taken on them hold for the real
weights); `tiny` is a small model of the same shape family for tests on CPU, and `tiny-inpaint`
the same with an inpainting UNet (9 input channels: latents, mask, masked-image latents, as
runwayml's stable-diffusion-inpainting has).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from model.errors import ModelLoadError
from model.types import ARCHITECTURES

MAX_LENGTH = 77

_CROSS_ATTN_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_CROSS_ATTN_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
# The full-size UNet both SD 1.x and 2.x share; they differ in text width and attention heads.
_UNET_FULL: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": _CROSS_ATTN_DOWN,
    "up_block_types": _CROSS_ATTN_UP,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
_VAE_FULL: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# The scheduler config both published models ship (PNDM, scaled-linear betas, epsilon prediction).
_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
_VIT_L14_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class ArchitectureConfig:
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    safety_checker: dict[str, Any] | None  # CLIPConfig kwargs: text_config, vision_config, projection_dim


CONFIGS: dict[str, ArchitectureConfig] = {
    "tiny": ArchitectureConfig(
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae={
            **_VAE_FULL,
            "block_out_channels": [16, 16, 32, 32],
            "layers_per_block": 1,
            "norm_num_groups": 16,
            "sample_size": 128,
        },
        text_encoder={
            "vocab_size": 1000,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_LENGTH,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
        },
        safety_checker={
            "text_config": {
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "vocab_size": 1000,
                "bos_token_id": 512,
                "eos_token_id": 513,
                "pad_token_id": 513,
            },
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "patch_size": 32,
                "image_size": 224,
                "projection_dim": 32,
            },
            "projection_dim": 32,
        },
    ),
    "sd-v1-4": ArchitectureConfig(
        unet={**_UNET_FULL, "cross_attention_dim": 768, "attention_head_dim": 8},
        vae=_VAE_FULL,
        text_encoder={
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": MAX_LENGTH,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        safety_checker={"text_config": {}, "vision_config": _VIT_L14_VISION, "projection_dim": 768},
    ),
    "sd-2-base": ArchitectureConfig(
        unet={
            **_UNET_FULL,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),  # head size 64 at every level
            "use_linear_projection": True,
        },
        vae={**_VAE_FULL, "sample_size": 768},
        text_encoder={  # OpenCLIP ViT-H/14 text tower, penultimate layer (23 of 24)
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "max_position_embeddings": MAX_LENGTH,
            "hidden_act": "gelu",
            "projection_dim": 512,
        },
        safety_checker=None,
    ),
}


CONFIGS["tiny-inpaint"] = ArchitectureConfig(
    unet={**CONFIGS["tiny"].unet, "in_channels": 9},
    vae=CONFIGS["tiny"].vae,
    text_encoder=CONFIGS["tiny"].text_encoder,
    safety_checker=CONFIGS["tiny"].safety_checker,
)


def _check_arch(arch: str) -> ArchitectureConfig:
    if arch not in CONFIGS:
        raise ModelLoadError(
            f"unknown random architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    return CONFIGS[arch]


def build_components(arch: str, seed: int = 0, with_safety_checker: bool = True) -> dict[str, Any]:
    """Build every pipeline component of ``arch`` with weights drawn from ``seed``.

    Steps: 1) seed torch's global generator (construction order fixes every weight),
    2) UNet, VAE, text encoder, 3) tokenizer and scheduler, 4) safety checker + feature extractor.
    """
    config = _check_arch(arch)
    tokenizer = build_clip_tokenizer()
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    # 1) everything below draws from this generator, in this order
    torch.manual_seed(seed)
    # 2) the networks
    unet = UNet2DConditionModel(**config.unet)
    vae = AutoencoderKL(**config.vae)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config.text_encoder, **special))
    # 3) tokenizer (built above, no weights) and scheduler
    scheduler = PNDMScheduler.from_config(_SCHEDULER)
    components: dict[str, Any] = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }
    # 4) the checker, where the published model has one
    if config.safety_checker is not None and with_safety_checker:
        checker_config = CLIPConfig(**config.safety_checker)
        components["safety_checker"] = StableDiffusionSafetyChecker(checker_config)
        components["feature_extractor"] = CLIPImageProcessor(
            do_resize=True,
            size={"shortest_edge": 224},
            resample=3,
            do_center_crop=True,
            crop_size={"height": 224, "width": 224},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=_CLIP_MEAN,
            image_std=_CLIP_STD,
            do_convert_rgb=True,
        )
    for module in (unet, vae, text_encoder, components["safety_checker"]):
        if module is not None:
            module.eval().requires_grad_(False)
    return components


def count_unet_parameters(arch: str) -> int:
    """Parameter count of the architecture's UNet, built on the meta device (no memory, instant)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_check_arch(arch).unet)
    return sum(p.numel() for p in unet.parameters())


# ---------------------------------------------------------------- the tokenizer
# A CLIP byte-level BPE tokenizer built locally, so random-weight models need no download. It has
# CLIP's byte alphabet (every string tokenizes; nothing is unknown) and its special tokens, but no
# learned merges: each character is a token. Timings and shapes do not depend on the merges,
# since prompts are always padded to 77 tokens.

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """CLIP's (and GPT-2's) reversible map from the 256 bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_clip_tokenizer() -> CLIPTokenizer:
    """Steps: 1) byte alphabet, 2) the same with CLIP's end-of-word suffix, 3) special tokens."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_LENGTH)
    return tokenizer
