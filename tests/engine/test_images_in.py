"""Images in: the engine's image-to-image and inpainting images equal diffusers'
StableDiffusionImg2ImgPipeline's and StableDiffusionInpaintPipeline's, alone and beside
text-to-image items of other step counts in one running set, for 4- and 9-channel UNets."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image

import model
from model.errors import InvalidRequestError
from model.schedulers import make_scheduler
from model.types import GenerationItem
from tests.helpers.stepping import fail_step_once, retire_float
from tests.helpers.stock import stock_image

SIZE = 64
TOLERANCE = 2 / 255
# PNDM (the default), samplers that count their steps (begin index), ones that draw noise each
# step, second-order ones (two timesteps a step: the start is twice as far in their timesteps)
SCHEDULERS = [
    "default",
    "ddim",
    "euler",
    "euler_ancestral",
    "heun",
    "dpm2_ancestral",
    "dpmsolver++",
    "dpmsolver_sde",
    "unipc",
    "lcm",
]


@pytest.fixture(scope="module")
def inpaint_engine() -> Iterator[model.Engine]:
    engine = model.load("random:tiny-inpaint", device="cpu")
    yield engine
    engine.close()


def picture(seed: int) -> np.ndarray:
    """A smooth image with some detail (random pixels would be all high frequencies)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def square_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:48, 8:40] = 255  # off the latent grid's halves on purpose: x 8..40 is 1..5 in latents
    return mask


def item(
    seed: int, steps: int = 4, strength: float = 0.6, scheduler: str = "default", **fields: Any
) -> GenerationItem:
    return GenerationItem(
        prompt=f"a painting, seed {seed}",
        seed=seed,
        negative_prompt="blurry" if seed % 2 else "",
        num_inference_steps=steps,
        guidance_scale=7.5 if seed % 3 else 1.0,
        height=SIZE,
        width=SIZE,
        scheduler=scheduler,
        strength=strength,
        **fields,
    )


def reference(engine: model.Engine, it: GenerationItem) -> np.ndarray:
    """What a diffusers user gets for ``it`` with the same components: the pipeline its inputs pick."""
    c = engine.components
    scheduler = make_scheduler(c.scheduler, it.scheduler, it.seed)
    common: dict[str, Any] = {
        "negative_prompt": it.negative_prompt or None,
        "num_inference_steps": it.num_inference_steps,
        "guidance_scale": it.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(it.seed),
        "output_type": "np",
        "eta": it.eta,
    }
    if it.init_image is None and not engine.info.inpainting:
        pipe = StableDiffusionPipeline(**c.modules(), requires_safety_checker=False)
        pipe.scheduler = scheduler
        return stock_image(pipe, it)
    if it.mask is None and not engine.info.inpainting:
        pipe = StableDiffusionImg2ImgPipeline(**c.modules(), requires_safety_checker=False)
        pipe.scheduler = scheduler
        pipe.set_progress_bar_config(disable=True)
        assert it.init_image is not None
        picked = Image.fromarray(it.init_image)
        return np.asarray(pipe(it.prompt, image=picked, strength=it.strength, **common).images[0])
    inpaint = StableDiffusionInpaintPipeline(**c.modules(), requires_safety_checker=False)
    inpaint.scheduler = scheduler
    inpaint.set_progress_bar_config(disable=True)
    # an inpainting model's text-to-image item is an inpainting with everything repainted
    image = it.init_image if it.init_image is not None else np.zeros((it.height, it.width, 3), np.uint8)
    mask = it.mask if it.mask is not None else np.full((it.height, it.width), 255, np.uint8)
    strength = it.strength if it.init_image is not None else 1.0
    out = inpaint(
        it.prompt,
        image=Image.fromarray(image),
        mask_image=Image.fromarray(mask, mode="L"),
        height=it.height,
        width=it.width,
        strength=strength,
        **common,
    )
    return np.asarray(out.images[0])


def assert_matches(engine: model.Engine, items: list[GenerationItem]) -> None:
    images, _ = engine.generate_float(items)
    for index, it in enumerate(items):
        ours = images[index].permute(1, 2, 0).numpy()
        difference = np.abs(ours - reference(engine, it)).max()
        assert difference <= TOLERANCE, f"item {index} differs by {difference * 255:.2f}/255"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_image_to_image_matches_diffusers(tiny_engine: model.Engine, scheduler: str) -> None:
    assert_matches(tiny_engine, [item(7, scheduler=scheduler, init_image=picture(1))])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_inpainting_with_a_4_channel_unet_matches_diffusers(
    tiny_engine: model.Engine, scheduler: str
) -> None:
    it = item(8, scheduler=scheduler, init_image=picture(2), mask=square_mask(), strength=0.75)
    assert_matches(tiny_engine, [it])


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_inpainting_with_a_9_channel_unet_matches_diffusers(
    inpaint_engine: model.Engine, scheduler: str, strength: float
) -> None:
    it = item(5, scheduler=scheduler, init_image=picture(3), mask=square_mask(), strength=strength)
    assert_matches(inpaint_engine, [it])


def test_an_inpainting_model_is_recognised(inpaint_engine: model.Engine, tiny_engine: model.Engine) -> None:
    assert inpaint_engine.info.inpainting and not tiny_engine.info.inpainting


def mixed(scheduler: str) -> list[GenerationItem]:
    """Text-to-image items and images in, of different step counts and strengths."""
    return [
        item(1, steps=5, scheduler=scheduler),
        item(2, steps=4, strength=0.5, scheduler=scheduler, init_image=picture(4)),
        item(3, steps=6, strength=0.8, scheduler=scheduler, init_image=picture(5), mask=square_mask()),
        item(4, steps=3, scheduler=scheduler),
        item(5, steps=6, strength=1.0, scheduler=scheduler, init_image=picture(6), mask=square_mask()),
    ]


@pytest.mark.parametrize("scheduler", ["default", "euler_ancestral", "heun"])
def test_images_in_beside_text_items_match_diffusers(tiny_engine: model.Engine, scheduler: str) -> None:
    """One running set: the items join at different steps, run different step counts and leave
    as they finish; each equals its pipeline alone."""
    running_set(tiny_engine, mixed(scheduler))


@pytest.mark.parametrize("scheduler", ["default", "euler_ancestral", "heun"])
def test_an_inpainting_model_runs_every_kind_of_item(inpaint_engine: model.Engine, scheduler: str) -> None:
    running_set(inpaint_engine, mixed(scheduler))


def running_set(engine: model.Engine, items: list[GenerationItem]) -> None:
    """Admit the items one step apart, step them all until done, retire each as it finishes; each
    image equals its pipeline's alone."""
    running: dict[int, GenerationItem] = {}
    results: dict[int, tuple[GenerationItem, np.ndarray]] = {}
    waiting = list(items)
    while waiting or running:
        if waiting:
            it = waiting.pop(0)
            handle = engine.admit(it)
            running[handle] = it
            state = engine._running.get(handle)
            assert state is not None and state.total_steps == expected_steps(engine, it)
        for done in engine.step(only=list(running)):
            results[done] = (running.pop(done), engine.retire([done])[0].image)
    assert len(results) == len(items)
    for it, image in results.values():
        expected = (reference(engine, it) * 255).round()
        difference = np.abs(image.astype(float) - expected).max()
        assert difference <= 2, f"item seed {it.seed} differs by {difference}/255"


def expected_steps(engine: model.Engine, it: GenerationItem) -> int:
    """The UNet calls the item's pipeline makes: its scheduler's timesteps from get_timesteps' start."""
    scheduler = make_scheduler(engine.components.scheduler, it.scheduler, it.seed)
    scheduler.set_timesteps(it.num_inference_steps)
    kept = min(int(it.num_inference_steps * it.strength), it.num_inference_steps)
    runs_all = it.init_image is None
    return len(scheduler.timesteps) - (0 if runs_all else (it.num_inference_steps - kept) * scheduler.order)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"init_image": np.zeros((32, SIZE, 3), np.uint8)}, "init_image"),
        ({"init_image": np.zeros((SIZE, SIZE, 3), np.float32)}, "init_image"),
        ({"init_image": np.zeros((SIZE, SIZE), np.uint8)}, "init_image"),
        ({"init_image": picture(0), "strength": 0.0}, "strength"),
        ({"init_image": picture(0), "strength": 1.5}, "strength"),
        ({"init_image": picture(0), "strength": float("nan")}, "strength"),
        ({"init_image": picture(0), "strength": 0.1}, "strength"),  # 4 steps x 0.1: none left
        ({"mask": square_mask()}, "mask needs an init_image"),
        ({"init_image": picture(0), "mask": np.zeros((SIZE, 32), np.uint8)}, "mask"),
        ({"init_image": picture(0), "mask": np.zeros((SIZE, SIZE, 3), np.uint8)}, "mask"),
    ],
)
def test_bad_image_inputs_are_invalid_requests(
    tiny_engine: model.Engine, fields: dict[str, Any], named: str
) -> None:
    bad = dataclasses.replace(item(1), **fields)
    with pytest.raises(InvalidRequestError, match=named):
        tiny_engine.validate_item(bad)
    with pytest.raises(InvalidRequestError, match=named):
        tiny_engine.admit(bad)


def test_items_with_images_compare_and_hash_without_them() -> None:
    a = item(1, init_image=picture(0))
    b = dataclasses.replace(a, init_image=picture(1))
    assert hash(a) == hash(b) and a == b
    assert a != dataclasses.replace(a, strength=0.5)


def test_a_diffusers_folder_with_a_9_channel_unet_is_an_inpainting_model(tmp_path: Any) -> None:
    """Recognised from the UNet's config alone: a folder diffusers saved, nothing of ours in it."""
    from tests.helpers.weights import save_with_diffusers

    folder = save_with_diffusers(tmp_path / "inpaint", arch="tiny-inpaint")
    engine = model.load(str(folder), device="cpu")
    try:
        assert engine.info.inpainting
        assert engine.generate([item(3, init_image=picture(1), mask=square_mask())])[0].image.shape == (
            SIZE,
            SIZE,
            3,
        )
    finally:
        engine.close()


def test_a_failed_step_puts_images_in_back(
    tiny_engine: model.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ancestral inpainting item's scheduler fails after stepping (its generator moved on) beside
    an image-to-image item: both are restored, and both images are still diffusers'."""
    items = [
        item(
            11, steps=5, scheduler="euler_ancestral", init_image=picture(7), mask=square_mask(), strength=0.8
        ),
        item(12, steps=4, strength=0.75, init_image=picture(8)),
    ]
    expected = [reference(tiny_engine, it) for it in items]
    fail_step_once(monkeypatch, "euler_ancestral", at=2)  # at the ancestral item's second step, once
    handles = tiny_engine.admit_all(items)
    tiny_engine.step(only=handles)
    with pytest.raises(model.EngineFailure, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        tiny_engine.step(only=handles)
    done: list[int] = []
    while len(done) < len(handles):
        done += tiny_engine.step(only=handles)
    images, _ = retire_float(tiny_engine, handles)
    for image, want in zip(images, expected, strict=True):
        assert np.abs(image.permute(1, 2, 0).numpy() - want).max() <= TOLERANCE


@pytest.mark.parametrize(("engine_name", "batches"), [("tiny_engine", [3]), ("inpaint_engine", [4, 1, 1, 1])])
def test_images_admitted_together_are_encoded_in_one_pass_per_size(
    request: pytest.FixtureRequest, engine_name: str, batches: list[int]
) -> None:
    """All five items admitted at once: their images in go through the VAE encoder together (a
    9-channel model's masked images too), but for images of one colour (everything masked), which
    go alone; each image still equals its pipeline's."""
    engine: model.Engine = request.getfixturevalue(engine_name)
    vae = engine.components.vae
    encode = vae.encode
    seen: list[int] = []

    def counted(images: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(images.shape[0])
        return encode(images, *args, **kwargs)

    items = mixed("default")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vae, "encode", counted)
        handles = engine.admit_all(items)
    assert sorted(seen, reverse=True) == batches
    running = dict(zip(handles, items, strict=True))
    while running:
        for done in engine.step(only=list(running)):
            it, image = running.pop(done), engine.retire([done])[0].image
            difference = np.abs(image.astype(float) - (reference(engine, it) * 255).round()).max()
            assert difference <= 2, f"item seed {it.seed} differs by {difference}/255"
