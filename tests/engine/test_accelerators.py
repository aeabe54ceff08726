"""The DeepSpeed accelerator is used only when it proves itself; otherwise the engine falls back."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

import model
from model.loading import Components
from model.optimizations import deepspeed_kernels as accelerators
from model.types import GenerationItem

ITEM = GenerationItem(prompt="a harbour at dawn", seed=9, num_inference_steps=2, height=128, width=128)
DEEPSPEED = model.EngineOptions(accelerator="deepspeed")


@pytest.fixture(scope="module")
def plain_image() -> np.ndarray:
    image: np.ndarray = model.load("random:tiny", device="cpu").generate([ITEM])[0].image
    return image


def test_without_deepspeed_or_cuda_it_falls_back_and_says_why(
    plain_image: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        engine = model.load("random:tiny", device="cpu", options=DEEPSPEED)
    assert engine.accelerator == "none"
    assert "deepspeed requested, not used" in engine.accelerator_note
    assert any("falling back" in record.getMessage() for record in caplog.records)
    assert np.array_equal(engine.generate([ITEM])[0].image, plain_image)


def test_an_accelerator_whose_images_differ_is_rejected_for_fresh_components(
    plain_image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    def corrupting(components: Components, dtype: torch.dtype, cuda_graphs: bool) -> Components:
        decode = components.vae.decode

        def brighter(latents: torch.Tensor, **kwargs: Any) -> Any:
            return (decode(latents, **kwargs)[0] + 0.5,)

        components.vae.decode = brighter  # modifies the originals in place, as injection does
        return components

    monkeypatch.setattr(accelerators, "inject_deepspeed", corrupting)
    engine = model.load("random:tiny", device="cpu", options=DEEPSPEED)
    assert engine.accelerator == "none" and "differ" in engine.accelerator_note
    assert np.array_equal(engine.generate([ITEM])[0].image, plain_image)


def test_an_accelerator_that_keeps_the_images_is_used(
    plain_image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    injected: list[bool] = []

    def faithful(components: Components, dtype: torch.dtype, cuda_graphs: bool) -> Components:
        injected.append(cuda_graphs)
        return components

    monkeypatch.setattr(accelerators, "inject_deepspeed", faithful)
    engine = model.load("random:tiny", device="cpu", options=DEEPSPEED)
    assert injected == [False]
    assert engine.accelerator == "deepspeed" and "verified" in engine.accelerator_note
    assert np.array_equal(engine.generate([ITEM])[0].image, plain_image)
