"""Admission: prompts encoded (the empty negative once per engine), then each item's own
scheduler, generator and initial noise, as the pipeline prepares them for one image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from model.schedulers import make_scheduler
from model.stepping.images import (
    Inpainting,
    Moments,
    encoder_moments,
    encodes_of,
    img2img_latents,
    inpaint_latents,
    is_inpainting_unet,
    start_at,
)
from model.stepping.item import ItemState, step_kwargs
from model.types import AdapterSet, GenerationItem

Activate = Callable[[AdapterSet], None]
# Empty-negative embeddings kept, one per adapter set (scales included): a bound, as every new
# scale a client sends is a new set.
CACHED_NEGATIVES = 16


class PromptEncoder:
    """CLIP text embeddings; the empty negative prompt (by far the most common) is cached, per
    adapter set, as LoRA layers of the text encoder change it."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._empty_negative: dict[AdapterSet, torch.Tensor] = {}

    def encode(self, components: Any, texts: list[str], clip_skip: int = 0) -> torch.Tensor:
        """``clip_skip`` layers from the end: the hidden state before them through the final layer
        norm, as StableDiffusionPipeline.encode_prompt takes it."""
        tokens = components.tokenizer(
            texts,
            padding="max_length",
            max_length=components.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(components.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        ids = tokens.input_ids.to(self.device)
        if not clip_skip:
            out: torch.Tensor = components.text_encoder(ids, attention_mask=mask)[0]
            return out.to(self.dtype)
        hidden = components.text_encoder(ids, attention_mask=mask, output_hidden_states=True)[-1]
        # CLIPTextModel's final norm: under text_model before transformers 5.6, on the model after
        encoder = components.text_encoder
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        skipped: torch.Tensor = norm(hidden[-(clip_skip + 1)])
        return skipped.to(self.dtype)

    def encode_negatives(
        self, components: Any, negatives: list[str], adapters: AdapterSet = ()
    ) -> torch.Tensor:
        """The negatives' embeddings, with ``adapters`` active in the text encoder. CLIP skip never
        applies to them: StableDiffusionPipeline.encode_prompt skips layers of the prompt only."""
        if all(n == "" for n in negatives):
            if adapters not in self._empty_negative:
                if len(self._empty_negative) >= CACHED_NEGATIVES:  # the oldest other than none's
                    oldest = next(key for key in self._empty_negative if key)
                    del self._empty_negative[oldest]
                self._empty_negative[adapters] = self.encode(components, [""])
            return self._empty_negative[adapters].expand(len(negatives), -1, -1)
        return self.encode(components, negatives)


def encode_items(
    components: Any, prompts: PromptEncoder, items: Sequence[GenerationItem], activate: Activate | None
) -> list[torch.Tensor]:
    """Each item's embedding rows ([negative, prompt] guided, [prompt] not): per adapter set and
    CLIP skip, one text-encoder call for the prompts and one for the negatives of the guided items."""
    groups: dict[tuple[AdapterSet, int], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault((item.adapters, item.clip_skip), []).append(index)
    embeds: dict[int, torch.Tensor] = {}
    for (adapters, clip_skip), indices in groups.items():
        if activate is not None:
            activate(adapters)
        group = [items[index] for index in indices]
        positive = prompts.encode(components, [item.prompt for item in group], clip_skip)
        guided = [row for row, item in enumerate(group) if item.guidance_scale > 1]
        negatives = (
            prompts.encode_negatives(components, [group[row].negative_prompt for row in guided], adapters)
            if guided
            else None
        )
        negative_of = {row: position for position, row in enumerate(guided)}
        for row, index in enumerate(indices):
            own = positive[row : row + 1]
            if negatives is not None and row in negative_of:
                position = negative_of[row]
                own = torch.cat([negatives[position : position + 1], own])
            embeds[index] = own
    return [embeds[index] for index in range(len(items))]


def admit_items(
    components: Any,
    prompts: PromptEncoder,
    items: Sequence[GenerationItem],
    handles: Sequence[int],
    vae_scale_factor: int,
    activate: Activate | None = None,
) -> list[ItemState]:
    """New running states for validated items: their prompts encoded (``encode_items``;
    diffusers concatenates [negative, prompt]), then each one's scheduler and starting latents."""
    device, dtype = prompts.device, prompts.dtype
    all_embeds = encode_items(components, prompts, items, activate)
    all_encoded = _encode_images(components, items, device, dtype)
    states = []
    for item, handle, embeds, encoded in zip(items, handles, all_embeds, all_encoded, strict=True):
        scheduler = make_scheduler(components.scheduler, item.scheduler, item.seed)
        scheduler.set_timesteps(item.num_inference_steps, device=device)
        generator = torch.Generator(device=device).manual_seed(item.seed)
        start, latents, inpainting = _initial(
            components, item, scheduler, generator, (vae_scale_factor, dtype), encoded
        )
        states.append(
            ItemState(
                handle=handle,
                item=item,
                scheduler=scheduler,
                generator=generator,
                latents=latents,
                embeds=embeds,
                unet_timesteps=scheduler.timesteps[start:].to("cpu", torch.float32).tolist(),
                step_kwargs=step_kwargs(scheduler, generator, item.eta),
                start=start,
                inpainting=inpainting,
            )
        )
    return states


def _encode_images(
    components: Any, items: Sequence[GenerationItem], device: torch.device, dtype: torch.dtype
) -> list[dict[str, Moments]]:
    """Every item's image encodes (images in), one VAE encoder pass per size for all of them."""
    wanted = [encodes_of(components, item) for item in items]
    flat = [(index, kind, image) for index, each in enumerate(wanted) for kind, image in each.items()]
    if not flat:
        return [{} for _ in items]
    moments = encoder_moments(components.vae, [image for _, _, image in flat], device, dtype)
    encoded: list[dict[str, Moments]] = [{} for _ in items]
    for (index, kind, _), found in zip(flat, moments, strict=True):
        encoded[index][kind] = found
    return encoded


def _initial(
    components: Any,
    item: GenerationItem,
    scheduler: Any,
    generator: torch.Generator,
    scale_and_dtype: tuple[int, torch.dtype],
    encoded: dict[str, Moments],
) -> tuple[int, torch.Tensor, Inpainting | None]:
    """Where the item starts in its schedule, its latents there and what inpainting needs, as the
    pipeline that takes its inputs prepares them: text to image (noise), image to image, inpainting
    (with a mask, or whenever the UNet is an inpainting one: model/stepping/images.py)."""
    vae_scale_factor, dtype = scale_and_dtype
    channels = components.vae.config.latent_channels
    shape = (1, channels, item.height // vae_scale_factor, item.width // vae_scale_factor)
    if item.mask is not None or is_inpainting_unet(components.unet):
        start = start_at(
            scheduler, item.num_inference_steps, item.strength if item.init_image is not None else 1.0
        )
        latents, inpainting = inpaint_latents(
            components, item, scheduler, generator, start, shape, dtype, encoded
        )
        return start, latents, inpainting
    if item.init_image is not None:
        start = start_at(scheduler, item.num_inference_steps, item.strength)
        return start, img2img_latents(components, scheduler, generator, start, dtype, encoded), None
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    return 0, noise * scheduler.init_noise_sigma, None
