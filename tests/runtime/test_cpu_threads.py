"""Torch's CPU threads per engine (SD_CPU_THREADS, service/runtime/engines.py): the policy as a
pure function, its setting, and that each engine's own thread, and a batch job's, runs with it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import service.runtime.engines as engines_module
import service.runtime.lifecycle as lifecycle_module
from service.runtime.engines import available_cores, cpu_threads_per_engine
from service.settings import Settings, SettingsError, load_settings
from tests.runtime.stepfakes import ThreadRecording, serve_six_images


def policy(devices: Sequence[str | None], cores: int, **settings: object) -> list[int | None]:
    return cpu_threads_per_engine(Settings(**settings), devices, cores)  # type: ignore[arg-type]


def test_auto_leaves_a_core_free_and_shares_the_rest_between_cpu_engines() -> None:
    assert policy(["cpu"], 2) == [1]  # the 2-core VM: a 2-thread team collapsed with one busy core
    assert policy([None], 16) == [15]  # no CUDA: the default device is the CPU
    assert policy(["cpu", "cpu"], 2) == [1, 1]  # never zero
    assert policy(["cpu", "cpu"], 9) == [4, 4]
    assert policy(["cpu", "cpu", "cpu"], 1) == [1, 1, 1]
    assert policy(["cpu"], 1) == [1]


def test_gpu_engines_keep_a_small_team_and_mixed_hosts_size_each_engine_by_its_device() -> None:
    assert policy(["cuda:0"], 64) == [2]
    assert policy([f"cuda:{i}" for i in range(8)], 8) == [1] * 8  # 7 spare cores for 8 engines
    assert policy(["cuda:0", "cpu"], 8) == [2, 7]


def test_a_number_wins_over_auto_and_omp_num_threads_is_respected_under_auto() -> None:
    assert policy(["cpu", "cuda:0"], 2, cpu_threads=6) == [6, 6]
    assert policy(["cpu"], 16, OMP_NUM_THREADS="3") == [None]  # torch's default then is that
    assert policy(["cpu"], 16, OMP_NUM_THREADS="3", cpu_threads=5) == [5]


@pytest.mark.parametrize("text,expected", [("auto", "auto"), (" AUTO ", "auto"), ("1", 1), ("1024", 1024)])
def test_sd_cpu_threads_takes_auto_or_a_count(
    text: str, expected: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SD_CPU_THREADS", text)
    assert load_settings().cpu_threads == expected


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "banana", "", "1025", "9" * 5000, "1e3", "²", "٣", "0x4"])
def test_a_bad_sd_cpu_threads_is_one_line_naming_the_variable(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SD_CPU_THREADS", text)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith("SD_CPU_THREADS: ") and "\n" not in message and "auto" in message


def test_available_cores_follows_the_affinity_mask() -> None:
    """taskset (the mask a container runtime or a launcher sets) is what the policy sizes from."""
    code = "from service.runtime.engines import available_cores; print(available_cores())"
    command = ["taskset", "-c", "0", sys.executable, "-c", code]
    pinned = subprocess.run(command, capture_output=True, text=True, check=False)
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.strip() == "1"
    assert 1 <= available_cores() <= (torch.get_num_threads() + 1024)


@pytest.mark.parametrize(
    "files,limit",
    [
        ({"cpu.max": "150000 100000\n"}, 1),  # a 1.5-CPU container: one thread, not a throttled two
        ({"cpu.max": "400000 100000\n"}, 4),
        ({"cpu.max": "50000 100000\n"}, 1),  # 500m
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_a_container_cpu_limit_caps_the_cores(
    files: dict[str, str], limit: int | None, tmp_path: Path
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    mask = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == (mask if limit is None else min(mask, limit))


@pytest.mark.parametrize("setting,cores,expected", [(3, 2, 3), ("auto", 7, 3), ("auto", 2, 1)])
def test_each_engine_thread_runs_load_warmup_and_steps_with_its_threads(
    setting: int | str, cores: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle_module, "load_serving_engine", lambda _, device: ThreadRecording(device))
    monkeypatch.setattr(lifecycle_module, "available_cores", lambda: cores)
    before = torch.get_num_threads()

    async def test() -> None:
        settings = Settings(model="/models/sd", devices="cpu,cpu", cpu_threads=setting)
        engines = await serve_six_images(settings)
        assert len(engines) == 2
        for engine in engines:
            assert {call for call, _ in engine.threads} >= {"load", "warmup"}
            assert engine.cpu_threads == {expected}
        threads = [{thread for _, thread in engine.threads} for engine in engines]
        assert all(len(each) == 1 for each in threads) and threads[0] != threads[1]

    asyncio.run(asyncio.wait_for(test(), 30))
    assert torch.get_num_threads() == before  # the event loop's thread (and the process) untouched


def test_a_batch_job_steps_with_the_policys_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sd-endpoint batch` steps its engine in the thread that loaded it: that thread is sized."""
    from service.batch.engine import load_job_engine
    from service.batch.params import JobParams

    monkeypatch.setattr(engines_module, "available_cores", lambda: 4)
    monkeypatch.setattr(engines_module, "load_serving_engine", lambda _, device: ThreadRecording(device))
    seen: list[int] = []

    def job() -> None:
        engine = load_job_engine(Settings(device="cpu"), JobParams())
        seen.append(torch.get_num_threads())
        engine.close()

    worker = threading.Thread(target=job)  # a fresh thread, so the test's own count stays as it is
    worker.start()
    worker.join()
    assert seen == [3]
