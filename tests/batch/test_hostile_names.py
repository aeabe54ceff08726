"""Names from storage that could lead out of the output (object keys, blob names, local names) and
symbolic links out of the input folder: refused and named in the summary, while the rest of the job
runs; on a local folder, S3 (moto) and Azure Blob (Azurite)."""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

import pytest

from service.cli.main import main
from service.storage import StorageError, open_storage
from service.storage.names import unsafe_name_reason, walk_local
from tests.helpers.blobs import Azurite, MotoS3

FAST = ["--model", "random:tiny", "--steps", "2", "--batch-size", "2"]
PROMPTS = b"prompt\nan escaped row\n"
# Keys an attacker with write access to the input bucket could choose, and what each tries.
HOSTILE = [
    "sub/../../../../../../tmp/pwned-{tag}/x.csv",  # .. segments out of the output root
    "sub/../../escape-{tag}.csv",
    "..\\..\\win-{tag}.csv",  # a backslash: a separator on Windows, a name on Linux
    "ctl\x01{tag}.csv",  # control characters
    "line\nbreak-{tag}.csv",
    "esc\x1b[31m{tag}.csv",
    "dot/./twice-{tag}.csv",
    "empty//segment-{tag}.csv",
]
# Azurite answers a listing that would hold C0 controls with a 500 or drops them from the names it
# lists (XML 1.0 cannot carry them; the service encodes them), so its names keep to the rest. Azure
# turns a backslash into '/', which makes the third name one of '..' segments.
AZURE_HOSTILE = [key for key in HOSTILE if not any(ord(char) < 32 for char in key)] + [
    "sub\\..\\..\\..\\deep-{tag}.csv",
    "/leading-{tag}.csv",
]


def test_unsafe_names_are_recognised() -> None:
    for name in ["/etc/x.csv", "C:/x.csv", "a/../b.csv", "..", "a\x00b", "a\\b", "\udcff.csv", "a\u2028b"]:
        assert unsafe_name_reason(name), name
    for name in ["a.csv", "sub/b.jsonl", "é/日本.txt", "..a.csv", "a..b/c.csv", "=HYPERLINK(1).csv"]:
        assert unsafe_name_reason(name) == "", name


def test_local_listing_survives_deep_nesting_and_link_bombs(tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    folder = deep
    folder.mkdir()
    for _ in range(300):
        folder = folder / "d"
        folder.mkdir()
    (folder / "bottom.csv").write_bytes(PROMPTS)
    # deeper than the recursion limit allows from here (a tree deeper than the real limit would
    # break the recursive rmtree that cleans temporary folders up)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 100)
    try:
        listed = [path for path, reason in walk_local(str(deep)) if not reason]
    finally:
        sys.setrecursionlimit(limit)
    assert listed == ["d/" * 300 + "bottom.csv"]
    # ten folders, each with ten links to the next: 10^10 paths if links were walked each time
    bomb = tmp_path / "bomb"
    for level in range(10):
        (bomb / f"l{level}").mkdir(parents=True)
        (bomb / f"l{level}" / "p.txt").write_text("x\n")
    for level in range(9):
        for link in range(10):
            (bomb / f"l{level}" / f"to{link}").symlink_to(bomb / f"l{level + 1}")
    listed = list(walk_local(str(bomb)))
    assert len(listed) < 200 and sum(1 for _, reason in listed if not reason) == 10


def test_storage_refuses_to_write_or_read_outside_its_root(tmp_path: Path) -> None:
    store = open_storage(str(tmp_path / "root"))
    for name in ["../x.png", "a/../../x.png", "/abs.png", "a\\b.png", "a\x00.png"]:
        with pytest.raises(StorageError, match="refusing the path"):
            store.write(name, b"x")
        with pytest.raises(StorageError, match="refusing the path"):
            store.read(name)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "abs.png").exists()


def test_foreign_names_among_the_records_do_not_stop_a_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "ok.csv").write_bytes(PROMPTS)
    assert run_job(capsys, "--input", str(inputs), "--output", str(output))[0] == 0
    for name in ["ok/\u00b2.json", "ok/" + "9" * 200 + ".json", "ok/a\\b/1.json", "ok/\x01/2.json"]:
        (output / "records" / name).parent.mkdir(parents=True, exist_ok=True)
        (output / "records" / name).write_text("{}")
    code, summary, err = run_job(capsys, "--input", str(inputs), "--output", str(output))
    assert code == 0 and (summary["skipped"], summary["complete"]) == (1, True), err


def run_job(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object], str]:
    capsys.readouterr()
    code = main(["batch", *args, *FAST])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}, captured.err


def check_summary(summary: dict[str, object], hostile: list[str]) -> None:
    assert (summary["total"], summary["done"], summary["complete"]) == (1, 1, True)
    skipped = summary["skipped_files"]
    assert isinstance(skipped, list)
    reasons = {entry["path"]: entry["reason"] for entry in skipped}
    assert len(reasons) == len(hostile), reasons
    assert all("cannot name an output folder" in reason for reason in reasons.values()), reasons
    for name in reasons:  # named printably: no raw control character reaches summary.json
        assert not any(ord(char) < 32 for char in name), name


def test_hostile_local_names_and_links_are_skipped_and_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs, outside, output = tmp_path / "in", tmp_path / "outside", tmp_path / "out"
    (inputs / "deep").mkdir(parents=True)
    outside.mkdir()
    (inputs / "ok.csv").write_bytes(PROMPTS)
    names = ["ctl\x01.csv", "tab\there.csv", "back\\slash.csv", "nl\nname.csv", "esc\x1b.csv"]
    for name in names:
        (inputs / name).write_bytes(PROMPTS)
    os.mkfifo(inputs / "pipe.csv")  # a read would block forever
    raw = os.fsencode(inputs) + b"/\xff\xfe.csv"  # not UTF-8: once a traceback in derive_seed
    with open(raw, "wb") as handle:
        handle.write(PROMPTS)
    # symbolic links out of the folder (files and folders), a broken one, and a loop
    (outside / "secret.txt").write_text("root:x:0:0\n")
    (outside / "secrets").mkdir()
    (outside / "secrets" / "s.csv").write_bytes(b"prompt\nsecret\n")
    (inputs / "passwd.txt").symlink_to("/etc/passwd")
    (inputs / "secret.txt").symlink_to(outside / "secret.txt")
    (inputs / "relative.txt").symlink_to("../outside/secret.txt")
    (inputs / "folder").symlink_to(outside / "secrets")
    (inputs / "deep" / "up").symlink_to("../../outside/secrets")
    (inputs / "deep" / "loop").symlink_to("..")
    (inputs / "broken.csv").symlink_to(inputs / "gone.csv")
    (inputs / "deep" / "inside.csv").symlink_to("../ok.csv")  # inside the folder: read

    code, summary, err = run_job(capsys, "--input", str(inputs), "--output", str(output))
    assert code == 0, err
    assert (summary["total"], summary["done"], summary["complete"]) == (2, 2, True)
    skipped = summary["skipped_files"]
    assert isinstance(skipped, list)
    reasons = {entry["path"]: entry["reason"] for entry in skipped}
    links = ["passwd.txt", "secret.txt", "relative.txt", "folder", "deep/up"]
    for link in links:
        assert "symbolic link to a place outside the input folder" in reasons[link]
    assert "listed already" in reasons["deep/loop"]
    assert "not a regular file" in reasons["pipe.csv"] and "not a regular file" in reasons["broken.csv"]
    assert "not valid UTF-8" in reasons["\\udcff\\udcfe.csv"]
    assert len(reasons) == len(names) + len(links) + 4, reasons
    assert "secret" not in (output / "predictions.csv").read_text()
    assert "root:x" not in (output / "predictions-detailed.csv").read_text()
    assert sorted(p.name for p in (output / "images").iterdir()) == ["deep", "ok"]


def test_hostile_s3_keys_never_leave_the_output(
    moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in moto_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    bucket, tag = moto_s3.new_bucket(), tmp_path.name
    client = moto_s3._client()
    client.put_object(Bucket=bucket, Key="job/ok.csv", Body=PROMPTS)
    keys = [f"job/{key.format(tag=tag)}" for key in HOSTILE]
    for key in keys:
        try:
            client.put_object(Bucket=bucket, Key=key, Body=PROMPTS)
        except Exception:  # what the server refuses cannot be listed either
            continue
    stored = set(moto_s3.object_names(bucket))
    hostile = [key for key in keys if key in stored]
    assert len(hostile) >= 6, stored  # the store kept them as written

    # into a local folder (where a path could escape) and into the bucket itself
    for output in ("out", f"s3://{bucket}/out"):
        code, summary, err = run_job(capsys, "--input", f"s3://{bucket}/job", "--output", output)
        assert code == 0, err
        check_summary(summary, hostile)
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["ok"]
    assert not Path(f"/tmp/pwned-{tag}").exists() and not (tmp_path / f"escape-{tag}").exists()
    written = [key for key in moto_s3.object_names(bucket) if key.startswith("out/images/")]
    assert written == ["out/images/ok/0.png"]


def test_hostile_azure_blob_names_never_leave_the_output(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from azure.storage.blob import BlobServiceClient

    for name in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in azurite.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    container, tag = azurite.new_container(), tmp_path.name
    client = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        container
    )
    client.upload_blob("job/ok.csv", PROMPTS)
    for key in AZURE_HOSTILE:
        try:
            client.upload_blob(f"job/{key.format(tag=tag)}", PROMPTS)
        except Exception:  # what the service refuses cannot be listed either
            continue
    hostile = [name for name in azurite.blob_names(container) if name != "job/ok.csv"]
    assert len(hostile) >= 3, hostile
    assert any(unsafe_name_reason(name[len("job/") :]) for name in hostile)

    for output in ("out", f"az://{container}/out"):
        code, summary, err = run_job(capsys, "--input", f"az://{container}/job", "--output", output)
        assert code == 0, err
        check_summary(summary, [n for n in hostile if unsafe_name_reason(n[len("job/") :])])
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["ok"]
    written = [name for name in azurite.blob_names(container) if name.startswith("out/images/")]
    assert written == ["out/images/ok/0.png"]
