"""The engine benchmark runs end to end on CPU (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_engine_benchmark_writes_side_by_side_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [
        "engine.py",
        "--model",
        "random:tiny",
        "--batch-sizes",
        "1,2",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--deepspeed",
        "--out-dir",
        str(tmp_path),
        "--tag=-test",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "benchmarks" / "engine.py"), run_name="__main__")
    assert done.value.code == 0
    report = json.loads((tmp_path / "engine-random-tiny-cpu-test.json").read_text())
    rows = report["results"]
    assert {(r["variant"], r["batch_size"]) for r in rows if "batch_size" in r} == {
        ("diffusers", 1),
        ("diffusers", 2),
        ("engine", 1),
        ("engine", 2),
    }
    for r in rows:
        if r["variant"] == "engine":
            assert r["mean_abs_diff_vs_diffusers"] < 0.01 and r["speedup_vs_diffusers"] > 0
    assert any(r.get("skipped", "").startswith("deepspeed requested, not used") for r in rows)
    assert report["meta"]["versions"]["torch"] and "command" in report["meta"]
    assert "| engine | 2 | 2 |" in (tmp_path / "engine-random-tiny-cpu-test.md").read_text()
