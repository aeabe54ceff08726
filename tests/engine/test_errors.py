"""Bad input is rejected before any device work; failures surface as the engine's own errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import model
from model.types import GenerationItem

GOOD = GenerationItem(prompt="a cat", seed=1, num_inference_steps=2, height=128, width=128)


@pytest.fixture(scope="module")
def engine() -> model.Engine:
    """Its own engine: these tests patch the components (NaN weights, failing calls)."""
    return model.load("random:tiny", device="cpu")


@pytest.fixture()
def unet_calls(engine: model.Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts UNet calls, to prove that rejected input never reached the device."""
    calls: list[int] = []
    original = engine.components.unet.forward

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.components.unet, "forward", counting)
    return calls


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"height": 100}, "height must be a positive multiple of 8"),
        ({"width": 7}, "width must be a positive multiple of 8"),
        ({"guidance_scale": math.nan}, "guidance_scale must be finite"),
        ({"guidance_scale": math.inf}, "guidance_scale must be finite"),
        ({"seed": -1}, "seed must be an integer"),
        ({"scheduler": "k_heun"}, "valid schedulers: default, pndm, ddim, euler, "),
    ],
)
def test_bad_items_are_invalid_requests(
    engine: model.Engine, unet_calls: list[int], change: dict[str, object], message: str
) -> None:
    with pytest.raises(model.InvalidRequestError, match=message):
        engine.generate([dataclasses.replace(GOOD, **change)])  # type: ignore[arg-type]
    assert unet_calls == []


def test_empty_batch(engine: model.Engine, unet_calls: list[int]) -> None:
    with pytest.raises(model.InvalidRequestError, match="empty batch"):
        engine.generate([])
    assert unet_calls == []


def test_mixed_batch_keys(engine: model.Engine, unet_calls: list[int]) -> None:
    with pytest.raises(model.InvalidRequestError, match="must share steps, height, width and scheduler"):
        engine.generate([GOOD, dataclasses.replace(GOOD, num_inference_steps=3)])
    assert unet_calls == []


def test_nan_output_is_an_engine_failure_not_an_image(
    engine: model.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    bias = engine.components.vae.decoder.conv_out.bias
    monkeypatch.setattr(
        engine.components.vae.decoder.conv_out,
        "bias",
        torch.nn.Parameter(torch.full_like(bias, math.nan), requires_grad=False),
    )
    with pytest.raises(model.EngineFailure, match="NaN or Inf"):
        engine.generate([GOOD])


def test_out_of_memory_is_recognisable(engine: model.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(*args: object, **kwargs: object) -> object:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.components.unet, "forward", exhausted)
    with pytest.raises(model.EngineOutOfMemoryError):
        engine.generate([GOOD])


def test_other_kernel_errors_are_engine_failures(
    engine: model.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")

    monkeypatch.setattr(engine.components.unet, "forward", broken)
    with pytest.raises(model.EngineFailure, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        engine.generate([GOOD])


def test_unknown_dtype_and_accelerator(engine: model.Engine) -> None:
    with pytest.raises(model.InvalidRequestError, match="unknown dtype"):
        model.load("random:tiny", device="cpu", dtype="fp8")
    with pytest.raises(model.InvalidRequestError, match="unknown accelerator"):
        model.EngineOptions(accelerator="tensorrt")
