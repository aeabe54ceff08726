"""Azure's own text-to-image batch notebook (azureml-examples, text-to-image-batch-endpoint.ipynb)
against `sd-endpoint batch` and the Azure ML entry script: the notebook's input layout (chunks of two
prompts written with ``to_csv()``, index included) with a Parquet file and a stray .docx beside
them, in a local folder and in Azurite; the notebook's own read of predictions.csv out."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from service.cli.main import main
from tests.batch.azureml_driver import append_like_azure, entry_script
from tests.helpers.blobs import Azurite

FAST = ["--model", "random:tiny", "--steps", "2", "--batch-size", "4"]
# The notebook's read, verbatim but for the file's path.
NOTEBOOK_NAMES = [
    "row_number_per_file",
    "prompt",
    "generated_image",
    "nsfw_content_detected",
    "input_csv_name",
]
PROMPTS = [
    "a red fox in the snow",
    "a heron at dawn, watercolour",
    'a "quoted" lighthouse',
    "a harbour\nat night",
    "the moon",
]
PARQUET_PROMPTS = ["a tree on a hill", "a field of wheat"]
EXPECTED = {
    **{(f"{i - i % 2}batch_input.csv", i % 2): prompt for i, prompt in enumerate(PROMPTS)},
    **{("more.parquet", i): prompt for i, prompt in enumerate(PARQUET_PROMPTS)},
}


def notebook_inputs() -> dict[str, bytes]:
    """The files of the notebook's input folder, as its cells write them, plus a Parquet and a .docx."""
    batch_df = pd.DataFrame({"prompt": PROMPTS})
    files: dict[str, bytes] = {}
    batch_size_per_predict = 2
    for i in range(0, len(batch_df), batch_size_per_predict):
        j = i + batch_size_per_predict
        files[f"{i}batch_input.csv"] = batch_df[i:j].to_csv().encode()  # with the index column
    buffer = io.BytesIO()
    pd.DataFrame({"prompt": PARQUET_PROMPTS, "seed": [3, None]}).to_parquet(buffer)
    files["more.parquet"] = buffer.getvalue()
    files["notes.docx"] = b"PK\x03\x04 a word document, not prompts"
    return files


def read_predictions(data: bytes) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(data), header=None, names=NOTEBOOK_NAMES)


def assert_notebook_read_works(score_df: pd.DataFrame, image_bytes: Callable[[str], bytes]) -> None:
    """Every prompt once, in the right columns; every generated_image an existing PNG."""
    assert list(score_df.columns) == NOTEBOOK_NAMES
    found = {
        (name, int(row)): prompt
        for name, row, prompt in zip(
            score_df["input_csv_name"], score_df["row_number_per_file"], score_df["prompt"], strict=True
        )
    }
    assert len(score_df) == len(EXPECTED) and found == EXPECTED
    assert score_df["nsfw_content_detected"].tolist() == [False] * len(EXPECTED)  # random:tiny never flags
    for path in score_df["generated_image"]:
        with Image.open(io.BytesIO(image_bytes(path))) as png:
            assert png.format == "PNG" and png.size == (128, 128)


@dataclass
class Place:
    input: str
    output: str
    read_output: Callable[[str], bytes]


@pytest.fixture(params=["local", "azurite"])
def place(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Place]:
    """The notebook's input folder, and an output beside it, in a local folder or an Azurite container."""
    files = notebook_inputs()
    if request.param == "local":
        for name, data in files.items():
            (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "in" / name).write_bytes(data)
        yield Place(
            str(tmp_path / "in"), str(tmp_path / "out"), lambda p: (tmp_path / "out" / p).read_bytes()
        )
        return
    from azure.storage.blob import BlobServiceClient

    azurite: Azurite = request.getfixturevalue("azurite")
    for name, value in azurite.env().items():
        monkeypatch.setenv(name, value)
    container = azurite.new_container()
    client = BlobServiceClient.from_connection_string(azurite.connection_string)
    blobs = client.get_container_client(container)
    for name, data in files.items():
        blobs.upload_blob(f"processed_batch_data/{name}", data)
    yield Place(
        f"az://{container}/processed_batch_data",
        f"az://{container}/score",
        lambda p: bytes(blobs.download_blob(f"score/{p}").readall()),
    )


@pytest.mark.slow
def test_the_notebooks_read_of_predictions_csv_gives_every_prompt_once_in_its_columns(
    place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["batch", "--input", place.input, "--output", place.output, *FAST]) == 0
    captured = capsys.readouterr()
    assert_notebook_read_works(read_predictions(place.read_output("predictions.csv")), place.read_output)
    # The .docx is named, with why, in the log and in summary.json; nothing else is skipped.
    summary = json.loads(place.read_output("summary.json"))
    assert [f["path"] for f in summary["skipped_files"]] == ["notes.docx"]
    assert "not a prompt file (.docx)" in summary["skipped_files"][0]["reason"]
    assert "skipping" in captured.err and "notes.docx" in captured.err
    assert (summary["total"], summary["done"], summary["failed"]) == (len(EXPECTED), len(EXPECTED), 0)
    # The detailed table reads with its own header: seeds (a row's own wins), status, parameters.
    detailed = pd.read_csv(io.BytesIO(place.read_output("predictions-detailed.csv")))
    assert detailed["status"].tolist() == ["ok"] * len(EXPECTED)
    assert detailed.set_index(["input_csv_name", "row_number_per_file"]).loc[("more.parquet", 0), "seed"] == 3
    assert set(detailed["num_inference_steps"]) == {2}


@pytest.mark.slow
def test_the_entry_scripts_rows_read_back_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Azure mounts the input folder and hands run() mini-batches of file paths, the .docx included.
    inputs, output = tmp_path / "processed_batch_data", tmp_path / "score"
    inputs.mkdir()
    for name, data in notebook_inputs().items():
        (inputs / name).write_bytes(data)
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    monkeypatch.setenv("AZUREML_BI_OUTPUT_PATH", str(output))
    monkeypatch.setenv("SD_MODEL", "random:tiny")
    monkeypatch.setenv("SD_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("SD_BATCH_PARAMS", '{"num_inference_steps": 2}')
    script = entry_script()
    script.init()
    paths = sorted(str(p) for p in inputs.iterdir())
    predictions = output / "predictions.csv"  # where append_row writes, in the same output folder
    for start in range(0, len(paths), 3):  # mini_batch_size: 3
        append_like_azure(predictions, script.run(paths[start : start + 3]))
    assert_notebook_read_works(
        read_predictions(predictions.read_bytes()), lambda p: (output / p).read_bytes()
    )
