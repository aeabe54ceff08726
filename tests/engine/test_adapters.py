"""LoRA adapters in the engine: a folder of adapters built here (diffusers' file, the kohya layout,
broken ones) is checked at load, and every image, alone or beside images with other adapters or
none, at the same or another step, is what diffusers' load_lora_weights + set_adapters gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

import model
from model.architectures import build_components
from model.errors import InvalidRequestError
from model.types import GenerationItem, adapter_set
from tests.helpers import loras

TOLERANCE = 2 / 255
SIZE = 128
STEPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for name, seed, options in (("style", 1, {}), ("unet-only", 3, {"text_encoder": False})):
        (root / name).mkdir()
        loras.save_diffusers(root / name, seed, **options)
    loras.save_kohya(root / "kohya.safetensors", 2)
    # broken ones: a tensor of the wrong shape, names of no layer of this model, not safetensors at all
    (root / "wrong-shape").mkdir()
    loras.save_diffusers(root / "wrong-shape", 4)
    path = root / "wrong-shape" / loras.DIFFUSERS_FILE
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = torch.randn(state[key].shape[0] + 8, state[key].shape[1])
    save_file(state, str(path))
    save_file({"other_model.blocks.0.lora_A.weight": torch.ones(4, 4)}, str(root / "foreign.safetensors"))
    (root / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    (root / "notes.txt").write_text("not an adapter")
    return root


@pytest.fixture(scope="module")
def engine(folder: Path) -> model.Engine:
    return model.load("random:tiny", adapters=folder)


def item(prompt: str, seed: int, adapters: dict[str, float] | None = None, **options: Any) -> GenerationItem:
    fields = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "guidance_scale": 7.5, **options}
    return GenerationItem(prompt, seed=seed, adapters=adapter_set(adapters), **fields)


def reference(folder: Path, it: GenerationItem) -> np.ndarray:
    """What a diffusers user gets: the same weights, load_lora_weights and set_adapters."""
    pipe = StableDiffusionPipeline(**build_components("tiny", 0), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for name, _ in it.adapters:
        path = (
            folder / name / loras.DIFFUSERS_FILE
            if (folder / name).is_dir()
            else folder / f"{name}.safetensors"
        )
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    if it.adapters:
        pipe.set_adapters([n for n, _ in it.adapters], adapter_weights=[s for _, s in it.adapters])
    out = pipe(
        it.prompt,
        num_inference_steps=it.num_inference_steps,
        guidance_scale=it.guidance_scale,
        height=it.height,
        width=it.width,
        generator=torch.Generator("cpu").manual_seed(it.seed),
        output_type="np",
    )
    image: np.ndarray = out.images[0]
    return image


def test_good_adapters_serve_and_broken_ones_are_named(engine: model.Engine) -> None:
    assert engine.info.adapters == ("kohya", "style", "unet-only")
    assert set(engine.adapters.broken) == {"wrong-shape", "foreign", "garbage"}
    # the kohya file's text-encoder layers landed too: they change the images
    layers = engine.adapters._pipeline().get_list_adapters()
    assert "kohya" in layers["text_encoder"] and "style" in layers["text_encoder"]
    assert "unet-only" not in layers["text_encoder"]
    with pytest.raises(InvalidRequestError, match=r"adapter wrong-shape could not be loaded: .*does not fit"):
        engine.validate_item(item("x", 1, {"wrong-shape": 1.0}))
    with pytest.raises(InvalidRequestError, match=r"foreign could not be loaded: .*no LoRA layer"):
        engine.validate_item(item("x", 1, {"foreign": 1.0}))
    for name in ("nope", "STYLE", "style.safetensors", "../style"):
        with pytest.raises(InvalidRequestError, match="unknown adapter"):
            engine.validate_item(item("x", 1, {name: 1.0}))
    for scale in (float("nan"), float("inf"), -float("inf"), 2.5, -3.0, 1e300):
        with pytest.raises(InvalidRequestError, match="scale must be"):
            engine.validate_item(item("x", 1, {"style": scale}))
    with pytest.raises(InvalidRequestError, match="at most 4 adapters"):
        engine.validate_item(item("x", 1, {"style": 1, "kohya": 1, "unet-only": 1, "a": 1, "b": 1}))


def test_images_beside_other_adapters_match_diffusers(engine: model.Engine, folder: Path) -> None:
    items = [
        item("a castle on a hill", 11, {"style": 0.8, "kohya": 1.0}),
        item("a castle on a hill", 11),
        item("a red boat", 12, {"kohya": -0.5}),
        item("a red boat", 13, {"unet-only": 1.5}, guidance_scale=1.0),
    ]
    images, _ = engine.generate_float(items)
    for index, it in enumerate(items):
        ours = images[index].permute(1, 2, 0).numpy()
        assert loras.difference(ours, reference(folder, it)) < TOLERANCE, f"item {index} differs"
    # the adapters change the image, so the comparison above means something
    assert loras.difference(images[0].numpy(), images[1].numpy()) > 0.1
    alone, _ = engine.generate_float(items[:1])
    assert loras.difference(alone[0].numpy(), images[0].numpy()) < 1e-5


def test_items_joining_mid_run_beside_other_adapters_match(engine: model.Engine, folder: Path) -> None:
    first, second = item("a fox", 21, {"style": 1.2}), item("a fox", 22)
    third = item("a fox", 23, {"kohya": 0.7}, height=64, width=64)
    handles = [engine.admit(first)]
    engine.step()
    handles.append(engine.admit(second))
    engine.step()
    handles.append(engine.admit(third))
    while engine.running_rows:
        engine.step()
    images, _ = engine.retire_float(handles)
    for image, it in zip(images, (first, second, third), strict=True):
        assert loras.difference(image.permute(1, 2, 0).numpy(), reference(folder, it)) < TOLERANCE
