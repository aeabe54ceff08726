"""`sd-endpoint batch` against real blob servers: Azure Blob (Azurite) and S3 (moto server)."""

from __future__ import annotations

import csv
import io
import json

import pytest
from PIL import Image

from service.cli.main import main
from tests.helpers.blobs import Azurite, MotoS3

pytestmark = pytest.mark.slow

FAST = ["--model", "random:tiny", "--steps", "2", "--batch-size", "2"]
CSV = "prompt,seed\na red cat,1\n,\na blue dog,\n"
JSONL = '{"prompt": "a tree"}\n'
OUTPUTS = [
    "out/images/a/0.png", "out/images/a/2.png", "out/images/b/0.png", "out/job.json",
    "out/predictions-detailed.csv", "out/predictions.csv", "out/records/a/0.json", "out/records/a/1.json",
    "out/records/a/2.json", "out/records/b/0.json", "out/summary.json",
]  # fmt: skip


def batch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object] | None, str]:
    capsys.readouterr()
    code = main(["batch", *args, *FAST])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else None), captured.err


@pytest.fixture()
def azure_env(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> Azurite:
    for name in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in azurite.env().items():
        monkeypatch.setenv(name, value)
    return azurite


def test_azure_blob_job_and_rerun(azure_env: Azurite, capsys: pytest.CaptureFixture[str]) -> None:
    from azure.storage.blob import BlobServiceClient

    container = azure_env.new_container()
    client = BlobServiceClient.from_connection_string(azure_env.connection_string).get_container_client(
        container
    )
    client.upload_blob("in/a.csv", CSV.encode())
    client.upload_blob("in/b.jsonl", JSONL.encode())
    args = ["--input", f"az://{container}/in", "--output", f"az://{container}/out"]

    code, summary, err = batch(capsys, *args)
    assert code == 0, err
    assert summary is not None and (summary["total"], summary["done"], summary["failed"]) == (4, 3, 1)
    assert azure_env.blob_names(container) == sorted(["in/a.csv", "in/b.jsonl", *OUTPUTS])
    with Image.open(io.BytesIO(client.download_blob("out/images/a/0.png").readall())) as image:
        assert image.size == (128, 128)
    detailed = client.download_blob("out/predictions-detailed.csv").readall().decode()
    table = list(csv.DictReader(io.StringIO(detailed)))
    assert [(r["input_csv_name"], r["row_number_per_file"], r["status"]) for r in table] == [
        ("a.csv", "0", "ok"), ("a.csv", "1", "failed"), ("a.csv", "2", "ok"), ("b.jsonl", "0", "ok"),
    ]  # fmt: skip
    etags = {b.name: b.etag for b in client.list_blobs(name_starts_with="out/records/")}

    code, summary, err = batch(capsys, *args)
    assert code == 0, err
    assert summary is not None and (summary["skipped"], summary["generated"], summary["done"]) == (4, 0, 3)
    assert {b.name: b.etag for b in client.list_blobs(name_starts_with="out/records/")} == etags


def test_azure_without_credentials_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
                 "AZURE_STORAGE_SAS_TOKEN"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    code, summary, err = batch(capsys, "--input", "az://container/in", "--output", "az://container/out")
    assert code == 2 and summary is None
    assert "AZURE_STORAGE_CONNECTION_STRING" in err and "Traceback" not in err


def test_azure_output_in_a_missing_container_is_refused_before_generating(
    azure_env: Azurite, capsys: pytest.CaptureFixture[str]
) -> None:
    from azure.storage.blob import BlobServiceClient

    container = azure_env.new_container()
    client = BlobServiceClient.from_connection_string(azure_env.connection_string)
    client.get_container_client(container).upload_blob("in/a.csv", CSV.encode())
    code, _, err = batch(capsys, "--input", f"az://{container}/in", "--output", "az://no-such-container/out")
    assert code == 2
    assert "cannot write to the output" in err and "container does not exist" in err


def test_s3_job_from_a_single_file_with_an_endpoint_flag_and_rerun(
    moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in moto_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the flag below must be enough
    bucket = moto_s3.new_bucket()
    moto_s3._client().put_object(Bucket=bucket, Key="in/a.csv", Body=CSV.encode())
    moto_s3._client().put_object(Bucket=bucket, Key="in/ignored.csv", Body=b"prompt\nnot me\n")
    args = ["--input", f"s3://{bucket}/in/a.csv", "--output", f"s3://{bucket}/out",
            "--s3-endpoint-url", moto_s3.endpoint_url]  # fmt: skip

    code, summary, err = batch(capsys, *args)
    assert code == 0, err
    assert summary is not None and (summary["total"], summary["done"], summary["failed"]) == (3, 2, 1)
    expected = [name for name in OUTPUTS if "/b/" not in name]
    assert moto_s3.object_names(bucket) == sorted(["in/a.csv", "in/ignored.csv", *expected])

    code, summary, err = batch(capsys, *args)
    assert code == 0, err
    assert summary is not None and (summary["skipped"], summary["generated"]) == (3, 0)
