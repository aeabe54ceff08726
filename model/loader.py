"""Load a model spec onto a device as a ready engine (imports torch and diffusers)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.adapters import DEFAULT_MAX_RESIDENT
from model.engine import Engine
from model.errors import ModelLoadError
from model.loading import Components, load_components, load_safety_checker
from model.optimizations import torch_compile
from model.options import EngineOptions, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


def load_engine(
    spec: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    safety_checker: str | None = None,
    options: EngineOptions | None = None,
    variant: str | None = None,
    config: str | None = None,
    adapters: str | os.PathLike[str] | None = None,
    max_adapters: int | None = None,
    share: Callable[[Components], None] | None = None,
) -> Engine:
    """Load ``spec`` onto ``device`` and return a ready engine (``variant``: the weight files to
    read, ``fp16`` for ``*.fp16.safetensors``, where a folder holds several; ``config``: a diffusers
    folder or cached hub id whose configs describe a single checkpoint file; ``adapters``: a
    folder of LoRA adapters, model/adapters, at most ``max_adapters`` (default 8) on the device at once;
    ``share``: called with the components on the CPU, before the device, to swap in components other
    models of the device hold already, model/library/shared.py).

    Steps: 1) device and precision, 2) components, 3) a separately configured checker,
    4) move to the device, 5) accelerator or our own optimisations, 6) adapters.
    """
    started = time.perf_counter()
    options = options or EngineOptions()
    if adapters and (options.compiled or options.accelerator != "none"):
        # compiled code and captured graphs bake in the active LoRA layers and their scales
        raise ModelLoadError("SD_ADAPTERS does not work with SD_COMPILE, SD_CUDA_GRAPHS or accelerators yet")
    if adapters:
        # fused q/k/v projections bypass the LoRA layers peft puts on to_q, to_k and to_v
        options = dataclasses.replace(options, fuse_qkv=False)
    # 1) fp16 on CUDA, fp32 on CPU unless told otherwise
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    # 2) the components, on the CPU
    components = load_components(spec, torch_dtype, variant, config)
    # 3) a checker from elsewhere works for any model, including ones shipped without one
    if safety_checker:
        components.safety_checker, components.feature_extractor = load_safety_checker(
            safety_checker, torch_dtype
        )
    if share is not None:
        share(components)
    # 4) device
    components.to(torch_device)
    # 5) DeepSpeed kernels, verified against our own path, else our optimisations
    if options.accelerator == "deepspeed":
        from model.optimizations.deepspeed_kernels import load_with_deepspeed

        engine = load_with_deepspeed(
            spec, components, torch_device, torch_dtype, options, safety_checker, variant, config
        )
    else:
        applied = torch_compile.apply(components, options)
        engine = Engine(components, torch_device, torch_dtype, options)
        if applied:
            log.info("optimisations: %s", ", ".join(applied))
    # 6) LoRA adapters, each checked against the model as it loads
    if adapters:
        engine.adapters.load_folder(Path(adapters), max_adapters or DEFAULT_MAX_RESIDENT)
    log.info(
        "loaded %s (%s) on %s in %s in %.1f s",
        components.name,
        components.architecture,
        torch_device,
        engine.info.dtype,
        time.perf_counter() - started,
    )
    return engine
