"""AUTOMATIC1111's samplers, schedules, eta and CLIP skip equal diffusers' own schedulers and
``clip_skip`` for the same seed: each alone, and all of them side by side in one running set.

The expected scheduler of each A1111 name is written out here by hand, as diffusers' scheduler
overview maps A1111's names (Class.from_config(pipe.scheduler.config, **options)), so that the
server's table (schemas/samplers.py, model/schedulers.py) is checked against it, not against
itself. The cases are the ones the clients send on their defaults: webuiapi (``Euler a``, eta 1),
SillyTavern (``DDIM`` + ``normal``), Open WebUI (``DPM++ 2M`` + ``Karras``), the legacy combined
names (``DPM++ 2M Karras``), then the rest of A1111's list.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextModel

import model
from model.types import GenerationItem
from schemas.a1111 import Txt2ImgRequest
from tests.helpers.stepping import retire_float
from tests.helpers.stock import stock_image

TOLERANCE = 2 / 255
SIZE, STEPS = 64, 3
KARRAS, EXPONENTIAL = {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}
DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
DPMPP_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}


@dataclass(frozen=True)
class Case:
    """A txt2img request's sampler fields, and the diffusers scheduler and eta a user would set."""

    body: dict[str, Any]
    cls: type
    options: dict[str, Any] = field(default_factory=dict)
    eta: float = 0.0

    def __str__(self) -> str:
        return " / ".join(str(value) for value in self.body.values())


CASES = [
    # the clients' defaults
    Case({"sampler_name": "Euler a", "scheduler": "automatic", "eta": 1.0}, EulerAncestralDiscreteScheduler),
    Case({"sampler_name": "DDIM", "scheduler": "normal"}, DDIMScheduler),
    Case({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, DPMSolverMultistepScheduler, DPMPP_2M | KARRAS),
    Case({"sampler_name": "DPM++ 2M Karras"}, DPMSolverMultistepScheduler, DPMPP_2M | KARRAS),
    # eta: DDIM's own
    Case({"sampler_name": "DDIM", "eta": 1.0}, DDIMScheduler, eta=1.0),
    Case({"sampler_name": "DDIM", "scheduler": "Automatic", "eta": 0.5}, DDIMScheduler, eta=0.5),
    # Automatic is the sampler's A1111 default; Uniform the scheduler's own spacing
    Case({"sampler_name": "DPM++ 2M", "scheduler": "Automatic"}, DPMSolverMultistepScheduler,
         DPMPP_2M | KARRAS),
    Case({"sampler_name": "DPM++ 2M", "scheduler": "Uniform"}, DPMSolverMultistepScheduler, DPMPP_2M),
    Case({"sampler_name": "Euler", "scheduler": "Karras", "eta": 1.0}, EulerDiscreteScheduler, KARRAS),
    Case({"sampler_name": "Euler", "scheduler": "Exponential"}, EulerDiscreteScheduler, EXPONENTIAL),
    Case({"sampler_name": "LMS"}, LMSDiscreteScheduler),
    Case({"sampler_name": "LMS Karras"}, LMSDiscreteScheduler, KARRAS),
    Case({"sampler_name": "Heun"}, HeunDiscreteScheduler),
    Case({"sampler_name": "DPM2", "scheduler": "Karras"}, KDPM2DiscreteScheduler, KARRAS),
    Case({"sampler_name": "DPM2 a", "eta": 1}, KDPM2AncestralDiscreteScheduler),
    Case({"sampler_name": "DPM++ SDE"}, DPMSolverSDEScheduler, KARRAS),
    Case({"sampler_name": "DPM++ 2M SDE"}, DPMSolverMultistepScheduler, DPMPP_SDE | EXPONENTIAL),
    Case({"sampler_name": "DPM++ 2M SDE Karras"}, DPMSolverMultistepScheduler, DPMPP_SDE | KARRAS),
    Case({"sampler_name": "DPM++ 2S a"}, DPMSolverSinglestepScheduler, DPMPP_SDE),
    Case({"sampler_name": "PLMS"}, PNDMScheduler),
    Case({"sampler_name": "UniPC", "scheduler": "Karras"}, UniPCMultistepScheduler, KARRAS),
    Case({"sampler_name": "LCM"}, LCMScheduler),
]  # fmt: skip


@pytest.fixture(autouse=True)
def _text_model_alias(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """diffusers' clip_skip reads ``text_encoder.text_model.final_layer_norm``, which transformers
    5.6 moved onto CLIPTextModel itself: the alias lets the stock pipeline run as it did."""
    if not hasattr(CLIPTextModel, "text_model"):
        monkeypatch.setattr(CLIPTextModel, "text_model", property(lambda self: self), raising=False)
    yield


def item_of(case: Case, seed: int, **changes: Any) -> GenerationItem:
    """The engine item the A1111 route makes of the case's body."""
    body = {"prompt": "a red fox", "seed": seed, "steps": STEPS} | case.body  # sizes: the item's
    parsed = Txt2ImgRequest.model_validate(body | changes)
    item = GenerationItem(
        prompt=parsed.prompt, seed=seed, num_inference_steps=STEPS, guidance_scale=parsed.cfg_scale,
        height=SIZE, width=SIZE, scheduler=parsed.scheduler_name or "default", eta=parsed.engine_eta,
        clip_skip=parsed.clip_layers - 1,
    )  # fmt: skip
    assert item.eta == case.eta
    return item


def stock(engine: model.Engine, case: Case, item: GenerationItem) -> np.ndarray:
    """What a diffusers user gets: the case's class from the model's scheduler config."""
    c = engine.components
    pipe = StableDiffusionPipeline(**c.modules(), requires_safety_checker=False)
    options = dict(case.options)
    if case.cls is DPMSolverSDEScheduler:  # its Brownian noise is seeded by its config, not the generator
        options["noise_sampler_seed"] = item.seed
    pipe.scheduler = case.cls.from_config(c.scheduler.config, **options)
    return stock_image(pipe, item)


def engine_image(engine: model.Engine, item: GenerationItem) -> np.ndarray:
    image, _ = engine.generate_float([item])
    return image[0].permute(1, 2, 0).float().numpy()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_sampler_equals_diffusers_own_scheduler(tiny_engine: model.Engine, case: Case) -> None:
    item = item_of(case, seed=42)
    assert item.scheduler in tiny_engine.info.schedulers
    difference = np.abs(engine_image(tiny_engine, item) - stock(tiny_engine, case, item)).max()
    assert difference < TOLERANCE, f"{case}: {difference}"


def test_every_sampler_side_by_side_in_one_running_set(tiny_engine: model.Engine) -> None:
    """All the cases admitted together (Heun and DPM2 take two UNet calls per step, so they leave
    later): each image is still the one diffusers draws for it alone."""
    items = [item_of(case, seed=100 + index) for index, case in enumerate(CASES)]
    handles = tiny_engine.admit_all(items)
    with torch.inference_mode():
        while tiny_engine._running.rows:
            tiny_engine.step()
    images, _ = retire_float(tiny_engine, handles)
    for case, item, image in zip(CASES, items, images, strict=True):
        difference = np.abs(image.permute(1, 2, 0).float().numpy() - stock(tiny_engine, case, item)).max()
        assert difference < TOLERANCE, f"{case}: {difference}"


def test_clip_skip_equals_diffusers_clip_skip(tiny_engine: model.Engine) -> None:
    """A1111's CLIP_stop_at_last_layers N is diffusers' clip_skip N - 1 (the tiny text encoder has
    two layers: N = 2), alone and beside an image without it (their prompts are encoded in separate
    text-encoder calls; as in diffusers, the negative prompt is never skipped)."""
    layers, case = 2, CASES[0]
    skipped = item_of(case, seed=7, override_settings={"CLIP_stop_at_last_layers": layers})
    assert skipped.clip_skip == layers - 1
    assert item_of(case, seed=7, clip_skip=layers).clip_skip == layers - 1
    plain = replace(skipped, clip_skip=0, seed=8)
    handles = tiny_engine.admit_all([skipped, plain])
    while tiny_engine._running.rows:
        tiny_engine.step()
    images, _ = retire_float(tiny_engine, handles)
    for item, image in zip([skipped, plain], images, strict=True):
        expected = stock(tiny_engine, case, item)
        assert np.abs(image.permute(1, 2, 0).float().numpy() - expected).max() < TOLERANCE
    unskipped = replace(skipped, clip_skip=0)
    assert np.abs(engine_image(tiny_engine, skipped) - engine_image(tiny_engine, unskipped)).max() > 0


def test_a_clip_skip_beyond_the_text_encoder_is_refused(tiny_engine: model.Engine) -> None:
    layers = tiny_engine.components.text_encoder.config.num_hidden_layers
    with pytest.raises(model.InvalidRequestError, match=f"this model's text encoder has {layers} layers"):
        tiny_engine.validate_item(replace(item_of(CASES[0], seed=1), clip_skip=layers))


def test_eta_is_refused_where_the_scheduler_takes_none(tiny_engine: model.Engine) -> None:
    with pytest.raises(model.InvalidRequestError, match="only DDIM's step takes an eta"):
        tiny_engine.validate_item(replace(item_of(CASES[0], seed=1), eta=0.5))
