"""DeepSpeed-Inference kernels for Stable Diffusion (what DeepSpeed-MII applies to this model).

``deepspeed.init_inference(pipe, replace_with_kernel_inject=True)`` swaps the UNet, VAE and CLIP
text encoder for DeepSpeed's fused-kernel versions. It is only trusted after it proves itself:
at start-up its images are compared with our own path's for the same seeds; on any failure
(not installed, no CUDA, an exception, different images) we log why and fall back to our own
path on freshly loaded components, since injection may have changed the originals in place.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from model.engine import Engine
from model.loading import Components, load_components, load_safety_checker
from model.optimizations import torch_compile
from model.options import EngineOptions
from model.types import GenerationItem

log = logging.getLogger(__name__)

# Mean absolute difference in [0,1] pixel space allowed between accelerated and plain images.
MAX_MEAN_DIFFERENCE = 0.01


def _check_items(engine: Engine) -> list[GenerationItem]:
    size = engine.native_size
    return [
        GenerationItem(prompt=prompt, seed=seed, num_inference_steps=4, height=size, width=size)
        for prompt, seed in (("a photograph of an astronaut riding a horse", 11), ("", 12))
    ]


def inject_deepspeed(components: Components, dtype: torch.dtype, cuda_graphs: bool) -> Components:
    """Replace the networks of ``components`` by DeepSpeed's kernel-injected ones."""
    import deepspeed  # the optional extra `[deepspeed]`

    if components.unet.device.type != "cuda":
        raise RuntimeError("DeepSpeed's inference kernels need a CUDA device")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components.modules(), requires_safety_checker=False)
    injected: Any = deepspeed.init_inference(
        pipe, dtype=dtype, replace_with_kernel_inject=True, enable_cuda_graph=cuda_graphs
    )
    # init_inference returns an InferenceEngine wrapping the pipeline; the swapped modules live on it
    pipeline = getattr(injected, "module", injected)
    components.unet, components.vae = pipeline.unet, pipeline.vae
    components.text_encoder = pipeline.text_encoder
    return components


def load_with_deepspeed(
    spec: str,
    components: Components,
    device: torch.device,
    dtype: torch.dtype,
    options: EngineOptions,
    safety_checker: str | None,
    variant: str | None = None,
    config: str | None = None,
) -> Engine:
    """Steps: 1) reference images on our path, 2) inject, 3) compare, 4) on failure, fall back."""
    plain = Engine(components, device, dtype, options)
    checks = _check_items(plain)
    try:
        # 1) before injection touches the modules
        reference, _ = plain.generate_float(checks)
        # 2) DeepSpeed's kernels (fp16 is what its Stable Diffusion kernels are written for)
        accelerated = Engine(inject_deepspeed(components, dtype, options.cuda_graphs), device, dtype, options)
        # 3) the same images, or it is not used
        images, _ = accelerated.generate_float(checks)
        difference = float((images - reference).abs().mean())
        if not difference < MAX_MEAN_DIFFERENCE:
            raise RuntimeError(f"its images differ from the plain path's (mean difference {difference:.4f})")
    except Exception as error:  # any failure of an optional accelerator means: use our own path
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
        log.warning("DeepSpeed accelerator not used (%s); falling back to the engine's own path", reason)
        # 4) fresh components: a failed or partial injection may have modified the old ones
        del plain, components
        fresh = load_components(spec, dtype, variant, config)
        if safety_checker:
            fresh.safety_checker, fresh.feature_extractor = load_safety_checker(safety_checker, dtype)
        fresh.to(device)
        torch_compile.apply(fresh, options)
        engine = Engine(fresh, device, dtype, options)
        engine.accelerator_note = f"deepspeed requested, not used: {reason}"
        return engine
    log.info("DeepSpeed kernels verified against the plain path (mean difference %.5f)", difference)
    accelerated.accelerator = "deepspeed"
    accelerated.accelerator_note = f"deepspeed verified (mean difference {difference:.5f})"
    return accelerated
