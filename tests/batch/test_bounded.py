"""Bounded memory: planning keeps no rows (only each file's count and identity), running reads the
input files again one at a time and pulls rows one engine batch ahead, an input file whose bytes
changed since planning is refused, and an input file over the size cap is refused up front."""

from __future__ import annotations

import dataclasses
import functools
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.batch.errors import BatchConfigError
from service.batch.files.finished import FinishedRows
from service.batch.files.inputs import InputRow
from service.batch.params import JobParams
from service.batch.plan import plan_job
from service.batch.runner import RunConfig, run_rows
from service.cli.main import main
from service.storage import open_storage

ROWS_PER_FILE = 5_000


def write_prompts(folder: Path, rows: int, per_file: int = ROWS_PER_FILE) -> None:
    """``rows`` distinct prompts (about 60 bytes each) in CSV files of ``per_file`` rows."""
    folder.mkdir(parents=True)
    for start in range(0, rows, per_file):
        lines = [
            f"a watercolour of lighthouse number {i} at dusk, seed {i * 7}"
            for i in range(start, min(start + per_file, rows))
        ]
        (folder / f"part-{start:08d}.csv").write_text("prompt\n" + "\n".join(lines) + "\n")


def planning_peak(tmp_path: Path, rows: int, per_file: int = ROWS_PER_FILE) -> tuple[int, Any]:
    """Peak bytes Python allocated while planning ``rows`` rows, and the plan."""
    folder = tmp_path / f"in-{rows}-{per_file}"
    write_prompts(folder, rows, per_file)
    tracemalloc.start()
    try:
        plan = plan_job(
            str(folder), str(tmp_path / f"out-{rows}-{per_file}"), JobParams(num_inference_steps=1)
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, plan


def test_planning_memory_does_not_grow_with_the_number_of_rows(tmp_path: Path) -> None:
    small, small_plan = planning_peak(tmp_path, 10_000)
    large, large_plan = planning_peak(tmp_path, 150_000)
    assert (small_plan.total, large_plan.total) == (10_000, 150_000)
    assert large_plan.pending_count == 150_000 and large_plan.skipped == 0
    # 15 times the rows, about the same peak: one file's bytes and its parser. A plan holding every
    # row (as a list of InputRow, about 250 bytes each) would peak above 35 MB here.
    assert large < small * 1.5 + 1_000_000, (small, large)
    assert large < 8_000_000, large


def test_planning_one_large_file_holds_its_bytes_not_its_rows(tmp_path: Path) -> None:
    peak, plan = planning_peak(tmp_path, 150_000, per_file=150_000)
    size = sum(p.stat().st_size for p in (tmp_path / "in-150000-150000").iterdir())
    assert plan.total == 150_000
    # The file's bytes and the text decoded as it is read; the rows as a list would be 4x the file.
    assert peak < 2 * size, (peak, size)


def test_the_rows_are_read_again_in_order_and_only_the_pending_ones(tmp_path: Path) -> None:
    _, plan = planning_peak(tmp_path, 12_000)
    plan.finished = FinishedRows(
        [("part-00000000", 3), ("part-00005000", 0), ("elsewhere", 1), ("part-00010000", 99_999)]
    )
    assert plan.skipped == 2 and plan.pending_count == 11_998
    rows = plan.rows()
    assert isinstance(rows, Iterator)
    first = next(rows)
    assert (first.file, first.row) == ("part-00000000.csv", 0)
    pending = [(row.key, row.row) for row in plan.pending()]
    assert (
        len(pending) == 11_998 and ("part-00000000", 3) not in pending and ("part-00005000", 0) not in pending
    )
    assert pending == sorted(pending)


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.write_text(
            p.read_text().replace("lighthouse number 5007 ", "lighthouse number 5008 ")
        ),  # same size
        lambda p: p.write_text("prompt\nsomething else\n"),
        lambda p: p.write_bytes(p.read_bytes() + b"one more\n"),
        lambda p: p.unlink(),
    ],
)
def test_a_file_changed_after_planning_is_refused_when_its_rows_are_read(tmp_path: Path, change: Any) -> None:
    _, plan = planning_peak(tmp_path, 10_000)
    change(tmp_path / "in-10000-5000" / "part-00005000.csv")
    rows = plan.rows()
    assert sum(1 for _, row in zip(range(5_000), rows, strict=False)) == 5_000  # the first file is unchanged
    with pytest.raises(
        BatchConfigError, match=r"part-00005000\.csv (changed while the job ran|does not exist)"
    ):
        next(rows)


def test_the_runner_pulls_rows_one_engine_batch_ahead(tiny_engine: Any, tmp_path: Path) -> None:
    pulled: list[int] = []
    calls: list[int] = []

    def source() -> Iterator[InputRow]:
        for i in range(9):
            pulled.append(i)
            yield InputRow("p.txt", "p", i, f"prompt {i}", "", i)

    class Counting:
        info = tiny_engine.info

        def validate(self, items: Any) -> None:
            tiny_engine.validate(items)

        def generate(self, items: Any) -> Any:
            calls.append(len(pulled))
            return tiny_engine.generate(items)

    output = open_storage(str(tmp_path / "out"))
    result = run_rows(
        Counting(),
        source(),
        output,
        JobParams(num_inference_steps=1, height=64, width=64),
        RunConfig(batch_size=2),
    )
    assert (result.generated, result.failed) == (9, 0)
    # When the engine starts batch n, at most the rows of batches 0..n have been read.
    assert calls == [2, 4, 6, 8, 9], calls


def test_an_input_file_over_the_size_cap_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("service.batch.files.inputs.MAX_INPUT_FILE_BYTES", 2 * 2**20)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "small.txt").write_text("a cat\n")
    for name, size in (("big.txt", 2 * 2**20 + 1), ("huge.jsonl", 10 * 2**20)):
        (folder / name).write_bytes(b"x" * size)
        code = main(
            ["batch", "--input", str(folder), "--output", str(tmp_path / "out"), "--model", "random:tiny"]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and "larger than 2 MiB" in err and name in err and "split it" in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        (folder / name).unlink()
    assert not (tmp_path / "out" / "images").exists()


def test_a_ray_task_reads_the_pending_rows_of_its_one_file(tmp_path: Path) -> None:
    from service.batch.ray_job import _pending_rows
    from service.storage import StorageOptions

    _, plan = planning_peak(tmp_path, 10_000)
    read = functools.partial(
        _pending_rows, plan.input.root, StorageOptions(), plan.files, plan.params.seed, plan.max_prompt_chars
    )
    done = FinishedRows([("part-00005000", 0), ("part-00005000", 2), ("part-00005000", 4_999)])
    rows = list(read({"file": 1, "done": done.bitmap("part-00005000")}))
    assert len(rows) == 4_997 and {row["file"] for row in rows} == {"part-00005000.csv"}
    assert [row["row"] for row in rows[:3]] == [1, 3, 4]
    planned = [r for r in plan.rows() if r.file == "part-00005000.csv" and r.row not in (0, 2, 4_999)]
    assert rows == [dataclasses.asdict(r) for r in planned]  # the same rows, seeds included
    (tmp_path / "in-10000-5000" / "part-00000000.csv").write_text("prompt\nanother\n")
    with pytest.raises(BatchConfigError, match="changed while the job ran"):
        list(read({"file": 0, "done": b""}))


def test_a_file_changed_while_the_job_runs_stops_it_in_one_line_and_the_rerun_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import service.batch.runner as runner

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("a red cat\na blue dog\n")
    (folder / "b.txt").write_text("the sun\nthe moon\n")
    generate = runner.generate_batch

    def edits_b_first(*args: Any) -> Any:  # someone rewrites b.txt while a.txt is generating
        (folder / "b.txt").write_text("the sun\nthe stars\n")
        return generate(*args)

    monkeypatch.setattr(runner, "generate_batch", edits_b_first)
    job = ["batch", "--input", str(folder), "--output", str(tmp_path / "out"), "--model", "random:tiny"]
    job += ["--steps", "1", "--batch-size", "2"]
    assert main(job) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("sd-endpoint batch: error: ") and "b.txt changed while the job ran" in last, err
    assert "Traceback" not in err
    # a.txt's rows were written; none of b.txt's old text was drawn, and the rerun names the change
    assert sorted(p.name for p in (tmp_path / "out/records").rglob("*.json")) == ["0.json", "1.json"]
    assert not (tmp_path / "out/records/b").exists()
    monkeypatch.setattr(runner, "generate_batch", generate)
    assert main(job) == 2
    assert "b.txt" in capsys.readouterr().err
    assert main([*job, "--continue"]) == 0
    predictions = (tmp_path / "out/predictions.csv").read_text()
    assert "the stars" in predictions and "the moon" not in predictions
