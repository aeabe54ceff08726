"""GPU tier: the optimised fp16 path keeps diffusers' images. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import model
from model.types import GenerationItem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("spec", ["random:tiny", "random:sd-v1-4"])
def test_optimised_fp16_matches_the_plain_path(spec: str) -> None:
    items = [
        GenerationItem(prompt=f"prompt {i}", seed=i, num_inference_steps=10, height=512, width=512)
        for i in range(2)
    ]
    plain = model.load(spec, device="cuda", dtype="fp16")
    reference, _ = plain.generate_float(items)
    plain.close()
    fast = model.load(
        spec,
        device="cuda",
        dtype="fp16",
        options=model.EngineOptions(
            channels_last=True, fuse_qkv=True, compile=True, cuda_graphs=True, batch_buckets=(1, 2)
        ),
    )
    fast.warmup()
    images, _ = fast.generate_float(items)
    assert float(np.abs((images - reference).numpy()).mean()) < 0.01
