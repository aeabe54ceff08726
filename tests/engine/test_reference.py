"""The engine's images equal diffusers' StableDiffusionPipeline's, alone and in mixed batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import model
from model.schedulers import SCHEDULE_SEPARATOR, make_scheduler, offered_schedulers
from model.types import GenerationItem
from tests.helpers.stock import stock_image

# Every sampler with its own spacing; their schedules (Karras...) are tests/engine/test_samplers.py's.
SAMPLER_NAMES = [name for name in offered_schedulers() if SCHEDULE_SEPARATOR not in name]

STEPS = 3
SIZE = 64  # a multiple of 8 below the native 128: exercises non-native sizes too
TOLERANCE = 1e-3


@pytest.fixture()
def engine(tiny_engine: model.Engine) -> model.Engine:
    return tiny_engine


def reference_image(engine: model.Engine, item: GenerationItem) -> np.ndarray:
    """What a diffusers user gets for this item, with the same components."""
    c = engine.components
    pipe = StableDiffusionPipeline(**c.modules(), requires_safety_checker=False)
    pipe.scheduler = make_scheduler(c.scheduler, item.scheduler, item.seed)
    return stock_image(pipe, item)


def mixed_batch(scheduler: str) -> list[GenerationItem]:
    prompts = [
        "a red fox",
        "lion holding hunted deer in grass fields",
        "",
        "an astronaut riding a horse",
        "ünïcödé ✨ prompt",
        "x " * 100,
        "a bowl of fruit",
        "city at night",
    ]
    guidance = [7.5, 1.0, 3.0, 12.0, 0.0, 7.5, 1.5, 7.5]
    negatives = ["", "blurry", "", "low quality", "", "", "bad hands", ""]
    return [
        GenerationItem(
            prompt=p,
            seed=1000 + 37 * i,
            negative_prompt=n,
            num_inference_steps=STEPS,
            guidance_scale=g,
            height=SIZE,
            width=SIZE,
            scheduler=scheduler,
        )
        for i, (p, g, n) in enumerate(zip(prompts, guidance, negatives, strict=True))
    ]


@pytest.mark.parametrize("scheduler", SAMPLER_NAMES)
def test_single_item_matches_diffusers(engine: model.Engine, scheduler: str) -> None:
    item = GenerationItem(
        prompt="a photograph of an astronaut riding a horse",
        seed=42,
        negative_prompt="blurry",
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        scheduler=scheduler,
    )
    images, flags = engine.generate_float([item])
    ours = images[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - reference_image(engine, item)).max() < TOLERANCE
    assert flags == [False]


@pytest.mark.parametrize("scheduler", SAMPLER_NAMES)
def test_items_in_a_mixed_batch_match_diffusers_alone(engine: model.Engine, scheduler: str) -> None:
    items = mixed_batch(scheduler)
    images, _ = engine.generate_float(items)
    for index, item in enumerate(items):
        ours = images[index].permute(1, 2, 0).numpy()
        difference = np.abs(ours - reference_image(engine, item)).max()
        assert difference < TOLERANCE, f"item {index} ({scheduler}) differs by {difference}"


def test_seed_changes_the_image_and_repeats_exactly(engine: model.Engine) -> None:
    a, b, c = (
        GenerationItem(prompt="same", seed=s, num_inference_steps=2, height=SIZE, width=SIZE)
        for s in (1, 2, 1)
    )
    first, second, again = (engine.generate([item])[0].image for item in (a, b, c))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, second)


def test_uint8_output_is_the_rounded_float_output(engine: model.Engine) -> None:
    items = mixed_batch("default")[:3]
    floats, _ = engine.generate_float(items)
    results = engine.generate(items)
    for index, result in enumerate(results):
        expected = (floats[index].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert result.image.shape == (SIZE, SIZE, 3) and result.image.dtype == np.uint8
        assert np.abs(result.image.astype(int) - expected.astype(int)).max() <= 1
        assert result.seed == items[index].seed
