"""`sd-endpoint batch` on local folders with the real random:tiny engine: outputs, reruns, seeds,
retries of storage and engine errors, the error threshold, and every bad input refused up front."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from model.errors import EngineFailure
from service.batch.files.records import PREDICTION_COLUMNS, Record
from service.batch.params import JobParams
from service.batch.plan import plan_job
from service.batch.process import RetryPolicy
from service.batch.runner import RunConfig, run_job
from service.cli.main import main
from service.storage import Storage, StorageError

FAST = ["--model", "random:tiny", "--steps", "2", "--batch-size", "2"]
CSV = ",prompt,negative_prompt,seed\n0,a red cat,blurry,42\n1,a blue dog,,\n2,,,\n3,a tree,,abc\n"
JSONL = '{"prompt": "the sun"}\n{"prompt": "the moon", "seed": 7}\n'


@pytest.fixture()
def engine(tiny_engine: Any) -> Any:
    return tiny_engine


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.csv").write_text(CSV)
    (folder / "sub" / "b.jsonl").write_text(JSONL)
    return folder


def batch(*args: str) -> int:
    return main(["batch", *args])


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def predictions(output: Path) -> list[dict[str, str]]:
    """predictions-detailed.csv: every row, failed ones too, under its header."""
    return list(csv.DictReader(io.StringIO((output / "predictions-detailed.csv").read_text())))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image, dtype=int)


def azure_predictions(output: Path) -> pd.DataFrame:
    """predictions.csv read the way Azure's text-to-image batch notebook reads it."""
    return pd.read_csv(output / "predictions.csv", header=None, names=list(PREDICTION_COLUMNS))


def test_a_job_writes_one_image_and_one_record_per_row_then_predictions_and_summary(
    prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert batch("--input", str(prompts), "--output", str(out), *FAST) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(capsys.readouterr().out) == summary
    assert {k: summary[k] for k in ("total", "done", "failed", "skipped", "missing", "complete")} == {
        "total": 6, "done": 4, "failed": 2, "skipped": 0, "missing": 0, "complete": True,
    }  # fmt: skip
    assert summary["parameters"]["num_inference_steps"] == 2 and summary["model"] == "random:tiny"
    images = ["images/a/0.png", "images/a/1.png", "images/sub/b/0.png", "images/sub/b/1.png"]
    records = ["records/a/0.json", "records/a/1.json", "records/a/2.json", "records/a/3.json",
               "records/sub/b/0.json", "records/sub/b/1.json"]  # fmt: skip
    tables = ["predictions.csv", "predictions-detailed.csv"]
    assert files_under(out) == sorted([*images, *records, "job.json", *tables, "summary.json"])
    for image in images:
        with Image.open(out / image) as png:
            assert (png.size, png.mode) == ((128, 128), "RGB")
    rows = predictions(out)
    assert list(rows[0])[:5] == [
        "row_number_per_file", "prompt", "generated_image", "nsfw_content_detected", "input_csv_name",
    ]  # fmt: skip
    table = [(r["input_csv_name"], r["row_number_per_file"], r["status"], r["generated_image"]) for r in rows]
    assert table == [
        ("a.csv", "0", "ok", "images/a/0.png"),
        ("a.csv", "1", "ok", "images/a/1.png"),
        ("a.csv", "2", "failed", ""),
        ("a.csv", "3", "failed", ""),
        ("sub/b.jsonl", "0", "ok", "images/sub/b/0.png"),
        ("sub/b.jsonl", "1", "ok", "images/sub/b/1.png"),
    ]
    assert "empty prompt" in rows[2]["error"] and "bad seed" in rows[3]["error"]
    assert rows[0]["seed"] == "42" and rows[5]["seed"] == "7"  # a row's own seed wins
    assert rows[0]["nsfw_content_detected"] == "False"  # random:tiny has a checker that never flags
    assert summary["failed_rows"] == [
        {"input_csv_name": "a.csv", "row_number_per_file": 2, "error": rows[2]["error"]},
        {"input_csv_name": "a.csv", "row_number_per_file": 3, "error": rows[3]["error"]},
    ]
    # predictions.csv: Azure's five columns, no header, one line per image (failed rows are not images)
    azure = azure_predictions(out)
    assert azure.values.tolist() == [
        [0, "a red cat", "images/a/0.png", False, "a.csv"],
        [1, "a blue dog", "images/a/1.png", False, "a.csv"],
        [0, "the sun", "images/sub/b/0.png", False, "sub/b.jsonl"],
        [1, "the moon", "images/sub/b/1.png", False, "sub/b.jsonl"],
    ]


def test_a_rerun_generates_nothing_and_rebuilds_the_same_predictions(
    prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert batch("--input", str(prompts), "--output", str(out), *FAST) == 0
    before = {
        name: (out / name).stat().st_mtime_ns
        for name in files_under(out)
        if name.startswith(("images", "records"))
    }
    tables = {name: (out / name).read_bytes() for name in ("predictions.csv", "predictions-detailed.csv")}
    first = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert batch("--input", str(prompts), "--output", str(out), *FAST) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["skipped"], summary["generated"], summary["done"]) == (6, 0, 4)
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before
    assert {name: (out / name).read_bytes() for name in tables} == tables
    assert (summary["model"], summary["parameters"]) == (first["model"], first["parameters"])


def test_the_same_job_seed_gives_the_same_image_and_another_seed_another(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("prompt\na lighthouse\n")
    for name, seed in (("one", "5"), ("two", "5"), ("three", "6")):
        args = ["--input", str(tmp_path / "p.csv"), "--output", str(tmp_path / name), "--seed", seed]
        assert batch(*args, *FAST) == 0
    image = {name: (tmp_path / name / "images/p/0.png").read_bytes() for name in ("one", "two", "three")}
    assert image["one"] == image["two"]
    assert image["one"] != image["three"]


def test_without_seed_each_job_draws_its_own_and_a_resume_reuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.csv").write_text("prompt\na lighthouse\na harbour\n")
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        assert batch("--input", str(tmp_path / "p.csv"), "--output", str(out), *FAST) == 0
    seeds = {out: json.loads((out / "job.json").read_text())["parameters"]["seed"] for out in (one, two)}
    assert seeds[one] != seeds[two]  # files of the same name in two jobs: other noise
    assert (one / "images/p/0.png").read_bytes() != (two / "images/p/0.png").read_bytes()
    assert json.loads((one / "summary.json").read_text())["parameters"]["seed"] == seeds[one]
    # A resume (row 1 as if killed before its record) reuses the job's seed: the same image again
    # (up to rounding: it is generated alone now, not in a batch of two).
    seed = json.loads((one / "records/p/1.json").read_text())["seed"]
    image = pixels(one / "images/p/1.png")
    (one / "records/p/1.json").unlink()
    (one / "images/p/1.png").unlink()
    assert batch("--input", str(tmp_path / "p.csv"), "--output", str(one), *FAST) == 0
    assert json.loads((one / "records/p/1.json").read_text())["seed"] == seed
    assert np.abs(pixels(one / "images/p/1.png") - image).max() <= 2
    assert np.abs(pixels(two / "images/p/1.png") - image).max() > 2
    # Another explicit seed is another job: refused, saying how to resume.
    capsys.readouterr()
    other = str(seeds[one] + 1)
    assert batch("--input", str(tmp_path / "p.csv"), "--output", str(one), *FAST, "--seed", other) == 2
    err = capsys.readouterr().err
    assert f"seed {seeds[one]} there, {other} here" in err and "omit --seed" in err, err


class FailingWrites(Storage):
    """A local store whose writes fail when ``fails(path, attempt)`` says so."""

    def __init__(self, inner: Storage, fails: Callable[[str, int], bool]) -> None:
        super().__init__(inner.fs, inner.root, inner.uri)
        self.fails = fails
        self.attempts: Counter[str] = Counter()

    def write(self, path: str, data: bytes) -> None:
        self.attempts[path] += 1
        if self.fails(path, self.attempts[path]):
            raise StorageError(f"cannot write {self.describe(path)}: injected failure")
        super().write(path, data)


def test_a_write_that_fails_once_is_retried_and_the_row_succeeds(
    engine: Any, prompts: Path, tmp_path: Path
) -> None:
    plan = plan_job(str(prompts), str(tmp_path / "out"), JobParams(num_inference_steps=2))
    store = FailingWrites(plan.output, lambda path, attempt: path == "images/a/0.png" and attempt == 1)
    plan.output = store
    result = run_job(engine, plan, RunConfig(batch_size=2, retry=RetryPolicy(max_retries=2, delay_s=0)))
    assert store.attempts["images/a/0.png"] == 2
    assert (result.generated, result.failed, result.stopped) == (4, 2, "")  # the 2 failures: bad rows
    record = json.loads((tmp_path / "out/records/a/0.json").read_text())
    assert record["status"] == "ok"


def test_an_engine_failure_is_retried_and_bad_rows_never_reach_the_engine(
    engine: Any, prompts: Path, tmp_path: Path
) -> None:
    class FailsOnce:
        def __init__(self) -> None:
            self.info, self.calls = engine.info, 0
            self.prompts: list[str] = []

        def validate(self, items: Any) -> None:
            engine.validate(items)

        def generate(self, items: Any) -> Any:
            self.calls += 1
            self.prompts += [item.prompt for item in items]
            # The first batch fails, and so does its first row alone (the retry row by row); the
            # second row alone succeeds at once, the first on the next attempt.
            if self.calls <= 2:
                raise EngineFailure("generation failed: injected")
            return engine.generate(items)

    flaky = FailsOnce()
    plan = plan_job(str(prompts), str(tmp_path / "out"), JobParams(num_inference_steps=2))
    records: list[Record] = []
    config = RunConfig(batch_size=2, retry=RetryPolicy(max_retries=1, delay_s=0))
    result = run_job(flaky, plan, config, on_record=records.append)
    assert (result.generated, result.stopped) == (4, "")
    assert set(flaky.prompts) == {"a red cat", "a blue dog", "the sun", "the moon"}
    retried = {r.prompt: r.attempts for r in records if r.ok}
    assert retried["a red cat"] == 2 and retried["a blue dog"] == 1 and retried["the moon"] == 1


def test_a_store_that_keeps_failing_stops_the_job_at_the_error_threshold(
    prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Enough rows that the stop shows: writes fail late (after retries), so the engine may be up to
    # two batches ahead when the threshold is crossed.
    (prompts / "a.csv").write_text("prompt\n" + "".join(f"prompt {i}\n" for i in range(30)))
    original = Storage.write

    def failing_images(self: Storage, path: str, data: bytes) -> None:
        if path.startswith("images/"):
            raise StorageError(f"cannot write {self.describe(path)}: injected failure")
        original(self, path, data)

    monkeypatch.setattr(Storage, "write", failing_images)
    out = tmp_path / "out"
    code = batch("--input", str(prompts), "--output", str(out), *FAST, "--max-retries", "1",
                 "--error-threshold", "1")  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "--error-threshold 1" in captured.err and "run the same command again" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(captured.out) == summary
    assert summary["failed"] >= 2 and summary["done"] == 0
    assert summary["complete"] is False and summary["missing"] == 32 - summary["failed"] > 0
    assert "injected failure" in predictions(out)[0]["error"]
    assert not (out / "images").exists()


def test_a_store_that_refuses_every_record_stops_the_job_whatever_the_threshold(
    engine: Any, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records that storage refuses wait in memory for finalize; a store that refuses them all would
    grow that without end, so past MAX_UNWRITTEN the job stops (also with no --error-threshold)."""
    import service.batch.errors

    (prompts / "a.csv").write_text("prompt\n" + "".join(f"prompt {i}\n" for i in range(40)))
    monkeypatch.setattr(service.batch.errors, "MAX_UNWRITTEN", 3)
    plan = plan_job(str(prompts), str(tmp_path / "out"), JobParams(num_inference_steps=1))
    store = FailingWrites(plan.output, lambda path, attempt: path.startswith("records/"))
    plan.output = store
    config = RunConfig(batch_size=2, error_threshold=-1, retry=RetryPolicy(max_retries=0, delay_s=0))
    result = run_job(engine, plan, config)
    assert "output store refused the records of 3 rows" in result.stopped
    assert "injected failure" in result.stopped and "can be written" in result.stopped
    # it stopped early: rows already generated or being written when it stopped may add a few
    assert 3 <= len(result.unwritten) < 3 + 2 * config.max_pending_writes + 2 * config.batch_size < 40


def bad_input_cases(tmp: Path) -> dict[str, list[str]]:
    (tmp / "in").mkdir()
    (tmp / "in/a.csv").write_text("prompt\nhello\n")
    (tmp / "noprompt.csv").write_text("text\nhello\n")
    (tmp / "utf16.csv").write_bytes("prompt\ncaf\xe9\n".encode("utf-16"))  # no prompt column as UTF-8
    (tmp / "deep.json").write_text('{"seed": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (tmp / "huge.json").write_text('{"seed": ' + "9" * 5_000 + "}")
    (tmp / "list.json").write_text("[" * 5_000)
    (tmp / "afile").write_text("x")
    (tmp / "unknown.json").write_text('{"num_inference_steps": 2, "size": 3}')
    (tmp / "taken").mkdir()
    (tmp / "taken/job.json").write_text('{"parameters": {"num_inference_steps": 3}}')
    (tmp / "seeded").mkdir()
    (tmp / "seeded/job.json").write_text(json.dumps({"parameters": JobParams(2, seed=5).as_dict()}))
    (tmp / "docs").mkdir()
    (tmp / "docs/prompts.docx").write_bytes(b"PK\x03\x04")
    good = ["--input", str(tmp / "in"), "--output", str(tmp / "out")]
    return {
        "missing input": ["--input", str(tmp / "nope"), "--output", str(tmp / "out")],
        "csv without prompt column": ["--input", str(tmp / "noprompt.csv"), "--output", str(tmp / "out")],
        "input utf-16": ["--input", str(tmp / "utf16.csv"), "--output", str(tmp / "out")],
        "output cannot be written": ["--input", str(tmp / "in"), "--output", str(tmp / "afile/out")],
        "output inside input": ["--input", str(tmp / "in"), "--output", str(tmp / "in/out")],
        "output holds another job": ["--input", str(tmp / "in"), "--output", str(tmp / "taken")],
        "resume with another seed": [
            "--input",
            str(tmp / "in"),
            "--output",
            str(tmp / "seeded"),
            "--seed",
            "6",
        ],
        "no prompt files": ["--input", str(tmp / "docs"), "--output", str(tmp / "out")],
        "a single file of another kind": [
            "--input",
            str(tmp / "docs/prompts.docx"),
            "--output",
            str(tmp / "out"),
        ],
        "unknown scheme": ["--input", "gs://bucket/x", "--output", str(tmp / "out")],
        "zero steps": [*good, "--steps", "0"],
        "width not a multiple of 8": [*good, "--width", "100"],
        "unknown params key": [*good, "--params", str(tmp / "unknown.json")],
        "missing params file": [*good, "--params", str(tmp / "nope.json")],
        "negative retries": [*good, "--max-retries", "-1"],
        "zero batch size": [*good, "--batch-size", "0"],
        "unknown scheduler": [*good, "--scheduler", "nope"],
        "params nested deep": [*good, "--params", str(tmp / "deep.json")],
        "params with a huge integer": [*good, "--params", str(tmp / "huge.json")],
        "params not closed": [*good, "--params", str(tmp / "list.json")],
        "unknown dtype": [*good, "--dtype", "banana"],
        "unknown device": [*good, "--device", "banana"],
        "device with a space": [*good, "--device", "cuda 0"],
    }


BAD_INPUTS = [
    "missing input", "csv without prompt column", "input utf-16", "output cannot be written",
    "output inside input", "output holds another job", "resume with another seed", "no prompt files",
    "a single file of another kind", "unknown scheme", "zero steps",
    "width not a multiple of 8", "unknown params key", "missing params file", "negative retries",
    "zero batch size", "unknown scheduler", "params nested deep", "params with a huge integer",
    "params not closed", "unknown dtype", "unknown device", "device with a space",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_with_one_clear_line_before_any_generation(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = bad_input_cases(tmp_path)[case]
    code = batch(*args, "--model", "random:tiny", *([] if "--steps" in args else ["--steps", "2"]))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sd-endpoint batch: error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    for out in ("out", "seeded"):
        assert not (tmp_path / out / "images").exists() and not (tmp_path / out / "records").exists()
