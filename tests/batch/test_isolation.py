"""One bad row never fails its neighbours in a batch job: what the engine refuses fails that row
alone (never retried), and a batch the engine fails anyway is retried row by row."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.types import GenerationItem, GenerationResult
from service.batch.files.inputs import InputRow
from service.batch.params import JobParams
from service.batch.process import generate_batch
from service.cli.main import main


def test_a_lone_surrogate_row_fails_alone_and_its_batch_neighbours_are_generated(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [{"prompt": "a red cat"}, {"prompt": "\ud800 broken"}, {"prompt": "a blue dog"}]
    # json.dumps writes the surrogate as the escape "\ud800", which json.loads gives back as is.
    (folder / "p.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = tmp_path / "out"
    code = main(["batch", "--input", str(folder), "--output", str(out), "--model", "random:tiny",
                 "--steps", "1", "--batch-size", "3", "--max-retries", "0"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["done"], summary["failed"]) == (2, 1)
    detailed = list(csv.DictReader(io.StringIO((out / "predictions-detailed.csv").read_text())))
    failed = [row for row in detailed if row["status"] != "ok"]
    assert len(failed) == 1 and "lone surrogate" in failed[0]["error"]


class OneBadPrompt:
    """An engine whose batches fail whenever they hold the prompt "boom" (a kernel error)."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.batches = engine, []  # type: ignore[var-annotated]

    @property
    def info(self) -> Any:
        return self.engine.info

    def validate(self, items: Sequence[GenerationItem]) -> None:
        self.engine.validate(items)

    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        self.batches.append([item.prompt for item in items])
        if any(item.prompt == "boom" for item in items):
            raise RuntimeError("kernel exploded")
        result: list[GenerationResult] = self.engine.generate(items)
        return result


def test_a_batch_that_fails_is_retried_row_by_row_so_only_the_culprit_fails(tiny_engine: Any) -> None:
    rows = [
        InputRow(file="f.csv", key="f", row=i, prompt=p, negative_prompt="", seed=i)
        for i, p in enumerate(["a", "boom", "b"])
    ]
    engine = OneBadPrompt(tiny_engine)
    outcomes = generate_batch(engine, rows, JobParams(num_inference_steps=1))  # type: ignore[arg-type]
    assert [o.result is not None for o in outcomes] == [True, False, True]
    assert outcomes[1].retryable and "kernel exploded" in outcomes[1].error
    assert engine.batches == [["a", "boom", "b"], ["a"], ["boom"], ["b"]]
