"""The engine: a batch of generation items in, images and NSFW flags out.

It owns the denoising loop (rather than calling StableDiffusionPipeline) so that it controls
batching, per-item seeds and memory; every step keeps diffusers' math.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from model.errors import EngineError, EngineFailure, EngineOutOfMemoryError, InvalidRequestError
from model.loading import Components
from model.options import EngineOptions
from model.safety import nsfw_flags, preprocess
from model.schedulers import check_scheduler_name, make_scheduler, offered_schedulers, scheduler_name
from model.types import MAX_SEED, BatchKey, GenerationItem, GenerationResult, ModelInfo

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """Translate torch's failures into the engine's own exception types."""
    try:
        yield
    except EngineError:
        raise
    except torch.cuda.OutOfMemoryError as error:
        raise EngineOutOfMemoryError(f"device out of memory: {str(error).splitlines()[0]}") from error
    except RuntimeError as error:
        if "out of memory" in str(error).lower():
            raise EngineOutOfMemoryError(f"out of memory: {str(error).splitlines()[0]}") from error
        raise EngineFailure(f"generation failed: {str(error).splitlines()[0]}") from error


_STEP_PARAMETERS: dict[type, frozenset[str]] = {}


def _step_parameters(scheduler: Any) -> frozenset[str]:
    """The keyword arguments a scheduler's step() accepts (cached per class)."""
    cls = type(scheduler)
    if cls not in _STEP_PARAMETERS:
        _STEP_PARAMETERS[cls] = frozenset(inspect.signature(cls.step).parameters)
    return _STEP_PARAMETERS[cls]


class Engine:
    """A loaded model on one device. Not thread-safe: give it one worker."""

    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        options: EngineOptions | None = None,
    ) -> None:
        self.components = components
        self.device = device
        self.dtype = dtype
        self.options = options or EngineOptions()
        self.accelerator = "none"
        self.accelerator_note = ""
        vae_config = components.vae.config
        self.vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)
        self.native_size = int(components.unet.config.sample_size) * self.vae_scale_factor
        self._empty_negative: torch.Tensor | None = None

    # ------------------------------------------------------------------ description
    @property
    def info(self) -> ModelInfo:
        c = self.components
        return ModelInfo(
            name=c.name,
            architecture=c.architecture,
            native_height=self.native_size,
            native_width=self.native_size,
            schedulers=offered_schedulers(),
            default_scheduler=scheduler_name(c.scheduler),
            safety_checker=c.safety_checker is not None,
            device=str(self.device),
            dtype=_DTYPE_NAMES.get(self.dtype, str(self.dtype)),
            random_weights=c.random_weights,
            accelerator=self.accelerator,
        )

    # ------------------------------------------------------------------ validation
    def validate(self, items: Sequence[GenerationItem]) -> None:
        """Reject anything that cannot run, before any device work."""
        if not items:
            raise InvalidRequestError("empty batch: give at least one item")
        keys = {item.batch_key for item in items}
        if len(keys) > 1:
            raise InvalidRequestError(
                "items of one batch must share steps, height, width and scheduler; got "
                + ", ".join(str(k) for k in sorted(keys))
            )
        key = items[0].batch_key
        if not isinstance(key.num_inference_steps, int) or key.num_inference_steps < 1:
            raise InvalidRequestError(
                f"num_inference_steps must be an integer >= 1, got {key.num_inference_steps}"
            )
        for side, value in (("height", key.height), ("width", key.width)):
            if not isinstance(value, int) or value < 8 or value % 8:
                raise InvalidRequestError(f"{side} must be a positive multiple of 8, got {value}")
        check_scheduler_name(key.scheduler)
        for item in items:
            if not isinstance(item.prompt, str) or not isinstance(item.negative_prompt, str):
                raise InvalidRequestError("prompt and negative_prompt must be strings")
            if not math.isfinite(item.guidance_scale):
                raise InvalidRequestError(f"guidance_scale must be finite, got {item.guidance_scale}")
            if (
                isinstance(item.seed, bool)
                or not isinstance(item.seed, int)
                or not 0 <= item.seed <= MAX_SEED
            ):
                raise InvalidRequestError(f"seed must be an integer in [0, {MAX_SEED}], got {item.seed!r}")

    # ------------------------------------------------------------------ generation
    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        """Generate one image per item; the policy for flagged images (all black) is already applied."""
        self.validate(items)
        count = len(items)
        padded = list(items) + [items[-1]] * (self.options.bucket(count) - count)
        with _engine_errors(), torch.inference_mode():
            images, flags = self._run(padded)
            # One device-to-host copy per batch: pixels and flags travel in one uint8 buffer.
            pixels = (images[:count] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            flag_bytes = flags[:count].to(torch.uint8) if flags is not None else pixels.new_zeros(0)
            host = torch.cat([pixels.flatten(), flag_bytes]).cpu().numpy()
        pixel_count = pixels.numel()
        array = host[:pixel_count].reshape(pixels.shape)
        host_flags: list[bool | None] = (
            [bool(f) for f in host[pixel_count:]] if flags is not None else [None] * count
        )
        return [
            GenerationResult(
                image=np.ascontiguousarray(array[i]), nsfw_content_detected=host_flags[i], seed=items[i].seed
            )
            for i in range(count)
        ]

    def generate_float(self, items: Sequence[GenerationItem]) -> tuple[torch.Tensor, list[bool | None]]:
        """The same generation before 8-bit conversion: Bx3xHxW in [0,1] on the CPU (for comparisons)."""
        self.validate(items)
        with _engine_errors(), torch.inference_mode():
            images, flags = self._run(list(items))
        host_flags: list[bool | None] = flags.tolist() if flags is not None else [None] * len(items)
        return images.float().cpu(), host_flags

    def warmup(self) -> None:
        """Run the shapes requests will run, at the native size, so that compilation and CUDA-graph
        capture happen before readiness: every batch-size bucket, guided and unguided (the UNet
        sees twice the batch with guidance)."""
        compiled = self.options.compiled
        sizes = sorted(set(self.options.batch_buckets)) if compiled else [1]
        for size in sizes:
            for guidance in (7.5, 1.0) if compiled else (7.5,):
                self.generate(
                    [
                        GenerationItem(
                            prompt="warm-up",
                            seed=i,
                            num_inference_steps=2,
                            guidance_scale=guidance,
                            height=self.native_size,
                            width=self.native_size,
                        )
                        for i in range(size)
                    ]
                )

    def close(self) -> None:
        self.components = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the loop
    def _run(self, items: list[GenerationItem]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pipeline's steps, one method each: 1) encode prompts, 2) prepare the scheduler,
        3) prepare latents, 4) denoise, 5) decode, 6) safety. Returns images in [0,1] on the
        device and the flags (None without a checker)."""
        guidance = torch.tensor([item.guidance_scale for item in items], device=self.device, dtype=self.dtype)
        guided = bool((guidance > 1).any())
        embeds = self._encode_prompts(items, guided)
        scheduler = self._prepare_scheduler(items[0].batch_key)
        generators = [torch.Generator(device=self.device).manual_seed(item.seed) for item in items]
        latents = self._prepare_latents(items[0].batch_key, generators, scheduler)
        latents = self._denoise(latents, embeds, guidance, guided, scheduler, generators)
        images = self._decode(latents)
        return self._safety(images)

    def _encode_prompts(self, items: list[GenerationItem], guided: bool) -> torch.Tensor:
        """1) Text embeddings; with guidance, the negatives first, as diffusers concatenates
        [negative, prompt]."""
        embeds = self._encode([item.prompt for item in items])
        if guided:
            embeds = torch.cat([self._encode_negatives([item.negative_prompt for item in items]), embeds])
        return embeds

    def _prepare_scheduler(self, key: BatchKey) -> Any:
        """2) A fresh scheduler (they hold per-run state) with the batch's timesteps."""
        scheduler = make_scheduler(self.components.scheduler, key.scheduler)
        scheduler.set_timesteps(key.num_inference_steps, device=self.device)
        return scheduler

    def _prepare_latents(
        self, key: BatchKey, generators: list[torch.Generator], scheduler: Any
    ) -> torch.Tensor:
        """3) Each item's noise from its own generator, as the pipeline draws it for one image."""
        shape = (
            1,
            self.components.unet.config.in_channels,
            key.height // self.vae_scale_factor,
            key.width // self.vae_scale_factor,
        )
        noise = [torch.randn(shape, generator=g, device=self.device, dtype=self.dtype) for g in generators]
        latents: torch.Tensor = torch.cat(noise) * scheduler.init_noise_sigma
        return latents

    def _denoise(
        self,
        latents: torch.Tensor,
        embeds: torch.Tensor,
        guidance: torch.Tensor,
        guided: bool,
        scheduler: Any,
        generators: list[torch.Generator],
    ) -> torch.Tensor:
        """4) The denoising loop; guidance per item, off (the plain conditional prediction) where
        its scale is <= 1."""
        unet = self.components.unet
        step_params = _step_parameters(scheduler)
        step_kwargs: dict[str, Any] = {}
        if "generator" in step_params:
            step_kwargs["generator"] = generators  # ancestral samplers draw per-item noise each step
        if "eta" in step_params:
            step_kwargs["eta"] = 0.0
        g = guidance.view(-1, 1, 1, 1)
        for t in scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if guided:
                uncond, cond = noise.chunk(2)
                noise = torch.where(g > 1, uncond + g * (cond - uncond), cond)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        return latents

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """5) Latents to images in [0,1]; a non-finite pixel is an engine failure, never an image."""
        vae = self.components.vae
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        if self.options.check_finite and not bool(torch.isfinite(decoded).all()):
            raise EngineFailure("the model produced NaN or Inf values; no image was returned")
        images: torch.Tensor = (decoded / 2 + 0.5).clamp(0, 1)
        return images

    def _safety(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """6) The safety checker's flags; flagged images become exactly black."""
        c = self.components
        if c.safety_checker is None:
            return images, None
        flags = nsfw_flags(c.safety_checker, preprocess(images, c.feature_extractor))
        return images.masked_fill(flags.view(-1, 1, 1, 1), 0.0), flags

    def _encode(self, texts: list[str]) -> torch.Tensor:
        c = self.components
        tokens = c.tokenizer(
            texts,
            padding="max_length",
            max_length=c.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(c.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        out: torch.Tensor = c.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return out.to(self.dtype)

    def _encode_negatives(self, negatives: list[str]) -> torch.Tensor:
        """Negative prompts; the empty one (by far the most common) is encoded once and cached."""
        if all(n == "" for n in negatives):
            if self._empty_negative is None:
                self._empty_negative = self._encode([""])
            return self._empty_negative.expand(len(negatives), -1, -1)
        return self._encode(negatives)
