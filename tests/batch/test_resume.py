"""Exactly once: a real `sd-endpoint batch` process killed with SIGKILL at several points, then
resumed, ends with every row once, no partial file, and no finished row generated twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from service.batch.files.records import PREDICTION_COLUMNS
from service.cli.main import main

pytestmark = pytest.mark.slow

ROWS = 12
BIN = Path(sys.executable).parent / "sd-endpoint"


def command(inputs: Path, output: Path) -> list[str]:
    program = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "service.cli.main"]
    return [*program, "batch", "--input", str(inputs), "--output", str(output), "--model", "random:tiny",
            "--steps", "2", "--batch-size", "2", "--write-workers", "2"]  # fmt: skip


def records(output: Path) -> dict[str, int]:
    """Record files and their modification times (ns)."""
    folder = output / "records"
    return (
        {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.json")}
        if folder.exists()
        else {}
    )


def pngs(output: Path) -> list[Path]:
    return sorted((output / "images").rglob("*.png")) if (output / "images").exists() else []


def run_until(inputs: Path, output: Path, reached: Callable[[], bool]) -> bool:
    """Start the job, SIGKILL it as soon as ``reached()``; whether it was killed (not finished first)."""
    process = subprocess.Popen(command(inputs, output), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if reached():
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return True
            time.sleep(0.01)
        assert process.poll() is not None, "the job did not finish in 300 s"
        assert process.returncode == 0, process.stderr.read().decode() if process.stderr else ""
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


def test_sigkill_at_several_points_then_resume_gives_every_row_exactly_once(tmp_path: Path) -> None:
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "a.csv").write_text("prompt\n" + "".join(f"a prompt number {i}\n" for i in range(ROWS // 2)))
    (inputs / "b.jsonl").write_text(
        "".join(json.dumps({"prompt": f"b {i}"}) + "\n" for i in range(ROWS // 2))
    )
    kill_points: list[tuple[str, Callable[[], bool]]] = [
        ("while starting, before any output", lambda: (output / "job.json").exists()),
        ("as the first image lands (its record may not)", lambda: len(pngs(output)) >= 1),
        ("mid-job", lambda: len(records(output)) >= ROWS // 2),
        ("once every row has a record (finalizing)", lambda: len(records(output)) >= ROWS),
    ]
    for name, reached in kill_points:
        finished_before = records(output)
        killed = run_until(inputs, output, reached)
        assert killed or name.startswith("once every row"), f"the job ended before the kill point: {name}"
        print(f"{name}: killed={killed}, {len(pngs(output))} images, {len(records(output))} records")
        # What was finished before this run was not generated again.
        after = records(output)
        assert {k: after[k] for k in finished_before} == finished_before, name
    # Resume to the end.
    finished_before = records(output)
    assert run_until(inputs, output, lambda: False) is False
    after = records(output)
    assert {k: after[k] for k in finished_before} == finished_before

    # Every row exactly once, and nothing else.
    assert sorted(after) == sorted([f"a/{i}.json" for i in range(6)] + [f"b/{i}.json" for i in range(6)])
    assert all(json.loads((output / "records" / name).read_text())["status"] == "ok" for name in after)
    assert [str(p.relative_to(output)) for p in pngs(output)] == sorted(
        [f"images/a/{i}.png" for i in range(6)] + [f"images/b/{i}.png" for i in range(6)]
    )
    for png in pngs(output):
        with Image.open(png) as image:
            image.load()  # a truncated file would fail here
    leftovers = [p.name for p in output.rglob("*") if p.is_file() and ".partial-" in p.name]
    assert leftovers == []
    table = pd.read_csv(output / "predictions.csv", header=None, names=list(PREDICTION_COLUMNS))
    assert sorted(zip(table["input_csv_name"], table["row_number_per_file"], strict=True)) == sorted(
        [("a.csv", i) for i in range(6)] + [("b.jsonl", i) for i in range(6)]
    )
    assert all((output / image).is_file() for image in table["generated_image"])
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["total"], summary["done"], summary["failed"], summary["complete"]) == (
        ROWS,
        ROWS,
        0,
        True,
    )


def test_an_image_without_its_record_and_leftover_temporary_files_are_repaired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The states a kill can leave, made on purpose: the row is generated again, the debris removed."""
    inputs, output = tmp_path / "p.csv", tmp_path / "out"
    inputs.write_text("prompt\none\ntwo\nthree\n")
    args = [
        "batch",
        "--input",
        str(inputs),
        "--output",
        str(output),
        "--model",
        "random:tiny",
        "--steps",
        "2",
    ]
    assert main(args) == 0
    # Killed after writing row 1's image but before its record; and in the middle of two writes.
    (output / "records/p/1.json").unlink()
    (output / "images/p/.2.png.partial-0123456789ab").write_bytes(b"\x89PNG half")
    (output / "records/p/.2.json.partial-0123456789ab").write_bytes(b'{"row"')
    # ... and while finalizing: the summary and the predictions file at the output's root.
    (output / ".summary.json.partial-0123456789ab").write_bytes(b'{"total"')
    (output / ".predictions.csv.partial-0123456789ab").write_bytes(b"prompt,")
    untouched = {name: (output / name).stat().st_mtime_ns for name in ("images/p/0.png", "records/p/2.json")}
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["generated"], summary["skipped"], summary["done"]) == (1, 2, 3)
    assert {name: (output / name).stat().st_mtime_ns for name in untouched} == untouched
    assert json.loads((output / "records/p/1.json").read_text())["status"] == "ok"
    assert sorted(p.name for p in (output / "images/p").iterdir()) == ["0.png", "1.png", "2.png"]
    assert sorted(p.name for p in (output / "records/p").iterdir()) == ["0.json", "1.json", "2.json"]
    assert [p.name for p in output.rglob("*") if ".partial-" in p.name] == []
