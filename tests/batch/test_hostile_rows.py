"""Hostile rows: line breaks inside JSON strings, rows that cannot be parsed (deep nesting, huge
integers, over-long fields in every format, bytes that are not text) each fail alone, and cells a
spreadsheet would run as formulas are neutralised in both predictions files."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.batch.errors import BatchConfigError
from service.batch.files.inputs import InputFile, open_inputs, parse_file, read_rows
from service.batch.files.records import Record
from service.cli.main import main

FAST = ["--model", "random:tiny", "--steps", "2", "--batch-size", "4"]
# Unicode line breaks that str.splitlines() splits on and JSON writes raw inside strings.
BREAKS = ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e"]


def test_json_lines_split_on_newline_only() -> None:
    prompts = [f"before{char}after" for char in BREAKS]
    text = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts)
    text += json.dumps({"prompt": "crlf"}) + "\r\n" + json.dumps({"prompt": "last"})  # no final newline
    rows = list(parse_file(InputFile("p.jsonl"), text.encode(), 1, "p.jsonl"))
    assert [(r.row, r.prompt, r.error) for r in rows] == [
        (i, p, "") for i, p in enumerate([*prompts, "crlf", "last"])
    ]


def rows_of(name: str, data: bytes, max_chars: int = 2000) -> list[tuple[str, str]]:
    return [(r.prompt[:20], r.error) for r in parse_file(InputFile(name), data, 1, name, max_chars)]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ("[" * 5_000, "nested too deeply"),
        ('{"prompt": "x", "seed": ' + "9" * 5_000 + "}", "more than 4,300 digits"),
        ('{"prompt": "x", "seed": "' + "9" * 5_000 + '"}', "bad seed"),
        ('{"prompt": "x", "seed": 1e400}', "bad seed"),
        ('{"prompt": "x", "seed": -1}', "bad seed"),
        ('{"prompt": "' + "y" * 2_001 + '"}', "2001 characters"),
        ('{"prompt": "x", "negative_prompt": "' + "n" * 3_000 + '"}', "negative_prompt has 3000"),
        ('{"prompt": "\\ud800"}', "not valid text"),
        ("not json", "not valid JSON"),
    ],
)
def test_a_jsonl_row_that_cannot_be_read_fails_alone(line: str, reason: str) -> None:
    data = f'{{"prompt": "first"}}\n{line}\n{{"prompt": "last"}}\n'.encode()
    rows = rows_of("p.jsonl", data)
    assert rows[0] == ("first", "") and rows[2] == ("last", "")
    assert reason in rows[1][1], rows[1]


@pytest.mark.parametrize("length", [2_001, 131_073, 400_000])
def test_over_long_fields_fail_by_row_in_every_format(tmp_path: Path, length: int) -> None:
    long = "z" * length
    csv_data = f'prompt,seed,other\nfirst,1,x\n"{long}",2,x\nok,3,"{long}"\nlast,4,x\n'.encode()
    # an over-long cell of a column that is not read is no problem
    assert [error == "" for _, error in rows_of("p.csv", csv_data)] == [True, False, True, True]
    jsonl = "".join(json.dumps({"prompt": p}) + "\n" for p in ["first", long, "ok", "last"])
    for name, data in [
        ("p.csv", csv_data),
        ("p.txt", f"first\n{long}\nok\nlast\n".encode()),
        ("p.jsonl", jsonl.encode()),
    ]:  # fmt: skip
        rows = rows_of(name, data)
        assert [prompt for prompt, error in rows if not error] == ["first", "ok", "last"], name
        assert f"prompt has {length} characters" in rows[1][1], name
    pd.DataFrame({"prompt": ["first", long, "ok", "last"]}).to_parquet(tmp_path / "p.parquet")
    rows = rows_of("p.parquet", (tmp_path / "p.parquet").read_bytes())
    assert [prompt for prompt, error in rows if not error] == ["first", "ok", "last"]
    # the limit is the setting's, not a fixed number
    assert rows_of("p.txt", f"{long}\n".encode(), max_chars=length) == [(long[:20], "")]


def test_hostile_rows_fail_alone_and_formulas_are_neutralised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    formulas = ["=cmd|'/C calc'!A0", "+1+1", "-2+3", "@SUM(A1:A2)", "\tTAB", "\rCR", '=HYPERLINK("x")']
    lines = [json.dumps({"prompt": p}) for p in formulas]
    lines += [
        '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",  # RecursionError once
        '{"prompt": "x", "seed": ' + "7" * 5_000 + "}",  # ValueError once
        json.dumps({"prompt": "keep\u2028me"}, ensure_ascii=False),
    ]
    (inputs / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (inputs / "=HYPERLINK(1).csv").write_text('prompt\n"' + "q" * 200_000 + '"\nfine\n')
    code = main(["batch", "--input", str(inputs), "--output", str(output), *FAST])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (summary["total"], summary["done"], summary["failed"]) == (12, 9, 3)
    assert {(r["input_csv_name"], r["row_number_per_file"]) for r in summary["failed_rows"]} == {
        ("=HYPERLINK(1).csv", 0), ("rows.jsonl", 7), ("rows.jsonl", 8),
    }  # fmt: skip

    # both files, read as a spreadsheet or pandas would: no cell starts a formula
    def table(name: str) -> list[list[str]]:
        return list(csv.reader(io.StringIO((output / name).read_bytes().decode(), newline="")))

    plain, detailed = table("predictions.csv"), table("predictions-detailed.csv")
    for table in (plain, detailed[1:]):
        for row in table:
            for cell in row:
                assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), row
    assert sorted(row[1] for row in plain if row[4] == "rows.jsonl") == sorted(
        [f"'{p}" for p in formulas] + ["keep\u2028me"]
    )
    assert {row[4] for row in plain} == {"'=HYPERLINK(1).csv", "rows.jsonl"}
    # the records keep every prompt exactly
    records = [Record.from_json(p.read_bytes()) for p in (output / "records" / "rows").glob("*.json")]
    assert sorted(r.prompt for r in records if r.ok) == sorted([*formulas, "keep\u2028me"])


def test_a_parquet_row_bomb_is_refused_before_its_rows_are_made(tmp_path: Path) -> None:
    import pyarrow
    import pyarrow.parquet

    # 5,000,000 dictionary-encoded rows in a few kB: once 2.5 GB and 35 s of planning
    indices = pyarrow.array(np.zeros(5_000_000, dtype=np.int32))
    column = pyarrow.DictionaryArray.from_arrays(indices, pyarrow.array(["a cat"]))
    pyarrow.parquet.write_table(pyarrow.table({"prompt": column}), tmp_path / "bomb.parquet")
    assert (tmp_path / "bomb.parquet").stat().st_size < 100_000
    started = time.monotonic()
    with pytest.raises(BatchConfigError, match="past 1,000,000 rows"):
        list(
            parse_file(InputFile("bomb.parquet"), (tmp_path / "bomb.parquet").read_bytes(), 1, "bomb.parquet")
        )
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "txt", "parquet"])
def test_the_job_row_cap_counts_every_file_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    monkeypatch.setattr("service.batch.files.inputs.MAX_JOB_ROWS", 10)
    prompts = [f"p{i}" for i in range(6)]
    for name in ("a", "b"):
        if suffix == "parquet":
            pd.DataFrame({"prompt": prompts}).to_parquet(tmp_path / f"{name}.parquet")
        else:
            lines = {"csv": ["prompt", *prompts], "jsonl": [json.dumps({"prompt": p}) for p in prompts]}
            (tmp_path / f"{name}.{suffix}").write_text("\n".join(lines.get(suffix, prompts)) + "\n")
    inputs = open_inputs(str(tmp_path))
    with pytest.raises(BatchConfigError, match=f"b.{suffix} takes the job past"):
        read_rows(inputs.storage, inputs.files, 1)
    assert len(read_rows(inputs.storage, inputs.files[:1], 1)) == 6
