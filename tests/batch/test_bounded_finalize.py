"""Finalizing streams: its memory does not grow with the rows, the files it writes are byte for
byte those built from every record in memory, on every backend, and the finished rows cost a bit each."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.types import GenerationResult
from service.batch.files.finalize import finalize
from service.batch.files.finished import FinishedRows
from service.batch.files.records import (
    DETAILED_FILE,
    PREDICTIONS_FILE,
    Record,
    detailed_csv,
    predictions_csv,
    record_path,
)
from service.batch.params import JobParams
from service.batch.plan import find_finished, plan_job
from service.batch.runner import RunConfig, run_job
from service.storage import open_storage
from tests.batch.test_bounded import write_prompts

PARAMETERS = {"num_inference_steps": 1, "guidance_scale": 7.5, "height": 8, "width": 8, "scheduler": None}


class FakeEngine:
    """An engine that draws nothing: 8x8 black images at once, so that a test can run thousands of rows."""

    def __init__(self, info: Any) -> None:
        self.info = info

    def validate(self, items: Any) -> None:
        pass

    def generate(self, items: Any) -> list[GenerationResult]:
        return [GenerationResult(np.zeros((8, 8, 3), np.uint8), False, item.seed) for item in items]


def run_and_finalize_peaks(tmp_path: Path, rows: int, info: Any) -> tuple[int, int, dict[str, Any]]:
    """Peak bytes Python allocated while running ``rows`` rows (fake engine) and while finalizing."""
    folder = tmp_path / f"in-{rows}"
    write_prompts(folder, rows, per_file=rows // 4)
    plan = plan_job(str(folder), str(tmp_path / f"out-{rows}"), JobParams(num_inference_steps=1))
    tracemalloc.start()
    try:
        result = run_job(FakeEngine(info), plan, RunConfig(batch_size=8, write_workers=2))
        run_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        summary = finalize(plan.output, plan.counts, model="fake", parameters=PARAMETERS, run=result)
        finalize_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return run_peak, finalize_peak, summary


def test_running_and_finalizing_memory_does_not_grow_with_the_number_of_rows(
    tiny_engine: Any, tmp_path: Path
) -> None:
    small_run, small_finalize, small = run_and_finalize_peaks(tmp_path, 800, tiny_engine.info)
    large_run, large_finalize, large = run_and_finalize_peaks(tmp_path, 8_000, tiny_engine.info)
    assert (small["done"], large["done"], large["complete"]) == (800, 8_000, True)
    # Ten times the rows: a record kept per row (~1.5 kB with its predictions lines) would add
    # over 10 MB; a bit per row adds 1 kB.
    assert large_run < small_run * 1.3 + 300_000, (small_run, large_run)
    assert large_finalize < small_finalize * 1.3 + 300_000, (small_finalize, large_finalize)
    lines = (tmp_path / "out-8000" / PREDICTIONS_FILE).read_text().splitlines()
    assert len(lines) == 8_000 and lines[0].startswith("0,a watercolour of lighthouse number 0 at dusk")
    assert lines[-1].startswith("1999,a watercolour of lighthouse number 7999 at dusk")


def hostile_records() -> list[Record]:
    """Records whose order by input file differs from their order by file key ("a-b.csv" before
    "a.csv", but "a" before "a-b"), with formulas, line breaks, quotes, other scripts, failed and
    flagged rows, rows past the 8th (a bitmap's second byte) and numbered past the job cap."""
    prompts = ["=cmd|'/C calc'!A0", "two\nlines", 'a "quoted", comma', "+1", "日本の城", "\rreturn", "-x"]
    prompts.append("@y")
    records = []
    for file in ("a.csv", "a-b.csv", "deep/z.txt", "b.jsonl"):
        for row in (*range(12), 17, 1_000_000, 2_000_001):
            failed = row % 5 == 3
            records.append(
                Record(
                    input_file=file,
                    row=row,
                    prompt=prompts[row % len(prompts)] + f" {file}",
                    negative_prompt="=neg" if row % 2 else "",
                    seed=None if failed else row * 31,
                    status="failed" if failed else "ok",
                    generated_image="" if failed else f"images/x/{row}.png",
                    nsfw_content_detected=None if failed else row % 4 == 1,
                    error="engine error: \n=boom" if failed else "",
                    attempts=1 + row % 3,
                )
            )
    return records


def test_the_streamed_files_are_byte_for_byte_those_built_in_memory(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.batch.files.finalize as module
    import service.batch.plan as plan_module
    import service.storage.streams as streams

    # Small chunks and pages, so that every file spans several of each.
    monkeypatch.setattr(module, "READ_CHUNK", 5)
    monkeypatch.setattr(plan_module, "READ_CHUNK", 5)
    monkeypatch.setattr(streams, "PAGE", 7)
    output = open_storage(root)
    records = hostile_records()
    for record in records:
        output.write(record_path(record.key, record.row), record.to_json())
    output.write("records/a/not-a-row.json", b"{}")  # someone else's file: left out
    counts = {"a": 12, "a-b": 18, "deep/z": 5}
    summary = finalize(output, counts, model="m", parameters=PARAMETERS)
    assert output.read(PREDICTIONS_FILE) == predictions_csv(records)
    assert output.read(DETAILED_FILE) == detailed_csv(records, PARAMETERS)
    # The counts are of the job's rows only (those below each file's count).
    mine = [r for r in records if r.row < counts.get(r.key, 0)]
    failed = [r for r in mine if not r.ok]
    done = len(mine) - len(failed)
    assert (summary["total"], summary["failed"], summary["done"]) == (35, len(failed), done)
    assert summary["missing"] == 35 - len(mine) and summary["flagged"] == sum(r.flagged for r in mine)
    assert [(f["input_csv_name"], f["row_number_per_file"]) for f in summary["failed_rows"]] == [
        (r.input_file, r.row) for r in sorted(failed, key=lambda r: (r.input_file, r.row))
    ]


def test_finished_rows_cost_a_bit_each_and_answer_like_a_set() -> None:
    pairs = [("a", 0), ("a", 7), ("a", 8), ("a", 999_999), ("b/c", 3), ("x", 1_000_000), ("x", 2**60)]
    finished = FinishedRows(pairs)
    assert all(pair in finished for pair in pairs) and len(finished) == len(pairs)
    for absent in [("a", 1), ("a", 9), ("a", 1_000_001), ("b", 3), ("x", 0), ("a", -1), ("a",), "a"]:
        assert absent not in finished
    assert finished.keys() == ["a", "b/c", "x"]
    assert list(finished.rows("a")) == [0, 7, 8, 999_999] and list(finished.rows("x")) == [1_000_000, 2**60]
    assert [finished.count_below("a", n) for n in (0, 1, 8, 9, 999_999, 10**7)] == [0, 1, 2, 3, 3, 4]
    finished.discard("a", 7)
    finished.discard("x", 2**60)
    finished.discard("nothing", 5)
    assert ("a", 7) not in finished and ("x", 2**60) not in finished
    assert list(finished.rows("a"))[:2] == [0, 8]
    # A million rows of one file: 125 kB, not the ~190 MB of a set of tuples.
    many = FinishedRows()
    for row in range(0, 1_000_000, 3):
        many.add("big", row)
    assert len(many.bitmap("big")) <= 125_000 and len(many) == 333_334


def test_finding_the_finished_rows_reads_the_listing_page_by_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.storage.streams as streams

    monkeypatch.setattr(streams, "PAGE", 4)
    output = open_storage(str(tmp_path / "out"))
    for record in hostile_records()[:15]:
        output.write(record_path(record.key, record.row), record.to_json())
    finished = find_finished(output)
    assert len(finished) == 15 and ("a", 17) in finished and ("a", 3) in finished
    retried = find_finished(output, retry_failed=True)
    assert ("a", 3) not in retried and ("a", 8) not in retried and ("a", 4) in retried
    assert len(find_finished(output, keys=["a-b"])) == 0
