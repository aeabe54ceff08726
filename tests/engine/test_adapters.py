"""LoRA adapters in the engine: a folder of adapters built here (diffusers' file, the kohya layout,
broken ones) is checked at load, and every image, alone or beside images with other adapters or
none, at the same or another step, is what diffusers' load_lora_weights + set_adapters gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import model
from model.errors import InvalidRequestError
from model.types import GenerationItem, adapter_set
from tests.helpers import loras
from tests.helpers.stepping import retire_float, running_rows

TOLERANCE = 2 / 255
SIZE = 128
STEPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return loras.adapter_folder(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def engine(folder: Path) -> model.Engine:
    return model.load("random:tiny", adapters=folder)


def item(prompt: str, seed: int, adapters: dict[str, float] | None = None, **options: Any) -> GenerationItem:
    fields = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "guidance_scale": 7.5, **options}
    return GenerationItem(prompt, seed=seed, adapters=adapter_set(adapters), **fields)


def test_good_adapters_serve_and_broken_ones_are_named(engine: model.Engine) -> None:
    assert engine.info.adapters == ("kohya", "style", "unet-only")
    assert set(engine.adapters.broken) == {"wrong-shape", "foreign", "garbage"}
    # checked from the files' shapes: nothing is on the device before an image asks for it
    assert engine.adapters.resident == () or engine.adapters.installed
    with pytest.raises(
        InvalidRequestError, match=r"wrong-shape.*lora_B.weight: shape \(\d+, 4\) for a layer"
    ):
        engine.validate_item(item("x", 1, {"wrong-shape": 1.0}))
    engine.generate([item("x", 1, {"kohya": 1.0, "style": 0.5, "unet-only": 1.0}, num_inference_steps=1)])
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
        assert loras.difference(ours, loras.reference(folder, it)) < TOLERANCE, f"item {index} differs"
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
    while running_rows(engine):
        engine.step()
    images, _ = retire_float(engine, handles)
    for image, it in zip(images, (first, second, third), strict=True):
        assert loras.difference(image.permute(1, 2, 0).numpy(), loras.reference(folder, it)) < TOLERANCE


def test_the_empty_negative_cache_stays_bounded_whatever_scales_clients_send(engine: model.Engine) -> None:
    from model.stepping.admission import CACHED_NEGATIVES

    engine.generate([item("x", 1, num_inference_steps=1, height=64, width=64)])
    for step in range(3 * CACHED_NEGATIVES):
        engine.generate([item("x", step, {"style": step / 100}, num_inference_steps=1, height=64, width=64)])
    assert len(engine._prompts._empty_negative) <= CACHED_NEGATIVES
    assert () in engine._prompts._empty_negative


def test_adapters_load_on_first_use_least_recently_used_out(folder: Path) -> None:
    """SD_MAX_ADAPTERS=1: each image brings its adapter onto the device and pushes the last one off,
    and every image still equals diffusers'; a set larger than the cap is refused up front."""
    engine = model.load("random:tiny", adapters=folder, max_adapters=1)
    assert engine.adapters.resident == ()
    for adapters in ({"style": 0.8}, {"kohya": 1.0}, None, {"style": -0.4}, {"unet-only": 1.5}):
        it = item("a fox", 5, adapters, num_inference_steps=3, height=64, width=64)
        images, _ = engine.generate_float([it])
        ours = images[0].permute(1, 2, 0).numpy()
        assert loras.difference(ours, loras.reference(folder, it)) < TOLERANCE, adapters
        if adapters:
            assert engine.adapters.resident == tuple(adapters)
    assert (engine.adapters.installed, engine.adapters.evicted) == (4, 3)
    # peft's layers hold one adapter at a time
    assert {name for names in engine.adapters._pipeline().get_list_adapters().values() for name in names} == {
        "unet-only"
    }
    with pytest.raises(
        InvalidRequestError, match=r"asks for 2 adapters at once .* at most 1 .*SD_MAX_ADAPTERS"
    ):
        engine.validate_item(item("x", 1, {"style": 1.0, "kohya": 1.0}))


def test_an_adapter_in_use_is_not_evicted_and_a_read_waits_for_the_step_boundary(folder: Path) -> None:
    engine = model.load("random:tiny", adapters=folder, max_adapters=1)
    running = item("a fox", 6, {"style": 1.0}, num_inference_steps=3, height=64, width=64)
    handle = engine.admit(running)
    engine.step()
    waiting = (("kohya", 1.0),)
    assert not engine.adapters.ready(waiting)
    engine.adapters.request(waiting)  # read in the background; nothing changes until a boundary
    engine.install_adapters(wait=60)  # read, but style is in use: kohya waits
    assert engine.adapters.resident == ("style",)
    assert not engine.adapters.ready(waiting)  # still asked for
    while running_rows(engine):  # the waiting image asks at each boundary, as the step loop does
        assert not engine.adapters.ready(waiting)
        engine.step()
        engine.install_adapters()  # once the image has done its last step, style is free to go
    assert engine.adapters.ready(waiting)
    assert engine.adapters.resident == ("kohya",)
    images, _ = retire_float(engine, [handle])  # decoding needs no adapter
    ours = images[0].permute(1, 2, 0).numpy()
    assert loras.difference(ours, loras.reference(folder, running)) < TOLERANCE


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda path: path.write_bytes(b"\x00garbage"), "could not be read"),
        (lambda path: path.unlink(), "could not be read"),
    ],
)
def test_a_file_spoiled_after_start_up_is_refused_when_first_used_and_the_others_serve(
    folder: Path, tmp_path: Path, spoil: Any, message: str
) -> None:
    import shutil

    copy = Path(shutil.copytree(folder, tmp_path / "adapters"))
    engine = model.load("random:tiny", adapters=copy, max_adapters=2)
    spoil(copy / "style" / loras.DIFFUSERS_FILE)
    with pytest.raises(InvalidRequestError, match=f"adapter style could not be loaded: .*{message}"):
        engine.generate([item("x", 1, {"style": 1.0}, num_inference_steps=1, height=64, width=64)])
    assert "style" not in engine.info.adapters and "kohya" in engine.info.adapters
    kohya = item("x", 2, {"kohya": 1.0}, num_inference_steps=2, height=64, width=64)
    images, _ = engine.generate_float([kohya])
    assert loras.difference(images[0].permute(1, 2, 0).numpy(), loras.reference(folder, kohya)) < TOLERANCE


def test_reading_leaves_the_model_alone_until_the_engine_thread_installs(folder: Path) -> None:
    """The slow part (the file) happens off the engine thread; the module tree changes only when
    the engine installs at a step boundary, so a running image never sees a half-injected model."""
    engine = model.load("random:tiny", adapters=folder, max_adapters=2)
    wanted = (("kohya", 1.0),)
    engine.adapters.request(wanted)
    read = engine.adapters._reads["kohya"].result(timeout=60)  # read in the background thread
    assert any(key.startswith("text_encoder.") for key in read.state)  # kohya's names, converted
    modules = [name for name, _ in engine.components.unet.named_modules()]
    assert not any("lora" in name for name in modules)
    assert not engine.adapters.ready(wanted)
    engine.install_adapters()
    assert engine.adapters.ready(wanted)
    assert any("lora" in name for name, _ in engine.components.unet.named_modules())
