"""AUTOMATIC1111's web UI API (``/sdapi/*``): txt2img's and img2img's request to an Ask (img2img's
picture is prepared as A1111 does: service/web/clients/a1111_images.py), the ``info`` of its answer,
and its error body (``detail``, FastAPI's field, which its clients show)."""

from __future__ import annotations

import json
import time
from typing import Any

from model.types import ModelInfo
from schemas.a1111 import Txt2ImgRequest
from schemas.samplers import AUTOMATIC
from service.runtime.items import Ask, Prompt
from service.runtime.protocols.common import FieldError

PREFIX = "/sdapi/"
CHECKPOINT_FIELD = "override_settings.sd_model_checkpoint"


def a1111_ask(request: Txt2ImgRequest, info: ModelInfo) -> Ask:
    """``POST /sdapi/v1/txt2img``: batch_size x n_iter images of one prompt; seed -1 draws one."""
    scheduler = request.scheduler_name
    if scheduler is not None and scheduler not in info.schedulers:  # a sampler without that schedule
        raise FieldError(
            f"sampler_name: {request.sampler_label} runs here with the schedules GET /sdapi/v1/samplers "
            "lists in its options; send one of those as scheduler (or Automatic)",
            param="sampler_name",
        )
    return Ask(
        prompts=(Prompt(request.prompt, request.negative_prompt),),
        steps=request.steps,
        guidance=request.cfg_scale,
        per_prompt=request.images,
        seed=request.seed if request.seed >= 0 else None,
        height=request.height,
        width=request.width,
        scheduler=scheduler,
        adapters=request.adapters,
        eta=request.engine_eta,
        clip_skip=request.clip_layers - 1,  # A1111's 1 (the last layer) is diffusers' 0
        model=checkpoint_name(request.checkpoint or "") or None,  # None: the caller's (POST /options)
        model_field=CHECKPOINT_FIELD,
    )


def checkpoint_name(title: str) -> str:
    """A checkpoint's title as clients send it back, "name [hash]", without its hash: the model's
    name (or its file's, "name.safetensors", which the library resolves too)."""
    return title.split(" [", 1)[0].strip()


def a1111_info(
    parsed: Txt2ImgRequest, seeds: list[int], model: str, flags: list[bool | None]
) -> dict[str, Any]:
    """A1111's ``info`` (sent as a JSON string): what was drawn, with every image's seed."""
    sampler = parsed.sampler_label or "Default"
    return {
        "prompt": parsed.prompt,
        "all_prompts": [parsed.prompt] * len(seeds),
        "negative_prompt": parsed.negative_prompt,
        "all_negative_prompts": [parsed.negative_prompt] * len(seeds),
        "seed": seeds[0] if seeds else parsed.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": parsed.width,
        "height": parsed.height,
        "sampler_name": sampler,
        "scheduler": parsed.scheduler or AUTOMATIC,
        "cfg_scale": parsed.cfg_scale,
        "steps": parsed.steps,
        "batch_size": parsed.batch_size,
        "n_iter": parsed.n_iter,
        "restore_faces": False,
        "sd_model_name": model,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": getattr(parsed, "denoising_strength", None),
        "clip_skip": parsed.clip_layers,
        "eta": parsed.eta,
        "index_of_first_image": 0,
        "infotexts": [
            f"{parsed.prompt}\nNegative prompt: {parsed.negative_prompt}\nSteps: {parsed.steps}, "
            f"Sampler: {sampler}, CFG scale: {parsed.cfg_scale:g}, Seed: {seed}, "
            f"Size: {parsed.width}x{parsed.height}, Model: {model}"
            for seed in seeds
        ],
        "nsfw_content_detected": flags,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "is_using_inpainting_conditioning": False,
    }


def answer(images: list[str], parameters: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """``{images, parameters, info}``, ``info`` a JSON string as A1111 sends it."""
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def owns(path: str, method: str) -> bool:
    return path.startswith(PREFIX)


def a1111_error(status: int, code: str, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
    return status, {"error": code, "detail": message, "errors": message}
