"""Previews and early ends of the real engine (random:tiny): the linear latent-to-RGB preview is an
image of 1/8 the side in well under a millisecond, and ``finish`` makes ``retire`` decode the
latents an item has now."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import model
from model.errors import ModelLoadError
from model.options import EngineOptions
from model.stepping.preview import linear_preview
from model.types import GenerationItem
from service.settings import Settings


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


def test_a_tiny_decoder_gives_full_size_previews(tmp_path: Path) -> None:
    """SD_PREVIEW_DECODER: an AutoencoderTiny saved by diffusers' own save_pretrained (random weights)."""
    from diffusers import AutoencoderTiny

    blocks = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
    AutoencoderTiny(num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4, **blocks).save_pretrained(
        tmp_path
    )
    engine = model.load("random:tiny", device="cpu", options=EngineOptions(preview_decoder=str(tmp_path)))
    handle = engine.admit(GenerationItem("a fox", seed=5, num_inference_steps=4, height=128, width=192))
    engine.step()
    preview = engine.preview(handle)
    assert preview.shape == (128, 192, 3) and preview.dtype == np.uint8
    engine.cancel(handle)


def test_a_folder_without_a_tiny_decoder_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="SD_PREVIEW_DECODER"):
        Settings(preview_decoder=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="SD_PREVIEW_DECODER"):
        model.load("random:tiny", device="cpu", options=EngineOptions(preview_decoder=str(tmp_path)))
