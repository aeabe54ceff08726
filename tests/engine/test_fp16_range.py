"""fp16 range of the random-weight models: every module's largest activation stays far below 65504.

The full-size measurement (random:sd-v1-4 and random:sd-2-base at 512x512, fp32 on the CPU, a
couple of minutes) is a script run whose result is committed; the test checks that result and
runs the same hooks live on random:tiny.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MIN_MARGIN = 100  # the largest activation must stay a hundredth of fp16's largest value, or less


def fp16_range() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "benchmarks_fp16_range", ROOT / "benchmarks" / "fp16_range.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_network_is_hooked_and_stays_far_below_the_fp16_maximum() -> None:
    result = fp16_range().measure("random:tiny", size=64, steps=2, seeds=(0, 1))
    networks = result["networks"]
    assert set(networks) == {"text_encoder", "unet", "vae", "safety_checker"}
    for name, net in networks.items():
        assert net["modules_seen"] > 5, name  # hooks fired all through the network, not just at its root
        assert math.isfinite(net["max_abs"]) and net["max_abs"] > 0, name
    assert networks["vae"]["argmax_module"].startswith(("decoder", "post_quant_conv"))  # decoding ran
    assert result["images_finite"] and result["margin_to_fp16_max"] > MIN_MARGIN


@pytest.mark.parametrize(
    ("name", "size", "steps"), [("fp16-range.json", 512, 1), ("fp16-range-64px-50steps.json", 64, 50)]
)
def test_the_full_size_random_models_have_a_wide_fp16_margin(name: str, size: int, steps: int) -> None:
    report = json.loads((RESULTS / name).read_text())
    results = {r["model"]: r for r in report["results"]}
    assert set(results) == {"random:sd-v1-4", "random:sd-2-base"}
    for spec, result in results.items():
        assert (result["size"], result["steps"]) == (size, steps)
        expected = {"text_encoder", "unet", "vae"} | (
            {"safety_checker"} if spec == "random:sd-v1-4" else set()
        )
        assert set(result["networks"]) == expected, spec
        assert result["images_finite"], spec
        for net_name, net in result["networks"].items():
            assert net["max_abs"] * MIN_MARGIN < 65504, (spec, net_name, net["max_abs"])
