"""Engine-level metrics (service/runtime/metrics.py): each engine counts in its own series, made
once per engine label; the families themselves record nothing without a label."""

from __future__ import annotations

import pytest

from service.runtime.metrics import Metrics


def test_each_engine_counts_in_its_own_series_made_once() -> None:
    metrics = Metrics()
    zero, one = metrics.for_engine(0), metrics.for_engine(1)
    assert metrics.for_engine(1) is one and metrics.for_engine(0) is zero
    one.images_generated.inc(3)
    zero.step_seconds.observe(0.1)
    one.running_images.set(2)
    sample = metrics.registry.get_sample_value
    assert sample("sd_images_generated_total", {"engine": "1"}) == 3
    assert sample("sd_images_generated_total", {"engine": "0"}) == 0
    assert sample("sd_step_seconds_count", {"engine": "0"}) == 1
    assert sample("sd_step_seconds_count", {"engine": "1"}) == 0
    assert sample("sd_running_images", {"engine": "1"}) == 2
    text = metrics.exposition().decode()
    assert text.count('sd_images_generated_total{engine="1"}') == 1


@pytest.mark.parametrize("family", ["batch_size", "step_seconds", "first_step_wait", "admitted_per_step"])
def test_an_engine_family_records_nothing_without_an_engine_label(family: str) -> None:
    metrics = Metrics()
    metrics.for_engine(3)
    with pytest.raises(ValueError, match="missing label values"):
        getattr(metrics, family).observe(1)
    name = "sd_time_to_first_step_seconds" if family == "first_step_wait" else f"sd_{family}"
    assert metrics.registry.get_sample_value(f"{name}_count", {"engine": "0"}) is None  # never made
