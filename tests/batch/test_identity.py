"""A job's identity: an output is only resumed by the job it was made from. Another input (edited,
added, removed or replaced files) or other parameters are refused with one line and exit 2, unless
the user asks to continue or to start over; never a "complete" over rows that were never drawn."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from service.cli.main import main
from tests.helpers.blobs import Azurite, MotoS3

FAST = ["--model", "random:tiny", "--steps", "2", "--batch-size", "2"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object], str]:
    capsys.readouterr()
    code = main(["batch", *args, *FAST])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}, captured.err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if line.startswith("sd-endpoint batch: error:")]
    return line


def prompts_in(output: Path) -> list[str]:
    text = (output / "predictions.csv").read_text()
    return [row[1] for row in csv.reader(io.StringIO(text))]


def write(folder: Path, name: str, prompts: list[str]) -> None:
    (folder / name).write_text("prompt\n" + "".join(f"{p}\n" for p in prompts))


def first_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], **files: list[str]
) -> tuple[Path, Path, list[str]]:
    """A finished job over ``files`` (name -> prompts of NAME.csv): its input, output and arguments."""
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name, prompts in files.items():
        write(inputs, f"{name}.csv", prompts)
    args = ["--input", str(inputs), "--output", str(output)]
    code, summary, err = run(capsys, *args)
    assert code == 0 and summary["complete"] is True, err
    return inputs, output, args


# Ways the input can differ from the one an output was made from, and the change each names.
CHANGES: list[tuple[str, Callable[[Path], None], str]] = [
    ("another job's file", lambda f: write(f, "a.csv", ["B0", "B1", "B2", "B3"]), "a.csv changed"),
    ("a file cut to one new row", lambda f: write(f, "a.csv", ["new"]), "a.csv changed"),
    ("an edit of the same size", lambda f: write(f, "a.csv", ["A0", "A1", "X2"]), "a.csv changed"),
    ("a file added", lambda f: write(f, "c.csv", ["C0"]), "c.csv new"),
    ("a file removed", lambda f: (f / "b.csv").unlink(), "b.csv gone"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "change", "named"), CHANGES, ids=[c[0] for c in CHANGES])
def test_another_input_is_refused_naming_what_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, change: Callable[[Path], None], named: str
) -> None:
    inputs, output, args = first_job(tmp_path, capsys, a=["A0", "A1", "A2"], b=["B"])
    before = (output / "predictions.csv").read_bytes()

    change(inputs)
    code, summary, err = run(capsys, *args)
    assert code == 2 and summary == {}
    line = one_error_line(err)
    assert named in line and "--continue" in line and "--start-over" in line, line
    assert (output / "predictions.csv").read_bytes() == before  # nothing touched


def test_continue_keeps_unchanged_files_and_draws_every_row_of_the_changed_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs, output, args = first_job(tmp_path, capsys, a=["A0", "A1", "A2"], b=["B"], gone=["G"])
    kept = (output / "records" / "b" / "0.json").stat().st_mtime_ns

    write(inputs, "a.csv", ["N0", "N1", "N2", "N3"])
    (inputs / "gone.csv").unlink()
    code, summary, err = run(capsys, *args, "--continue")
    assert code == 0, err
    assert (summary["total"], summary["done"], summary["skipped"], summary["generated"]) == (5, 5, 1, 4)
    assert sorted(prompts_in(output)) == ["B", "N0", "N1", "N2", "N3"]  # nothing of the old a.csv
    assert (output / "records" / "b" / "0.json").stat().st_mtime_ns == kept
    assert not (output / "records" / "gone").exists() or not any((output / "records" / "gone").iterdir())
    # job.json now records the new input: a plain run resumes it
    code, summary, err = run(capsys, *args)
    assert code == 0 and (summary["generated"], summary["complete"]) == (0, True), err


def test_start_over_removes_the_results_and_runs_anew_even_with_other_parameters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs, output, args = first_job(tmp_path, capsys, a=["A0", "A1"])
    (output / "notes.txt").write_text("mine")  # not a result: stays

    write(inputs, "a.csv", ["B0"])
    code, _, err = run(capsys, *args, "--seed", "5")
    assert code == 2 and "--start-over" in one_error_line(err)
    code, summary, err = run(capsys, *args, "--seed", "5", "--start-over")
    assert code == 0, err
    assert (summary["total"], summary["generated"], summary["skipped"]) == (1, 1, 0)
    assert prompts_in(output) == ["B0"]
    assert sorted(p.name for p in (output / "images" / "a").iterdir()) == ["0.png"]
    assert (output / "notes.txt").read_text() == "mine"
    # other parameters: refused, start-over named as a way out
    code, _, err = run(capsys, *args, "--guidance", "3")
    assert code == 2 and "--start-over" in one_error_line(err)


def test_results_without_a_job_json_are_not_taken_for_a_new_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, output, args = first_job(tmp_path, capsys, a=["A0", "A1"])
    parameters = json.loads((output / "job.json").read_text())["parameters"]
    (output / "job.json").unlink()
    code, _, err = run(capsys, *args)
    assert code == 2 and "no job.json" in one_error_line(err)
    # a job.json of an earlier version, which recorded no inputs
    (output / "job.json").write_text(json.dumps({"parameters": parameters}))
    code, _, err = run(capsys, *args)
    assert code == 2 and "records no inputs" in one_error_line(err)


@pytest.mark.parametrize("backend", ["s3", "azure"])
def test_a_blob_input_replaced_by_another_job_is_refused_and_continued(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    store: MotoS3 | Azurite = request.getfixturevalue("moto_s3" if backend == "s3" else "azurite")
    for name in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in store.env().items():
        monkeypatch.setenv(name, value)
    if isinstance(store, MotoS3):
        bucket, client = store.new_bucket(), store._client()
        root = f"s3://{bucket}"

        def put(key: str, body: bytes) -> None:
            client.put_object(Bucket=bucket, Key=key, Body=body)

        def get(key: str) -> bytes:
            return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    else:
        from azure.storage.blob import BlobServiceClient

        container = store.new_container()
        blobs = BlobServiceClient.from_connection_string(store.connection_string)
        root = f"az://{container}"

        def put(key: str, body: bytes) -> None:
            blobs.get_container_client(container).upload_blob(key, body, overwrite=True)

        def get(key: str) -> bytes:
            return bytes(blobs.get_container_client(container).download_blob(key).readall())

    put("in/a.jsonl", b'{"prompt": "A0"}\n{"prompt": "A1"}\n{"prompt": "A2"}\n')
    put("in/b.txt", b"kept\n")
    args = ["--input", f"{root}/in", "--output", f"{root}/out"]
    assert run(capsys, *args)[0] == 0
    put("in/a.jsonl", b'{"prompt": "B0"}\n{"prompt": "B1"}\n')
    code, _, err = run(capsys, *args)
    assert code == 2 and "a.jsonl changed" in one_error_line(err)
    code, summary, err = run(capsys, *args, "--continue")
    assert code == 0, err
    counts = (summary["total"], summary["generated"], summary["skipped"], summary["complete"])
    assert counts == (3, 2, 1, True)
    body = get("out/predictions.csv").decode()
    assert [row[1] for row in csv.reader(io.StringIO(body))] == ["B0", "B1", "kept"]
    assert "A2" not in get("out/predictions-detailed.csv").decode()  # the old third row is gone
