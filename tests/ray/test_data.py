"""`sd-endpoint batch --ray` (service/batch/ray_job.py) on a real Ray cluster started on 127.0.0.1 with
`ray start --head`: random:tiny actors on the CPU, local folders and Azurite, exactly once, resumed."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image

from service.batch import command
from service.batch.files.records import PREDICTION_COLUMNS
from service.cli.main import main
from tests.batch.test_resume import records
from tests.helpers.blobs import Azurite
from tests.helpers.ports import free_port

FAST = ["--model", "random:tiny", "--steps", "2", "--batch-size", "2"]
CSV = ",prompt,seed\n0,a red cat,42\n1,a blue dog,\n2,,\n3,a tree,7\n"
JSONL = '{"prompt": "the sun"}\n{"prompt": "the moon", "seed": 7}\n'
INPUTS = {"a.csv": CSV, "sub/b.jsonl": JSONL}
OK_ROWS = ["a/0", "a/1", "a/3", "sub/b/0", "sub/b/1"]  # a.csv row 2 has no prompt: a failed record
ALL_ROWS = sorted([*OK_ROWS, "a/2"])
EXPECTED_OUTPUT = sorted(
    [f"images/{row}.png" for row in OK_ROWS]
    + [f"records/{row}.json" for row in ALL_ROWS]
    + ["job.json", "predictions-detailed.csv", "predictions.csv", "summary.json"]
)
START_LIMIT_S = 120
SHUTDOWN_LIMIT_S = 60


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A one-node cluster of `ray start --head --block`, which stops its processes when terminated.

    It is started without any storage credentials in its environment: a job must bring its own.
    Like every cluster `ray start` makes, it requires Ray's token: the run's own RAY_AUTH_TOKEN
    (tests/conftest.py), which the cluster and this process's driver both read.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_STORAGE", "AWS_"))}
    env["RAY_AUTH_MODE"] = "token"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live below it
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--port", "0", "--ray-client-server-port", str(free_port()),
            "--num-cpus", "4", "--object-store-memory", str(256 * 1024**2),
            "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    seen: list[str] = []
    port = ""
    deadline = time.monotonic() + START_LIMIT_S
    while not port and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if match := re.search(r"--address='[^']*:(\d+)'", line):
            port = match.group(1)
    if not port:
        process.kill()
        raise RuntimeError("`ray start --head` did not start:\n" + "".join(seen))
    threading.Thread(target=process.stdout.read, daemon=True).start()  # a full pipe must not block it
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RAY_AUTH_MODE", "token")
            yield f"127.0.0.1:{port}"
    finally:
        ray_processes = psutil.Process(process.pid).children(recursive=True)
        # Workers first: Ray Data leaves detached actors behind, which the raylet would wait 30 s for.
        for worker in ray_processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                if worker.name().startswith("ray::"):
                    worker.terminate()
        process.terminate()
        process.wait(timeout=SHUTDOWN_LIMIT_S)
        _, alive = psutil.wait_procs(ray_processes, timeout=SHUTDOWN_LIMIT_S)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not alive, f"Ray processes left running: {[p.pid for p in alive]}"


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    for name, text in INPUTS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    """A job's output folder, not there yet: the job makes it, as it would on a fresh store."""
    return tmp_path / "out"


def batch_on_ray(*argv: str) -> int:
    """`sd-endpoint batch --ray ARGV...`, in this process (the driver)."""
    parser = argparse.ArgumentParser(prog="sd-endpoint batch")
    command.add_arguments(parser)
    return command.run(parser.parse_args(["--ray", *argv]))


def prompts_on_one_actor(ray_address: str, prompts: Path, out: Path, *options: str) -> int:
    """The prompts to ``out`` on one actor with ``options``: the jobs that are stopped early differ
    only by the option that stops them."""
    job = ["--ray-address", ray_address, "--input", str(prompts), "--output", str(out), *FAST]
    return batch_on_ray(*job, "--ray-actors", "1", *options)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def predictions(text: str) -> list[dict[str, str]]:
    """predictions-detailed.csv: every row, failed ones too, under its header."""
    return list(csv.DictReader(io.StringIO(text)))


def counts(summary: dict[str, object]) -> dict[str, object]:
    return {k: summary[k] for k in ("total", "done", "failed", "skipped", "generated", "missing", "complete")}


@pytest.mark.slow
def test_a_ray_job_over_local_files_writes_what_one_machine_writes_and_a_rerun_does_nothing_new(
    ray_address: str, prompts: Path, tmp_path: Path
) -> None:
    # 1. Two engines on the cluster: one image per ok row, one record per row, nothing else.
    out = tmp_path / "ray-out"
    seed = ["--seed", "11"]  # the job seed that the one-machine job below shares
    job = ["--ray-address", ray_address, "--input", str(prompts), "--output", str(out), *FAST, *seed]
    assert batch_on_ray(*job, "--ray-actors", "2") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert counts(summary) == {
        "total": 6, "done": 5, "failed": 1, "skipped": 0, "generated": 5, "missing": 0, "complete": True,
    }  # fmt: skip
    assert (summary["model"], summary["parameters"]["height"]) == ("random:tiny", 128)
    assert files_under(out) == EXPECTED_OUTPUT
    rows = predictions((out / "predictions-detailed.csv").read_text())
    assert [(r["input_csv_name"], r["row_number_per_file"]) for r in rows] == [
        ("a.csv", "0"), ("a.csv", "1"), ("a.csv", "2"), ("a.csv", "3"),
        ("sub/b.jsonl", "0"), ("sub/b.jsonl", "1"),
    ]  # fmt: skip
    # 2. The same job on one machine: the same predictions, row for row, and the same images.
    single = tmp_path / "single-out"
    assert main(["batch", "--input", str(prompts), "--output", str(single), *FAST, *seed]) == 0
    for table in ("predictions.csv", "predictions-detailed.csv"):
        assert (out / table).read_text() == (single / table).read_text(), table
    for row in OK_ROWS:
        with (
            Image.open(out / f"images/{row}.png") as mine,
            Image.open(single / f"images/{row}.png") as theirs,
        ):
            difference = np.abs(np.asarray(mine, dtype=int) - np.asarray(theirs, dtype=int))
            assert mine.size == (128, 128) and difference.max() <= 2, f"images/{row}.png differs"
    # 3. Again: every row is finished, so nothing is generated or rewritten.
    written = {path: (out / path).stat().st_mtime_ns for path in EXPECTED_OUTPUT if path.startswith("images")}
    assert batch_on_ray(*job) == 0
    rerun = json.loads((out / "summary.json").read_text())
    assert (rerun["skipped"], rerun["generated"], rerun["done"], rerun["failed"]) == (6, 0, 5, 1)
    assert {path: (out / path).stat().st_mtime_ns for path in written} == written
    assert files_under(out) == EXPECTED_OUTPUT


@pytest.mark.slow
def test_a_ray_job_over_azurite_writes_every_row_once_and_resumes_only_the_missing_rows(
    ray_address: str, azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    from azure.storage.blob import BlobServiceClient

    # 1. Inputs in a container; the credentials only in the driver's environment.
    for name, value in azurite.env().items():
        monkeypatch.setenv(name, value)
    container = azurite.new_container()
    blobs = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        container
    )
    for name, text in INPUTS.items():
        blobs.upload_blob(f"in/{name}", text.encode())
    job = ["--ray-address", ray_address, "--ray-actors", "2", *FAST]
    job += ["--input", f"az://{container}/in", "--output", f"az://{container}/out"]
    inputs = sorted(f"in/{name}" for name in INPUTS)
    expected = sorted(inputs + [f"out/{path}" for path in EXPECTED_OUTPUT])
    assert batch_on_ray(*job) == 0
    assert azurite.blob_names(container) == expected
    first = json.loads(blobs.download_blob("out/summary.json").readall())
    assert counts(first) == {
        "total": 6, "done": 5, "failed": 1, "skipped": 0, "generated": 5, "missing": 0, "complete": True,
    }  # fmt: skip
    # 2. As if a run had been killed before two rows were finished: their records are missing
    #    (and one image; the other row had written its image but not its record yet).
    for name in ("out/records/a/0.json", "out/images/a/0.png", "out/records/sub/b/1.json"):
        blobs.delete_blob(name)
    untouched = ("out/images/a/1.png", "out/images/a/3.png")
    kept = {name: blobs.get_blob_client(name).get_blob_properties().etag for name in untouched}
    assert batch_on_ray(*job) == 0
    # 3. Only those two rows were generated again; every row still has exactly one record.
    resumed = json.loads(blobs.download_blob("out/summary.json").readall())
    assert counts(resumed) == {
        "total": 6, "done": 5, "failed": 1, "skipped": 4, "generated": 2, "missing": 0, "complete": True,
    }  # fmt: skip
    assert azurite.blob_names(container) == expected
    assert {name: blobs.get_blob_client(name).get_blob_properties().etag for name in kept} == kept
    rows = predictions(blobs.download_blob("out/predictions-detailed.csv").readall().decode())
    assert [(r["input_csv_name"], r["row_number_per_file"], r["status"]) for r in rows] == [
        ("a.csv", "0", "ok"), ("a.csv", "1", "ok"), ("a.csv", "2", "failed"), ("a.csv", "3", "ok"),
        ("sub/b.jsonl", "0", "ok"), ("sub/b.jsonl", "1", "ok"),
    ]  # fmt: skip


@pytest.mark.slow
def test_parameters_the_model_refuses_stop_the_job_before_any_image(
    ray_address: str, prompts: Path, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert prompts_on_one_actor(ray_address, prompts, out, "--scheduler", "no-such-scheduler") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("sd-endpoint batch: error: the parameters do not suit random:tiny: ")
    assert "no-such-scheduler" in error
    assert files_under(out) == ["job.json"]


@pytest.mark.slow
def test_the_error_threshold_stops_a_ray_job(
    ray_address: str, prompts: Path, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert prompts_on_one_actor(ray_address, prompts, out, "--error-threshold", "0") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert "more than --error-threshold 0" in summary["stopped"]
    assert "run the same command again to resume" in capsys.readouterr().err


KILL_ROWS = 24


@pytest.mark.slow
def test_sigkill_of_the_driver_mid_job_then_the_same_command_gives_every_row_exactly_once(
    ray_address: str, tmp_path: Path
) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "p.csv").write_text("prompt\n" + "".join(f"prompt number {i}\n" for i in range(KILL_ROWS)))
    program = Path(sys.executable).parent / "sd-endpoint"
    job = [str(program), "batch", "--ray", "--ray-address", ray_address, "--ray-actors", "1",
           "--input", str(inputs), "--output", str(out), *FAST]  # fmt: skip
    # 1. The driver, a process of its own, killed with SIGKILL as soon as the first record lands.
    with (tmp_path / "driver.log").open("wb") as log:
        driver = subprocess.Popen(job, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_LIMIT_S
            while not records(out) and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()
            os.kill(driver.pid, signal.SIGKILL)
        finally:
            driver.kill()
            driver.wait()
    assert 0 < len(records(out)) < KILL_ROWS, "the job was not killed mid-job"
    # 2. The same command again, to the end.
    finished = records(out)
    rerun = subprocess.run(job, capture_output=True, text=True, timeout=START_LIMIT_S + 120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    print(f"killed at {len(finished)} of {KILL_ROWS} records; the rerun generated {summary['generated']}")
    # 3. Every row exactly once, nothing finished before generated again, no partial file.
    after = records(out)
    assert sorted(after) == sorted(f"p/{i}.json" for i in range(KILL_ROWS))
    assert {name: after[name] for name in finished} == finished
    assert all(json.loads((out / "records" / name).read_text())["status"] == "ok" for name in after)
    assert (summary["total"], summary["done"], summary["complete"]) == (KILL_ROWS, KILL_ROWS, True)
    assert summary["generated"] > 0 and summary["skipped"] + summary["generated"] == KILL_ROWS
    assert [p.name for p in out.rglob("*") if ".partial-" in p.name] == []
    table = pd.read_csv(out / "predictions.csv", header=None, names=list(PREDICTION_COLUMNS))
    assert sorted(table["row_number_per_file"]) == list(range(KILL_ROWS))
    assert sorted(table["prompt"]) == sorted(f"prompt number {i}" for i in range(KILL_ROWS))
    for image in table["generated_image"]:
        with Image.open(out / image) as png:
            png.load()  # a truncated file would fail here


def test_a_missing_input_is_refused_before_connecting_to_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens at port 1: the job must fail on its input without trying the cluster.
    job = [
        "--ray-address",
        "127.0.0.1:1",
        "--input",
        str(tmp_path / "nowhere"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert batch_on_ray(*job, *FAST) == 2
    assert "does not exist or is empty" in capsys.readouterr().err
