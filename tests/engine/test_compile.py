"""The compile path (torch.compile with inductor) runs on CPU and keeps the images; after warm-up,
items at different steps of different schedules share the captured shapes without a recompile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import model
from model.types import GenerationItem
from tests.helpers.stepping import retire_float, running_rows

pytestmark = pytest.mark.slow


def test_compiled_engine_keeps_the_images_and_fills_the_cache(tmp_path: Path) -> None:
    items = [
        GenerationItem(prompt="a quiet lake", seed=s, num_inference_steps=2, height=128, width=128)
        for s in (1, 2)
    ]
    # joins the first one step later: rows 2, then 3, padded to one bucket of 4 with two timesteps
    stepped = [
        GenerationItem(
            prompt="a quiet lake", seed=3, num_inference_steps=3, scheduler="euler", height=128, width=128
        ),
        GenerationItem(
            prompt="a red kite", seed=4, num_inference_steps=2, guidance_scale=1.0, height=128, width=128
        ),
    ]
    plain_engine = model.load("random:tiny", device="cpu")
    plain, _ = plain_engine.generate_float(items)
    plain_stepped = torch.cat([plain_engine.generate_float([one])[0] for one in stepped])
    options = model.EngineOptions(
        compile=True,
        channels_last=True,
        fuse_qkv=True,
        batch_buckets=(2,),
        compile_cache_dir=str(tmp_path / "cache"),
    )
    engine = model.load("random:tiny", device="cpu", options=options)
    assert options.unet_row_buckets == (1, 4) and options.decode_buckets == (2,)
    engine.warmup()
    compiled, _ = engine.generate_float(items)
    assert float(np.abs((compiled - plain).numpy()).mean()) < 0.01
    assert any((tmp_path / "cache").rglob("*")), "the compile cache directory stayed empty"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = engine.admit(stepped[0])
        engine.step()
        second = engine.admit(stepped[1])
        while running_rows(engine):
            engine.step()
        images, _ = retire_float(engine, [first, second])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "warm-up missed a shape"
    assert float(np.abs((torch.stack(images) - plain_stepped).numpy()).mean()) < 0.01
