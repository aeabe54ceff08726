"""Batch input files, parameters, seeds, records and progress: what a user puts in and sees (no engine)."""

from __future__ import annotations

import io
import itertools
import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from service.batch.errors import BatchConfigError
from service.batch.files.inputs import InputFile, InputRow, open_inputs, parse_file, read_rows
from service.batch.files.records import (
    PREDICTION_COLUMNS,
    Record,
    detailed_csv,
    parse_record_path,
    predictions_csv,
    record_path,
)
from service.batch.params import MAX_SEED, JobParams, derive_seed
from service.batch.plan import prepare_output
from service.batch.progress import Progress
from service.storage import open_storage
from tests.runtime.fakes import INFO


def parse(name: str, text: str, job_seed: int | None = None) -> list[InputRow]:
    return list(parse_file(InputFile(name), text.encode(), job_seed, name))


def test_csv_as_azure_writes_it_with_an_index_column_negative_prompt_and_seed() -> None:
    rows = parse("p.csv", ',prompt,negative_prompt,seed\n0,"a cat, sitting",blurry,42\n1,a dog,,\n')
    assert [(r.row, r.prompt, r.negative_prompt, r.error) for r in rows] == [
        (0, "a cat, sitting", "blurry", ""),
        (1, "a dog", "", ""),
    ]
    assert rows[0].seed == 42
    assert rows[1].seed == derive_seed("p.csv", 1, None)


def test_csv_with_a_byte_order_mark_and_quoted_newlines() -> None:
    rows = parse("p.csv", '\ufeffprompt\n"two\nlines"\nthree\n')
    assert [r.prompt for r in rows] == ["two\nlines", "three"]


def test_jsonl_rows_and_bad_lines_become_failed_rows() -> None:
    lines = ['{"prompt": "a"}', "", '{"prompt": "b", "seed": 7, "negative_prompt": "c"}', "not json", "[1]"]
    text = "\n".join([*lines, '{"prompt": 3}']) + "\n"
    rows = parse("p.jsonl", text)
    assert [r.row for r in rows] == [0, 1, 2, 3, 4]  # blank lines are not rows
    assert (rows[1].prompt, rows[1].seed, rows[1].negative_prompt) == ("b", 7, "c")
    assert "not valid JSON" in rows[2].error
    assert "not a JSON object" in rows[3].error
    assert "prompt must be a string" in rows[4].error


@pytest.mark.parametrize("cell", ['""', '"   "', ""])
def test_an_empty_prompt_fails_its_row_only(cell: str) -> None:
    rows = parse("p.csv", f"prompt,seed\nok,1\n{cell},2\n")
    assert rows[0].error == ""
    assert "empty prompt" in rows[1].error and rows[1].seed is None


@pytest.mark.parametrize("seed", ["abc", "-1", "1.5", str(MAX_SEED + 1)])
def test_a_bad_seed_fails_its_row_only(seed: str) -> None:
    rows = parse("p.csv", f"prompt,seed\ngood,1\nbad,{seed}\n")
    assert rows[0].seed == 1
    assert rows[1].error.startswith("bad seed") and rows[1].seed is None


def test_pandas_style_float_seeds_are_accepted() -> None:
    assert parse("p.csv", "prompt,seed\na,42.0\n")[0].seed == 42


def test_derived_seeds_are_deterministic_and_the_job_seed_changes_them() -> None:
    first = parse("p.csv", "prompt\na\nb\n")
    again = parse("p.csv", "prompt\na\nb\n")
    other_job = parse("p.csv", "prompt\na\nb\n", job_seed=5)
    assert [r.seed for r in first] == [r.seed for r in again]
    assert first[0].seed != first[1].seed
    assert [r.seed for r in other_job] != [r.seed for r in first]
    # Independent of other files: the same row of another file gets another seed.
    assert parse("q.csv", "prompt\na\n")[0].seed != first[0].seed


def test_a_csv_without_prompt_column_is_refused_naming_its_columns() -> None:
    with pytest.raises(BatchConfigError, match=r"no 'prompt' column \(found 'text', 'x'\)"):
        parse("p.csv", "text,x\nhello,1\n")


@pytest.mark.parametrize(
    ("header", "twice"),
    [
        ("prompt,prompt", "prompt"),
        ("prompt,seed, seed", "seed"),
        ("negative_prompt,prompt,negative_prompt", "negative_prompt"),
    ],
)
def test_a_csv_with_a_column_twice_is_refused_rather_than_read_from_one_of_them(
    header: str, twice: str
) -> None:
    with pytest.raises(BatchConfigError, match=f"has 2 '{twice}' columns; keep one"):
        parse("p.csv", f"{header}\na,b,c\n")


def test_parquet_with_a_column_twice_is_refused(tmp_path: Path) -> None:
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.table([["a"], ["b"]], names=["prompt", "prompt"])
    pyarrow.parquet.write_table(table, tmp_path / "p.parquet")
    with pytest.raises(BatchConfigError, match="has 2 'prompt' columns; keep one"):
        list(parse_file(InputFile("p.parquet"), (tmp_path / "p.parquet").read_bytes(), None, "p.parquet"))


@pytest.mark.parametrize("name", ["p.csv", "p.txt", "p.jsonl"])
def test_a_row_that_is_not_utf8_fails_alone(name: str) -> None:
    lines = [b"good one", b"\xff\xfe\xfa", b"caf\xe9 latin-1", b"good two"]
    if name.endswith(".jsonl"):
        lines = [b'{"prompt": "' + line + b'"}' for line in lines]
    data = (b"prompt\n" if name.endswith(".csv") else b"") + b"\n".join(lines) + b"\n"
    rows = list(parse_file(InputFile(name), data, None, name))
    assert [r.prompt for r in rows if not r.error] == ["good one", "good two"]
    assert [r.row for r in rows if "not valid text" in r.error] == [1, 2]


def test_a_folder_lists_prompt_files_recursively_and_names_every_other_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.csv").write_text("prompt\nx\n")
    (tmp_path / "sub" / "b.jsonl").write_text('{"prompt": "y"}\n')
    (tmp_path / "c.TXT").write_text("z\n")
    (tmp_path / "notes.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / "_SUCCESS").write_text("")
    inputs = open_inputs(str(tmp_path))
    assert [f.path for f in inputs.files] == ["a.csv", "c.TXT", "sub/b.jsonl"]
    assert [f.key for f in inputs.files] == ["a", "c", "sub/b"]
    assert [r.prompt for r in read_rows(inputs.storage, inputs.files, None)] == ["x", "z", "y"]
    assert [(s.path, s.reason.split(" (")[0]) for s in inputs.skipped] == [
        ("_SUCCESS", "hidden file or marker"),
        ("notes.docx", "not a prompt file"),
    ]
    assert ".docx" in inputs.skipped[1].reason and ".parquet" in inputs.skipped[1].reason


def test_a_folder_without_prompt_files_is_refused_saying_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "report.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / "data.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(BatchConfigError) as error:
        open_inputs(str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"no prompt files under {tmp_path}: found 2 other file(s): ")
    assert "report.docx (not a prompt file (.docx)" in message and "data.xlsx" in message
    (tmp_path / "one.docx").write_bytes(b"x")
    with pytest.raises(BatchConfigError, match=r"is not a prompt file: use a \.csv, \.jsonl"):
        open_inputs(str(tmp_path / "one.docx"))


def test_parquet_as_pandas_writes_it_with_index_missing_seeds_and_any_column_order(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"seed": [5, None, 7], "prompt": ["a cat", "a dog", None], "negative_prompt": ["blurry", None, ""]},
        index=[10, 11, 12],
    )
    for name in ("p.parquet", "p.pqt"):
        frame.to_parquet(tmp_path / name)
        rows = list(parse_file(InputFile(name), (tmp_path / name).read_bytes(), 3, name))
        assert [(r.row, r.prompt, r.negative_prompt, r.seed) for r in rows[:2]] == [
            (0, "a cat", "blurry", 5),
            (1, "a dog", "", derive_seed(name, 1, 3)),  # NaN is no seed: derived
        ]
        assert "empty prompt" in rows[2].error


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PAR1 not really", "is not a readable Parquet file"),
        (b"", "is not a readable Parquet file"),
    ],
)
def test_a_file_that_is_not_parquet_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(BatchConfigError, match=message):
        list(parse_file(InputFile("p.parquet"), data, None, "p.parquet"))


def test_parquet_without_prompt_column_is_refused_naming_its_columns(tmp_path: Path) -> None:
    pd.DataFrame({"text": ["x"], "n": [1]}).to_parquet(tmp_path / "p.parquet", index=False)
    with pytest.raises(BatchConfigError, match=r"no 'prompt' column \(found 'text', 'n'\)"):
        list(parse_file(InputFile("p.parquet"), (tmp_path / "p.parquet").read_bytes(), None, "p.parquet"))


def test_parquet_cells_of_other_types_fail_their_row_only(tmp_path: Path) -> None:
    pd.DataFrame({"prompt": [1, 2], "seed": ["x", "3"]}).to_parquet(tmp_path / "p.parquet")
    rows = list(parse_file(InputFile("p.parquet"), (tmp_path / "p.parquet").read_bytes(), None, "p.parquet"))
    assert ["prompt must be a string" in r.error for r in rows] == [True, True]


def test_txt_is_one_prompt_a_line() -> None:
    rows = parse("p.txt", '\ufeffa red cat\r\n\n   \n  a blue dog  \ra tree, "quoted"\n')
    assert [(r.row, r.prompt, r.error) for r in rows] == [
        (0, "a red cat", ""),
        (1, "a blue dog", ""),
        (2, 'a tree, "quoted"', ""),
    ]
    assert rows[1].seed == derive_seed("p.txt", 1, None)


def test_csv_columns_in_any_order_with_or_without_the_index_column() -> None:
    with_index = parse("p.csv", ",seed,negative_prompt,prompt\n0,3,ugly,a cat\n")
    without = parse("p.csv", "seed,prompt\n3,a cat\n")
    assert [(r.prompt, r.negative_prompt, r.seed) for r in with_index] == [("a cat", "ugly", 3)]
    assert [(r.prompt, r.seed) for r in without] == [("a cat", 3)]


def test_a_single_file_uri(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("prompt\nx\n")
    (tmp_path / "other.csv").write_text("prompt\ny\n")
    inputs = open_inputs(f"file://{tmp_path}/a.csv")
    assert [f.path for f in inputs.files] == ["a.csv"] and inputs.single_file
    assert [r.prompt for r in read_rows(inputs.storage, inputs.files, None)] == ["x"]


def test_two_files_that_would_share_an_output_folder_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("prompt\nx\n")
    (tmp_path / "a.jsonl").write_text('{"prompt": "y"}\n')
    with pytest.raises(BatchConfigError, match="same output folder"):
        open_inputs(str(tmp_path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"steps": 4}', "unknown parameter"),
        ('{"num_inference_steps": "4"}', "must be an integer"),
        ('{"guidance_scale": true}', "must be a number"),
        ("[1]", "one JSON object"),
        ("{", "not valid JSON"),
        ('{"adapters": ["style"]}', "adapters must be an object of adapter names and scales"),
        ('{"adapters": 1.0}', "adapters must be an object"),
    ],
)
def test_bad_params_files_are_refused(text: str, message: str) -> None:
    with pytest.raises(BatchConfigError, match=message):
        JobParams.from_file(text, "params.json")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (JobParams(num_inference_steps=0), "steps"),
        (JobParams(num_inference_steps=151), "steps"),
        (JobParams(width=100), "width"),
        (JobParams(height=0), "height"),
        (JobParams(guidance_scale=float("nan")), "guidance"),
        (JobParams(seed=-1), "seed"),
        (JobParams(adapters={"style": float("inf")}), "scale must be a finite number from -2.0 to 2.0"),
        (JobParams(adapters={"style": float("nan")}), "scale must be a finite number"),
        (JobParams(adapters={"style": 2.5}), "scale must be a finite number"),
        (JobParams(adapters={"style": True}), "adapters must map adapter names to numbers"),
        (JobParams(adapters={"style": "1"}), "adapters must map adapter names to numbers"),
    ],
)
def test_out_of_range_parameters_are_refused(params: JobParams, message: str) -> None:
    with pytest.raises(BatchConfigError, match=message):
        params.check(max_steps=150)


def test_a_jobs_adapters_reach_every_item() -> None:
    params = JobParams.from_file('{"adapters": {"style": 0.5, "kohya": 1}}', "params.json")
    params.check(max_steps=150)
    item = params.item("a prompt", "", 7, INFO)
    assert item.adapters == (("kohya", 1.0), ("style", 0.5))


def test_flags_override_the_params_file() -> None:
    params = JobParams.from_file('{"num_inference_steps": 30, "guidance_scale": 5, "seed": 1}', "p.json")
    assert params.replace(num_inference_steps=4, seed=None) == JobParams(
        num_inference_steps=4, guidance_scale=5.0, seed=1
    )


def test_records_round_trip_and_predictions_are_azures_five_columns_without_header() -> None:
    ok = Record("b.csv", 1, 'a, "quoted"\ncat', "", 3, "ok", "images/b/1.png", False)
    unchecked = Record("a.csv", 2, "a dog", "", 4, "ok", "images/a/2.png", None)
    failed = Record("a.csv", 0, "", "", None, "failed", error="empty prompt")
    assert Record.from_json(ok.to_json()) == ok
    table = predictions_csv([ok, failed, unchecked]).decode()
    assert table == (
        "2,a dog,images/a/2.png,,a.csv\n"  # ordered by file, then row; no checker: empty flag
        '1,"a, ""quoted""\ncat",images/b/1.png,False,b.csv\n'  # the failed row is not an image
    )
    read = pd.read_csv(io.StringIO(table), header=None, names=list(PREDICTION_COLUMNS))
    assert read["prompt"].tolist() == ["a dog", 'a, "quoted"\ncat']
    assert read["row_number_per_file"].tolist() == [2, 1]
    detailed = detailed_csv([ok, failed], {"num_inference_steps": 2, "height": 64, "scheduler": None})
    lines = detailed.decode().splitlines()
    assert lines[0] == (
        "row_number_per_file,prompt,generated_image,nsfw_content_detected,input_csv_name,negative_prompt,"
        "seed,status,error,attempts,num_inference_steps,guidance_scale,height,width,scheduler"
    )
    assert lines[1] == "0,,,,a.csv,,,failed,empty prompt,1,2,,64,,"
    assert parse_record_path(record_path("sub/b", 12)) == ("sub/b", 12)
    assert parse_record_path("records/b/.1.json.partial-abc") is None
    with pytest.raises(ValueError):
        Record.from_json(b'{"row": 1}')
    with pytest.raises(ValueError):
        Record.from_json(json.dumps({**json.loads(ok.to_json()), "status": "maybe"}).encode())


def test_a_new_job_draws_a_seed_that_job_json_keeps_and_a_resume_reuses(tmp_path: Path) -> None:
    output = open_storage(str(tmp_path / "out"))
    first = prepare_output(output, JobParams(num_inference_steps=2))
    assert first.seed is not None and 0 <= first.seed < 2**32
    assert json.loads((tmp_path / "out/job.json").read_text())["parameters"]["seed"] == first.seed
    assert prepare_output(output, JobParams(num_inference_steps=2)) == first  # a resume: the same seed
    assert prepare_output(output, JobParams(num_inference_steps=2, seed=first.seed)) == first
    other = prepare_output(open_storage(str(tmp_path / "other")), JobParams(num_inference_steps=2))
    assert other.seed != first.seed  # another job over the same file names draws other images
    with pytest.raises(BatchConfigError) as error:
        prepare_output(output, JobParams(num_inference_steps=2, seed=first.seed + 1))
    assert f"seed {first.seed} there, {first.seed + 1} here" in str(error.value)
    assert f"omit --seed (or give --seed {first.seed}) to resume it" in str(error.value)


def test_a_job_started_before_job_seeds_keeps_deriving_without_one(tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text(json.dumps({"parameters": JobParams(num_inference_steps=2).as_dict()}))
    resolved = prepare_output(open_storage(str(tmp_path)), JobParams(num_inference_steps=2))
    assert resolved.seed is None


@pytest.mark.parametrize("text", ["[1]", '{"parameters": 3}', "{", '{"parameters": {"seed": "x"}}'])
def test_a_damaged_job_json_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / "job.json").write_text(text)
    with pytest.raises(BatchConfigError, match="damaged"):
        prepare_output(open_storage(str(tmp_path)), JobParams())


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_with_rate_and_eta_on_a_terminal() -> None:
    stream = Terminal()
    progress = Progress(4, stream=stream)
    for row in range(3):
        progress(Record("a.csv", row, "p", "", 1, "ok", f"images/a/{row}.png", False))
    progress.close()
    text = stream.getvalue()
    assert "3/4" in text and "img/s" in text and "<" in text  # tqdm's "elapsed<remaining"


def test_progress_is_log_lines_elsewhere(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    progress = Progress(2, stream=stream, log_interval_s=3600)
    with caplog.at_level(logging.INFO, logger="service.batch.progress"):
        progress(Record("a.csv", 0, "p", "", 1, "ok", "images/a/0.png", False))
        assert caplog.messages == []  # not yet: one line per interval
        progress(Record("a.csv", 1, "", "", None, "failed", error="empty prompt"))
    progress.close()
    assert stream.getvalue() == ""
    assert len(caplog.messages) == 1
    assert "2/2 rows (1 failed)" in caplog.messages[0] and "images/s" in caplog.messages[0]
    assert "ETA" in caplog.messages[0]


@pytest.mark.parametrize(("max_retries", "fails"), [(0, 1), (2, 2), (2, 5), (3, 3)])
def test_a_storage_write_is_retried_with_backoff_then_its_own_error_is_raised(
    max_retries: int, fails: int, caplog: pytest.LogCaptureFixture
) -> None:
    import time

    from service.batch.process import RetryPolicy, with_retries
    from service.storage import StorageError

    calls: list[float] = []

    def write() -> str:
        calls.append(time.monotonic())
        if len(calls) <= fails:
            raise StorageError(f"cannot write s3://b/x: failure {len(calls)}")
        return "written"

    policy = RetryPolicy(max_retries=max_retries, delay_s=0.02)
    with caplog.at_level(logging.WARNING, logger="service.batch.process"):
        if fails <= max_retries:
            assert with_retries(write, policy, "writing x") == "written"
        else:  # the last failure itself, not a wrapper of the retry library's
            with pytest.raises(StorageError, match=f"failure {max_retries + 1}$"):
                with_retries(write, policy, "writing x")
    assert len(calls) == min(fails, max_retries) + 1
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    assert all(gap >= 0.02 * 2**n * 0.9 for n, gap in enumerate(gaps)), gaps  # 0.02 s, then 0.04...
    warned = [r.getMessage() for r in caplog.records]
    attempts = max_retries + 1
    assert warned == [
        f"writing x failed (attempt {n} of {attempts}), retrying: cannot write s3://b/x: failure {n}"
        for n in range(1, len(gaps) + 1)
    ]


def test_the_runtime_does_not_import_pandas() -> None:
    import subprocess
    import sys

    code = "import sys, service.batch.command, service.batch.runner, service.batch.files.formats; "
    code += "print('pandas' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False", done.stderr
