"""Several models on one device (model/library/models.py), with weights as users bring them: a
folder saved by diffusers' own save_pretrained, a single checkpoint file converted from one, and an
inpainting model. Each image equals what diffusers draws with its model, alone or interleaved with
the other models' images, whatever was evicted or reloaded in between."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import model
from model.errors import InvalidRequestError, ModelLoadError
from model.library import scan_library
from model.library.models import ModelSet
from model.library.shared import digest
from model.types import GenerationItem, adapter_set
from tests.engine.test_images_in import SIZE, TOLERANCE, picture, reference, square_mask
from tests.helpers import loras
from tests.helpers.stepping import retire_float
from tests.helpers.weights import save_library, save_with_diffusers


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three models: ``base`` (a folder), ``single`` (one .safetensors file), ``paint`` (9 channels)."""
    root = tmp_path_factory.mktemp("library")
    save_library(root, tmp_path_factory.mktemp("src"))
    return root


def loader(spec: str, config: str | None = None) -> Any:
    return lambda share: model.load(spec, "cpu", config=config, share=share)


def model_set(
    library: Path, cap: int, host_bytes: int = 0, events: list[tuple[str, str]] | None = None
) -> ModelSet:
    entries, problems = scan_library(str(library))
    assert not problems, problems
    loaders = {entry.name: loader(entry.spec, entry.config) for entry in entries}
    first = loaders["base"](None)
    record = None if events is None else (lambda kind, name, value: events.append((kind, name)))
    return ModelSet("base", loaders, first, cap=cap, host_cache_bytes=host_bytes, events=record)


@pytest.fixture(scope="module")
def alone(library: Path) -> Iterator[dict[str, model.Engine]]:
    """Each model loaded on its own: the yardstick's components."""
    entries, _ = scan_library(str(library))
    engines = {entry.name: model.load(entry.spec, "cpu", config=entry.config) for entry in entries}
    yield engines
    for engine in engines.values():
        engine.close()


def items() -> list[GenerationItem]:
    """Text, image-to-image and inpainting items across the three models (None: the default)."""
    common: dict[str, Any] = {"height": SIZE, "width": SIZE, "guidance_scale": 7.5}
    return [
        GenerationItem("a lighthouse", seed=1, num_inference_steps=4, **common),
        GenerationItem("a lighthouse", seed=1, num_inference_steps=3, model="single", **common),
        GenerationItem("a harbour", seed=2, num_inference_steps=4, model="paint", **common),
        GenerationItem(
            "a boat", seed=3, num_inference_steps=5, model="paint", init_image=picture(3), mask=square_mask(),
            strength=0.75, **common,
        ),
        GenerationItem(
            "a boat", seed=4, num_inference_steps=4, model="single", init_image=picture(4), strength=0.6,
            **common,
        ),
        GenerationItem("a boat", seed=5, num_inference_steps=2, model="base", **common),
    ]  # fmt: skip


def assert_like_diffusers(
    alone: dict[str, model.Engine], batch: list[GenerationItem], images: list[Any]
) -> None:
    for index, (it, image) in enumerate(zip(batch, images, strict=True)):
        ours = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
        difference = np.abs(ours - reference(alone[it.model or "base"], it)).max()
        assert difference <= TOLERANCE, f"item {index} ({it.model}) differs by {difference * 255:.2f}/255"


def test_interleaved_models_step_together_and_each_image_equals_diffusers(
    library: Path, alone: dict[str, model.Engine]
) -> None:
    models = model_set(library, cap=3)
    models.ensure(["single", "paint"])
    batch = items()
    handles = models.admit_all(batch)
    finished: list[int] = []
    while len(finished) < len(handles):
        finished += models.step()  # one call steps every model's images
    owners = [models.owner(handle) for handle in handles]
    images = [retire_float(engine, [inner])[0][0] for engine, inner in owners]
    assert_like_diffusers(alone, batch, images)
    models.close()


def test_with_one_model_on_the_device_each_switch_reloads_and_images_stay_equal(
    library: Path, alone: dict[str, model.Engine]
) -> None:
    events: list[tuple[str, str]] = []
    models = model_set(library, cap=1, host_bytes=0, events=events)
    batch = items()
    results = [models.generate([it])[0].image.astype(np.float32) / 255 for it in batch]
    for index, (it, image) in enumerate(zip(batch, results, strict=True)):
        difference = np.abs(image - reference(alone[it.model or "base"], it)).max()
        assert difference <= TOLERANCE + 1 / 255, f"item {index} differs by {difference * 255:.2f}/255"
    # base, single, paint, paint, single, base: four switches, each a read from disk (no host cache)
    assert [kind for kind, _ in events].count("load_disk") == 4
    assert [name for kind, name in events if kind == "evict"] == ["base", "single", "paint", "single"]
    assert list(models.resident) == ["base"]
    models.close()


def test_an_evicted_model_comes_back_from_host_memory(library: Path) -> None:
    events: list[tuple[str, str]] = []
    models = model_set(library, cap=1, host_bytes=1 << 30, events=events)
    one = GenerationItem("x", seed=7, num_inference_steps=2, height=SIZE, width=SIZE, model="single")
    first = models.generate([one])[0].image
    models.generate([GenerationItem("x", seed=7, num_inference_steps=2, height=SIZE, width=SIZE)])
    again = models.generate([one])[0].image
    assert ("load_disk", "single") in events and ("load_host", "single") in events
    assert np.array_equal(first, again)
    models.close()


def test_components_with_the_same_weights_are_loaded_once(library: Path, tmp_path: Path) -> None:
    # a fine-tune that changed only the UNet: base's folder with another UNet
    tuned = save_with_diffusers(tmp_path / "tuned", "tiny", seed=0)
    other = save_with_diffusers(tmp_path / "other", "tiny", seed=5)
    for file in (other / "unet").iterdir():
        (tuned / "unet" / file.name).write_bytes(file.read_bytes())
    first = model.load(str(library / "base"), "cpu")
    models = ModelSet(
        "base", {"base": loader(str(library / "base")), "tuned": loader(str(tuned))}, first, cap=2
    )
    models.ensure(["tuned"])
    base, fine = models.resident["base"].components, models.resident["tuned"].components
    assert fine.vae is base.vae and fine.text_encoder is base.text_encoder
    assert fine.unet is not base.unet and digest(fine.unet) != digest(base.unet)
    models.close()


def test_a_model_that_fails_to_load_is_named_and_the_others_serve(library: Path, tmp_path: Path) -> None:
    broken = save_with_diffusers(tmp_path / "broken", "tiny", seed=3)
    first = model.load(str(library / "base"), "cpu")
    models = ModelSet(
        "base", {"base": loader(str(library / "base")), "broken": loader(str(broken))}, first, cap=2
    )
    for file in (broken / "unet").iterdir():  # broken after start-up
        if file.suffix == ".safetensors":
            file.write_bytes(b"not weights")
    assert set(models.place([], ["broken"])) == {"broken"}
    with pytest.raises(ModelLoadError, match="broken could not be loaded"):
        models.generate(
            [GenerationItem("x", seed=1, num_inference_steps=2, height=SIZE, width=SIZE, model="broken")]
        )
    ok = models.generate([GenerationItem("x", seed=1, num_inference_steps=2, height=SIZE, width=SIZE)])
    assert ok[0].image.shape == (SIZE, SIZE, 3)
    models.close()


def test_an_unknown_model_is_an_invalid_request(library: Path) -> None:
    models = model_set(library, cap=1)
    with pytest.raises(InvalidRequestError, match="no model 'nope'"):
        models.validate_item(GenerationItem("x", seed=1, model="nope"))
    with pytest.raises(InvalidRequestError, match="unknown adapter"):
        models.validate_item(GenerationItem("x", seed=1, model="single", adapters=(("style", 1.0),)))
    models.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_the_step_loop_serves_alternating_models_on_full_devices(
    library: Path, alone: dict[str, model.Engine], devices: int
) -> None:
    """The server's step loop (scheduler, lanes, loads in the background) on one or two devices
    that each hold one model: images of three models arriving in turn all finish, each equal to
    what its model draws alone (the devices drain and switch instead of starving a model)."""
    from service.runtime.batching.steploop import StepLoop
    from service.runtime.metrics import Metrics

    asks = [
        GenerationItem("a lighthouse", seed=seed, num_inference_steps=3, height=SIZE, width=SIZE, model=name)
        for seed in range(3)
        for name in (None, "single", "paint")
    ]

    async def serve() -> list[Any]:
        engines = [model_set(library, cap=1) for _ in range(devices)]
        loop = StepLoop(engines, max_batch_size=4, max_queue_items=64, metrics=Metrics())
        loop.start()
        futures = []
        try:
            for ask in asks:
                futures += loop.submit([ask])
                await asyncio.sleep(0.01)
            return list(await asyncio.wait_for(asyncio.gather(*futures), 120))
        finally:
            await loop.close()
            for engine in engines:
                engine.close()

    results = asyncio.run(serve())
    for it, result in zip(asks, results, strict=True):
        expected = alone[it.model or "base"].generate([it])[0].image
        assert np.abs(result.image.astype(int) - expected.astype(int)).max() <= 2, it


def test_adapters_belong_to_each_model_and_one_that_fits_none_is_refused_naming_it(tmp_path: Path) -> None:
    """SD_ADAPTERS with a library: each model checks every adapter against itself as it loads, so
    an adapter on another model draws what diffusers draws with that model and load_lora_weights;
    an adapter that does not fit is refused (422) naming it, whatever model it was asked with."""
    from service.runtime.batching.steploop import StepLoop
    from service.runtime.metrics import Metrics

    (tmp_path / "adapters").mkdir()
    folder = loras.adapter_folder(tmp_path / "adapters")

    def with_adapters(spec: str) -> Any:
        return lambda share: model.load(spec, "cpu", adapters=folder, share=share)

    loaders = {"base": with_adapters("random:tiny:0"), "other": with_adapters("random:tiny:1")}
    asks = [
        GenerationItem("a lighthouse", seed=4, num_inference_steps=3, height=SIZE, width=SIZE, model=name,
                       adapters=adapter_set({"style": 0.8}))
        for name in ("other", None, "other")
    ]  # fmt: skip
    broken = GenerationItem("x", seed=1, num_inference_steps=2, height=SIZE, width=SIZE, model="other",
                            adapters=adapter_set({"wrong-shape": 1.0}))  # fmt: skip

    async def serve() -> tuple[list[Any], BaseException]:
        models = ModelSet("base", loaders, loaders["base"](None), cap=1)
        loop = StepLoop([models], max_batch_size=4, max_queue_items=64, metrics=Metrics())
        loop.start()
        try:
            models.validate_item(broken)  # by name only: "other" is not loaded yet
            failed = loop.submit([broken])[0]
            drawn = list(await asyncio.wait_for(asyncio.gather(*[loop.submit([a])[0] for a in asks]), 120))
            return drawn, await asyncio.wait_for(asyncio.gather(failed, return_exceptions=True), 120)
        finally:
            await loop.close()
            models.close()

    drawn, (error,) = asyncio.run(serve())  # type: ignore[misc]
    for it, result in zip(asks, drawn, strict=True):
        expected = loras.reference(folder, dataclasses.replace(it, model=None), seed=1 if it.model else 0)
        assert loras.difference(result.image / 255, expected) <= TOLERANCE + 1 / 255, it.model
    assert isinstance(error, InvalidRequestError) and "wrong-shape" in str(error), error


def test_without_sd_model_a_librarys_first_model_is_the_default(library: Path) -> None:
    """SD_MODELS alone: the default is the library's first model by name, not the embedded random
    one, and it is known by its library name (no server path in what clients read)."""
    from service.runtime.engines import load_serving_engine
    from service.runtime.library import library_of
    from service.settings import load_settings

    settings = load_settings(models=str(library))
    engine = load_serving_engine(settings, "cpu")
    try:
        assert engine.info.name == "base" and not engine.info.random_weights
        assert isinstance(engine, ModelSet) and list(engine.loaders) == ["base", "paint", "single"]
        assert library_of(settings, engine.info.name).names == ("base", "paint", "single")
    finally:
        engine.close()
