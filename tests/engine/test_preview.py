"""Previews and early ends of the real engine (random:tiny): the linear latent-to-RGB preview is an
image of 1/8 the side in well under a millisecond, and ``finish`` makes ``retire`` decode the
latents an item has now."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import model
from model.stepping.preview import linear_preview
from model.types import GenerationItem


@pytest.fixture(scope="module")
def engine() -> model.Engine:
    return model.load("random:tiny", device="cpu")


def test_the_linear_preview_is_small_fast_and_follows_the_latents() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as an engine beside busy cores has (two wait on each other here)
    try:
        timed_preview()
    finally:
        torch.set_num_threads(threads)


def timed_preview() -> None:
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    linear_preview(latents)  # first call: kernels warm
    started = time.perf_counter()
    for _ in range(20):
        pixels = linear_preview(latents)
    assert (time.perf_counter() - started) / 20 < 1e-3
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert not np.array_equal(pixels, linear_preview(-latents))


def test_finish_ends_an_item_now_and_preview_shows_it(engine: model.Engine) -> None:
    item = GenerationItem("a fox", seed=5, num_inference_steps=30, height=128, width=128)
    handle = engine.admit(item)
    engine.step()
    preview = engine.preview(handle)
    assert preview.shape == (16, 16, 3)
    engine.finish(handle)
    assert engine.step() == []  # nothing left to step
    [early] = engine.retire([handle])
    [full] = engine.generate([item])
    assert early.image.shape == full.image.shape == (128, 128, 3)
    assert not np.array_equal(early.image, full.image)
    with pytest.raises(ValueError, match="handle"):
        engine.preview(handle)
