"""Step-level batching: every item's image equals stock diffusers' for its own seed, prompt,
negative prompt, steps, guidance and scheduler, however it joined and left the running set; a
step that fails changes nothing; guided items take two UNet rows and unguided ones one.

The references come from StableDiffusionPipeline built on ``tiny_engine``'s components (read
only); the engines stepped here are loaded by this module (random:tiny, the same weights), as
some tests patch their networks. Everything runs on one thread: the tiny model's kernels are
far too small to share, and a busy machine makes a second thread much slower, not faster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import model
from model.schedulers import SCHEDULE_SEPARATOR, SCHEDULER_CLASSES, make_scheduler, offered_schedulers
from model.types import GenerationItem
from tests.engine.test_reference import reference_image
from tests.helpers.stepping import fail_step_once, retire_float, rows_of, running_rows
from tests.helpers.stepping import running as held_items

# Every sampler with its own spacing; their schedules (Karras...) are tests/engine/test_samplers.py's.
SAMPLER_NAMES = [name for name in offered_schedulers() if SCHEDULE_SEPARATOR not in name]

SIZE = 64
TOLERANCE = 1e-3
_REFERENCES: dict[GenerationItem, np.ndarray] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine() -> model.Engine:
    return model.load("random:tiny", device="cpu")


@pytest.fixture()
def reference(tiny_engine: model.Engine) -> Any:
    def image(item: GenerationItem) -> np.ndarray:
        if item not in _REFERENCES:
            _REFERENCES[item] = reference_image(tiny_engine, item)
        return _REFERENCES[item]

    return image


def item(
    seed: int, scheduler: str = "default", steps: int = 3, guidance: float = 7.5, **kw: Any
) -> GenerationItem:
    fields: dict[str, Any] = {"prompt": f"a red fox number {seed}", "height": SIZE, "width": SIZE, **kw}
    return GenerationItem(
        seed=seed, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler, **fields
    )


def unet_steps(engine: model.Engine, item: GenerationItem) -> int:
    """How many UNet passes the pipeline makes for ``item`` (PNDM makes one more than its steps)."""
    scheduler = make_scheduler(engine.components.scheduler, item.scheduler)
    scheduler.set_timesteps(item.num_inference_steps)
    return len(scheduler.timesteps)


@contextlib.contextmanager
def unet_batches(engine: model.Engine) -> Iterator[list[int]]:
    """The batch size of every UNet call made inside the block."""
    sizes: list[int] = []
    hook = engine.components.unet.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        hook.remove()


def assert_matches(
    engine: model.Engine, handles: list[int], items: list[GenerationItem], reference: Any
) -> None:
    """Retire ``handles`` together and compare each image with diffusers' for its item."""
    images, flags = retire_float(engine, handles)
    assert flags == [False] * len(items)
    for image, one in zip(images, items, strict=True):
        difference = float(np.abs(image.permute(1, 2, 0).numpy() - reference(one)).max())
        assert difference < TOLERANCE, f"{one} differs from diffusers by {difference}"


def step_until(engine: model.Engine, done: set[int], condition: Any, unet_calls: list[int]) -> None:
    """Step until ``condition()``; every step is one UNet call carrying every running row."""
    while not condition():
        rows = running_rows(engine)
        before = len(unet_calls)
        done.update(engine.step())
        assert unet_calls[before:] == [rows]


@pytest.mark.parametrize("scheduler", SAMPLER_NAMES)
def test_items_joining_and_leaving_a_running_batch_match_diffusers(
    engine: model.Engine, reference: Any, scheduler: str
) -> None:
    """A and B join at step 0 (B: another scheduler, fewer steps, no guidance); C joins in the
    middle of A; B leaves and A and C outlive it; D joins just before A finishes and outlives it;
    then E runs alone."""
    neighbour = list(SCHEDULER_CLASSES)[
        (list(offered_schedulers()).index(scheduler)) % len(SCHEDULER_CLASSES)
    ]
    a = item(11, scheduler, steps=6, negative_prompt="blurry")
    b = item(12, neighbour, steps=2, guidance=1.0, prompt="a blue bird")
    c = item(13, scheduler, steps=4, guidance=3.0)
    d = item(14, scheduler, steps=2, guidance=0.0, negative_prompt="ignored without guidance")
    for one in (a, b, c, d):
        reference(one)
    done: set[int] = set()
    with unet_batches(engine) as calls:
        ha, hb = engine.admit_all([a, b])
        assert running_rows(engine) == 3
        step_until(engine, done, lambda: len(calls) == 1, calls)
        hc = engine.admit(c)
        step_until(engine, done, lambda: hb in done, calls)
        assert hb in done and ha not in done and hc not in done
        assert_matches(engine, [hb], [b], reference)
        step_until(engine, done, lambda: len(calls) == unet_steps(engine, a) - 1, calls)
        assert ha not in done
        hd = engine.admit(d)
        step_until(engine, done, lambda: ha in done, calls)
        assert hd not in done
        step_until(engine, done, lambda: running_rows(engine) == 0, calls)
    assert done == {ha, hb, hc, hd} and held_items(engine) == 3
    assert_matches(engine, [hd, ha, hc], [d, a, c], reference)
    assert held_items(engine) == 0
    alone = item(15, scheduler, steps=2, negative_prompt="low quality")
    reference(alone)
    he = engine.admit(alone)
    while running_rows(engine):
        engine.step()
    assert_matches(engine, [he], [alone], reference)


def test_items_of_other_sizes_step_together_in_one_call_per_size(
    engine: model.Engine, reference: Any
) -> None:
    items = [
        item(21, "euler", steps=3),
        item(22, "ddim", steps=2, height=96, width=64),
        item(23, "dpmsolver++", steps=2, guidance=1.0),
        item(24, "unipc", steps=3, guidance=5.0, height=96, width=64),
    ]
    for one in items:
        reference(one)
    with unet_batches(engine) as calls:
        handles = engine.admit_all(items)
        engine.step()
        assert sorted(calls) == [3, 4]  # 64x64: 2 + 1 rows; 96x64: 2 + 2 rows
        while running_rows(engine):
            engine.step()
    assert_matches(engine, handles, items, reference)


def test_unguided_items_take_one_row_and_guided_items_two(engine: model.Engine) -> None:
    items = [item(31, guidance=1.0), item(32, guidance=0.5), item(33, guidance=1.01)]
    assert [rows_of(one) for one in items] == [1, 1, 2]
    with unet_batches(engine) as calls:
        handles = engine.admit_all(items)
        assert (running_rows(engine), held_items(engine)) == (4, 3)
        engine.step()
        assert calls == [4]
        engine.cancel(handles[2])
        engine.step()
        assert calls == [4, 2]
    for handle in handles:
        engine.cancel(handle)
    assert held_items(engine) == 0 and running_rows(engine) == 0


def test_cancel_frees_rows_at_once_and_the_others_are_unchanged(engine: model.Engine, reference: Any) -> None:
    kept, dropped = item(41, "euler_ancestral", steps=4), item(42, "euler_ancestral", steps=4)
    reference(kept)
    with unet_batches(engine) as calls:
        hk, hd = engine.admit_all([kept, dropped])
        engine.step()
        engine.cancel(hd)
        engine.cancel(hd)  # twice, and unknown handles, are no-ops
        engine.cancel(10**9)
        assert (running_rows(engine), held_items(engine)) == (2, 1)
        while running_rows(engine):
            engine.step()
        assert calls == [4, 2, 2, 2]
    with pytest.raises(ValueError, match="no item with handle"):
        engine.retire([hd])
    assert_matches(engine, [hk], [kept], reference)


class ExhaustedAbove:
    """A UNet forward that runs out of memory for more than ``rows`` rows."""

    def __init__(self, forward: Any, rows: int, error: type[Exception]) -> None:
        self.forward, self.rows, self.error, self.refused = forward, rows, error, 0

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if sample.shape[0] > self.rows:
            self.refused += 1
            raise self.error(f"CUDA out of memory. Tried to allocate {sample.shape[0]} rows")
        return self.forward(sample, *args, **kwargs)


@pytest.mark.parametrize(
    ("scheduler", "error"),
    [
        ("pndm", torch.cuda.OutOfMemoryError),
        ("dpmsolver++", model.EngineOutOfMemoryError),
        ("unipc", torch.cuda.OutOfMemoryError),
        ("euler_ancestral", model.EngineOutOfMemoryError),
    ],
)
def test_out_of_memory_inside_a_step_leaves_every_item_as_it_was(
    engine: model.Engine,
    reference: Any,
    monkeypatch: pytest.MonkeyPatch,
    scheduler: str,
    error: type[Exception],
) -> None:
    first, second = item(51, scheduler, steps=4), item(52, scheduler, steps=3, guidance=1.0)
    reference(first)
    reference(second)
    unet = engine.components.unet
    exhausted = ExhaustedAbove(unet.forward, rows=2, error=error)
    monkeypatch.setattr(unet, "forward", exhausted)
    h1 = engine.admit(first)
    engine.step()
    h2 = engine.admit(second)
    for _ in range(2):  # refused twice: a failed step is repeatable and changes nothing
        with pytest.raises(model.EngineOutOfMemoryError, match="out of memory"):
            engine.step()
    assert exhausted.refused == 2 and (held_items(engine), running_rows(engine)) == (2, 3)
    engine.cancel(h2)  # what the server does: shrink the running set, step again
    while running_rows(engine):
        engine.step()
    assert_matches(engine, [h1], [first], reference)
    h2 = engine.admit(second)  # and later admits it again from the start
    while running_rows(engine):
        engine.step()
    assert_matches(engine, [h2], [second], reference)


def test_a_failure_after_some_schedulers_stepped_puts_them_all_back(
    engine: model.Engine, reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last item's scheduler fails after stepping (its state and generator moved on) while the
    others have stepped already: all are restored, and every image is still diffusers'."""
    items = [item(61, "unipc", steps=4), item(62, "pndm", steps=3), item(63, "euler_ancestral", steps=4)]
    for one in items:
        reference(one)
    fail_step_once(monkeypatch, "euler_ancestral", at=2)  # fail at the 2nd step of the ancestral item, once
    handles = engine.admit_all(items)
    engine.step()
    with pytest.raises(model.EngineFailure, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        engine.step()
    while running_rows(engine):
        engine.step()
    assert_matches(engine, handles, items, reference)


def test_retire_only_takes_finished_items_and_a_failed_decode_keeps_them(
    engine: model.Engine, reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    short, long = item(71, "ddim", steps=1), item(72, "ddim", steps=3)
    reference(short)
    hs, hl = engine.admit_all([short, long])
    assert engine.step() == [hs]
    with pytest.raises(ValueError, match=f"item {hl} is at step 1 of 3"):
        engine.retire([hs, hl])
    with pytest.raises(ValueError, match="appears twice"):
        engine.retire([hs, hs])

    def exhausted(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(engine.components.vae, "decode", exhausted)
    with pytest.raises(model.EngineOutOfMemoryError):
        engine.retire([hs])
    monkeypatch.undo()
    assert held_items(engine) == 2
    result = engine.retire([hs])[0]
    expected = (reference(short) * 255).round()
    assert result.seed == 71 and result.image.shape == (SIZE, SIZE, 3)
    assert np.abs(result.image.astype(float) - expected).max() <= 1
    engine.cancel(hl)


def test_admission_rejects_bad_items_before_any_device_work(engine: model.Engine) -> None:
    with unet_batches(engine) as calls:
        with pytest.raises(model.InvalidRequestError, match="valid schedulers"):
            engine.admit_all([item(81), item(82, "heun:beta")])
        with pytest.raises(model.InvalidRequestError, match="guidance_scale must be finite"):
            engine.admit(item(83, guidance=float("nan")))
        assert held_items(engine) == 0 and engine.step() == [] and calls == []
    assert engine.admit_all([]) == []
    first, second = engine.admit(item(84)), engine.admit(item(85))
    assert second > first
    engine.cancel(first)
    engine.cancel(second)


def test_generate_runs_apart_from_the_running_items(engine: model.Engine, reference: Any) -> None:
    running, batch = (
        item(91, "euler", steps=3),
        [item(92, "euler", steps=2), item(93, "euler", steps=2, guidance=1)],
    )
    reference(running)
    handle = engine.admit(running)
    engine.step()
    images, _ = engine.generate_float(batch)
    for image, one in zip(images, batch, strict=True):
        assert float(np.abs(image.permute(1, 2, 0).numpy() - reference(one)).max()) < TOLERANCE
    assert (held_items(engine), running_rows(engine)) == (1, 2)
    while running_rows(engine):
        engine.step()
    assert_matches(engine, [handle], [running], reference)


def test_padding_rows_and_decodes_to_buckets_keeps_the_images(reference: Any) -> None:
    """What the compiled path does (buckets for CUDA graphs), checked without compiling."""
    padded = model.load(
        "random:tiny", device="cpu", options=model.EngineOptions(pad_to_buckets=True, batch_buckets=(1, 2))
    )
    assert padded.options.unet_row_buckets == (1, 2, 4) and padded.options.decode_buckets == (1, 2)
    items = [
        item(101, "pndm", steps=3),
        item(102, "euler", steps=2, guidance=1.0),
        item(103, "dpmsolver++", steps=2),
    ]
    for one in items:
        reference(one)
    decodes: list[int] = []
    decode = padded.components.vae.decode

    def counting_decode(latents: torch.Tensor, **kwargs: Any) -> Any:
        decodes.append(latents.shape[0])
        return decode(latents, **kwargs)

    padded.components.vae.decode = counting_decode
    with unet_batches(padded) as calls:
        handles = padded.admit_all(items[:2])
        padded.step()  # 3 rows -> one call of 4
        handles.append(padded.admit(items[2]))
        padded.step()  # 5 rows -> 4 + 1
        while running_rows(padded):
            padded.step()
    assert calls[:3] == [4, 4, 1]
    assert set(calls) <= {1, 2, 4}
    assert_matches(padded, handles, items, reference)
    assert decodes == [2, 1]  # three images: a decode of 2 and one of 1


def test_row_buckets_are_twice_the_image_buckets_unless_given() -> None:
    compiled = model.EngineOptions(cuda_graphs=True, batch_buckets=(1, 2, 4, 6))
    assert compiled.unet_row_buckets == (1, 2, 4, 8, 12) and compiled.decode_buckets == (1, 2, 4, 6)
    assert model.EngineOptions(compile=True, row_buckets=(8, 2)).unet_row_buckets == (2, 8)
    assert model.EngineOptions().unet_row_buckets is None  # plain eager calls are not padded
    with pytest.raises(model.InvalidRequestError, match="row_buckets must be positive integers"):
        model.EngineOptions(row_buckets=(0, 4))
