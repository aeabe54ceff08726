"""Admission: prompts encoded (the empty negative once per engine), then each item's own
scheduler, generator and initial noise, as the pipeline prepares them for one image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from model.schedulers import make_scheduler
from model.stepping.item import ItemState, step_kwargs
from model.types import GenerationItem


class PromptEncoder:
    """CLIP text embeddings; the empty negative prompt (by far the most common) is cached."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._empty_negative: torch.Tensor | None = None

    def encode(self, components: Any, texts: list[str]) -> torch.Tensor:
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
        out: torch.Tensor = components.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return out.to(self.dtype)

    def encode_negatives(self, components: Any, negatives: list[str]) -> torch.Tensor:
        if all(n == "" for n in negatives):
            if self._empty_negative is None:
                self._empty_negative = self.encode(components, [""])
            return self._empty_negative.expand(len(negatives), -1, -1)
        return self.encode(components, negatives)


def admit_items(
    components: Any,
    prompts: PromptEncoder,
    items: Sequence[GenerationItem],
    handles: Sequence[int],
    vae_scale_factor: int,
) -> list[ItemState]:
    """New running states for validated items: one text-encoder call for all their prompts and
    one for the negatives of the guided ones (diffusers concatenates [negative, prompt])."""
    device, dtype = prompts.device, prompts.dtype
    positive = prompts.encode(components, [item.prompt for item in items])
    guided = [index for index, item in enumerate(items) if item.guidance_scale > 1]
    negatives = (
        prompts.encode_negatives(components, [items[index].negative_prompt for index in guided])
        if guided
        else None
    )
    negative_of = {index: row for row, index in enumerate(guided)}
    states = []
    for index, (item, handle) in enumerate(zip(items, handles, strict=True)):
        embeds = positive[index : index + 1]
        if negatives is not None and index in negative_of:
            row = negative_of[index]
            embeds = torch.cat([negatives[row : row + 1], embeds])
        scheduler = make_scheduler(components.scheduler, item.scheduler)
        scheduler.set_timesteps(item.num_inference_steps, device=device)
        generator = torch.Generator(device=device).manual_seed(item.seed)
        shape = (
            1,
            components.unet.config.in_channels,
            item.height // vae_scale_factor,
            item.width // vae_scale_factor,
        )
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        states.append(
            ItemState(
                handle=handle,
                item=item,
                scheduler=scheduler,
                generator=generator,
                latents=noise * scheduler.init_noise_sigma,
                embeds=embeds,
                unet_timesteps=scheduler.timesteps.to("cpu", torch.float32).tolist(),
                step_kwargs=step_kwargs(scheduler, generator),
            )
        )
    return states
