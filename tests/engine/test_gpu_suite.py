"""The GPU suite on CPU: its dry run goes through every stage and records it; a failing, overrunning
or stopped stage keeps what finished; the FLOPs its MFU figures use are counted, not assumed."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
STAGE_FILES = [
    "01-environment.json",
    "02-diffusers.json",
    "03-engine.json",
    "04-compiled.json",
    "05-profile.json",
    "06-deepspeed.json",
    "07-sd2.json",
    "08-images_in.json",
    "09-models.json",
    "10-tests.json",
]


def benchmark_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def suite_command(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        str(SUITE),
        "--dry-run",
        "--out",
        str(tmp_path / "out"),
        "--work",
        str(tmp_path / "work"),
        *args,
    ]


def records(out: Path) -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(out.glob("*.json"))}


@pytest.mark.slow
def test_dry_run_goes_through_every_stage_and_records_each(tmp_path: Path) -> None:
    done = subprocess.run(suite_command(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    found = records(tmp_path / "out")
    assert list(found) == STAGE_FILES  # one file per stage and nothing else: the output stays small
    status = {name: r["status"] for name, r in found.items()}
    assert status == {name: "ok" for name in STAGE_FILES} | {"06-deepspeed.json": "not_run"}, status
    assert "deepspeed" in found["06-deepspeed.json"]["reason"]
    assert found["01-environment.json"]["environment"]["torch"]
    tflop = found["02-diffusers.json"]["config"]["tflop_per_image"]
    assert tflop > 0 and found["02-diffusers.json"]["config"]["flops_source"].startswith("counted")
    for name in ("02-diffusers.json", "03-engine.json", "04-compiled.json", "07-sd2.json"):
        cases = found[name]["cases"]
        assert [c["batch_size"] for c in cases] == [1, 2], name
        for c in cases:
            assert c["images_per_s"] == pytest.approx(c["batch_size"] / c["seconds_per_batch"])
            assert c["mfu"] == pytest.approx(c["tflop_per_image"] / c["seconds_per_image"] / 790)
            assert 1 <= c["timed_runs"] <= 2 and c["peak_host_rss_gib"] > 0
    assert all(c["nonfinite_pixels"] == 0 for c in found["02-diffusers.json"]["cases"])
    for name in ("03-engine.json", "04-compiled.json"):
        assert all(c["mean_abs_diff_vs_diffusers"] < 0.01 for c in found[name]["cases"]), name
        assert found[name]["all_within_0_01"] is True
    assert found["04-compiled.json"]["config"]["options"]["cuda_graphs"] is True
    assert found["04-compiled.json"]["config"]["options"]["batch_buckets"] == [1, 2]
    profile = found["05-profile.json"]
    assert profile["config"]["variant"] in ("engine", "compiled") and profile["config"]["variant_reason"]
    assert [c["batch_size"] for c in profile["cases"]] == [1, 2]
    assert all(0 < len(c["top_kernels"]) <= 10 for c in profile["cases"])
    models = found["09-models.json"]
    assert [r["case"] for r in models["switch"]] == ["cold", "warm", "resident"]
    switch = {r["case"]: r for r in models["switch"]}
    assert switch["cold"]["load_kind"] == "load_disk" and switch["warm"]["load_kind"] == "load_host"
    assert all(switch[c]["load_s"] > 0 and switch[c]["moved_mib"] > 0 for c in ("cold", "warm"))
    assert switch["resident"]["vs_resident"] == 1.0 and switch["cold"]["vs_resident"] > 0
    runs = [(r["runner"], r["models"]) for r in models["throughput"]]
    assert runs == [(run, k) for run in ("step API", "step loop") for k in (1, 2, 4)], runs
    assert all(r["images_per_s"] > 0 and r["vs_one_model"] > 0 for r in models["throughput"])
    tests = found["10-tests.json"]
    assert tests["counts"]["failed"] == 0 and tests["counts"]["skipped"] >= 1  # needs CUDA: skipped here
    assert "| 4 | compiled | random:tiny | 2 |" in done.stdout  # the report closes the run


@pytest.mark.slow
def test_a_failing_or_overrunning_stage_is_recorded_and_the_suite_goes_on(tmp_path: Path) -> None:
    done = subprocess.run(
        suite_command(
            tmp_path,
            "--spawn",
            "exec",  # a fresh interpreter per stage, as on the GPU (the dry run forks by default)
            "--stages",
            "environment,diffusers,sd2",
            "--hang",
            "diffusers",
            "--cap",
            "diffusers=10",
            "--sd2-model",
            "random:no-such-architecture",
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    found = records(tmp_path / "out")
    assert list(found) == ["01-environment.json", "02-diffusers.json", "07-sd2.json"]
    assert found["01-environment.json"]["status"] == "ok"
    overrun = found["02-diffusers.json"]
    assert overrun["status"] == "timeout" and 9 <= overrun["wall_s"] < 30
    assert any("budget ran out" in s for s in overrun["skipped_for_time"])
    failed = found["07-sd2.json"]
    assert failed["status"] == "error" and "no-such-architecture" in failed["error"]
    assert "Traceback" in failed["traceback"]


@pytest.mark.slow
def test_a_stopped_suite_keeps_every_finished_stage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    suite = subprocess.Popen(
        suite_command(tmp_path, "--stages", "environment,diffusers,engine", "--hang", "diffusers"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "02-diffusers.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        suite.send_signal(signal.SIGTERM)  # what `timeout` does to the suite at its limit
        assert suite.wait(timeout=60) == 0
    finally:
        suite.kill()
    found = records(out)
    assert found["01-environment.json"]["status"] == "ok"
    assert found["02-diffusers.json"]["status"] == "timeout"
    assert any("suite was stopped" in s for s in found["02-diffusers.json"]["skipped_for_time"])
    assert found["03-engine.json"]["status"] == "skipped"


def test_flops_counted_on_the_meta_device_equal_the_cpu_count() -> None:
    flops = benchmark_module("flops")
    meta, cpu = flops.count("tiny", 64, "meta"), flops.count("tiny", 64, "cpu")
    for part in flops.PARTS:
        assert meta[f"{part}_tflop"] == pytest.approx(cpu[f"{part}_tflop"], rel=1e-9), part
        assert meta[f"{part}_tflop"] > 0


def test_committed_flops_are_a_fresh_count_and_near_the_published_figures() -> None:
    flops = benchmark_module("flops")
    committed = json.loads((ROOT / "benchmarks" / "results" / "flops.json").read_text())["models"]
    for arch in ("sd-v1-4", "sd-2-base"):
        fresh = flops.count(arch, 512)
        for part in flops.PARTS:
            assert committed[arch][f"{part}_tflop"] == pytest.approx(fresh[f"{part}_tflop"]), (arch, part)
    v14 = committed["sd-v1-4"]
    # published: ~1.61 TFLOP per guided step, ~2.52 per decode, ~0.16 per checker pass, ~83 per image
    assert v14["unet_guided_step_tflop"] == pytest.approx(1.61, rel=0.02)
    assert v14["vae_decode_tflop"] == pytest.approx(2.52, rel=0.02)
    assert v14["safety_checker_tflop"] == pytest.approx(0.16, rel=0.05)
    assert flops.image_tflop(v14, 50) == pytest.approx(83, rel=0.02)
    assert committed["sd-2-base"]["safety_checker_tflop"] is None
