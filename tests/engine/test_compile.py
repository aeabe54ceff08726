"""The compile path (torch.compile with inductor) runs on CPU and keeps the images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import model
from model.types import GenerationItem

pytestmark = pytest.mark.slow


def test_compiled_engine_keeps_the_images_and_fills_the_cache(tmp_path: Path) -> None:
    items = [
        GenerationItem(prompt="a quiet lake", seed=s, num_inference_steps=2, height=128, width=128)
        for s in (1, 2)
    ]
    plain, _ = model.load("random:tiny", device="cpu").generate_float(items)
    options = model.EngineOptions(
        compile=True,
        channels_last=True,
        fuse_qkv=True,
        batch_buckets=(2,),
        compile_cache_dir=str(tmp_path / "cache"),
    )
    engine = model.load("random:tiny", device="cpu", options=options)
    engine.warmup()
    compiled, _ = engine.generate_float(items)
    assert float(np.abs((compiled - plain).numpy()).mean()) < 0.01
    assert any((tmp_path / "cache").rglob("*")), "the compile cache directory stayed empty"
