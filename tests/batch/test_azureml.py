"""The Azure ML batch deployment: its entry script run as Azure runs it, and its YAML loaded offline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from azure.ai.ml import load_batch_deployment, load_batch_endpoint

from service.batch.params import JobParams
from service.settings import Settings
from tests.batch.azureml_driver import AZUREML, append_like_azure, entry_script

AZURE_COLUMNS = [
    "row_number_per_file",
    "prompt",
    "generated_image",
    "nsfw_content_detected",
    "input_csv_name",
]


@pytest.mark.slow
def test_entry_script_scores_each_row_once_even_when_azure_retries_a_mini_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "output"
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    monkeypatch.setenv("AZUREML_BI_OUTPUT_PATH", str(output))
    monkeypatch.setenv("SD_MODEL", "random:tiny")
    monkeypatch.setenv("SD_MAX_BATCH_SIZE", "2")
    monkeypatch.setenv("SD_BATCH_PARAMS", '{"num_inference_steps": 2}')
    (tmp_path / "a.csv").write_text(",prompt\n0,a red cat\n1,\n2,a blue dog\n")  # as pandas writes it
    (tmp_path / "b.csv").write_text(",prompt\n0,a tree\n")
    mini_batch = [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
    script = entry_script()
    script.init()

    first = script.run(mini_batch)
    append_like_azure(output / "predictions.csv", first)
    table = pd.read_csv(output / "predictions.csv", header=None, names=AZURE_COLUMNS)
    # One line per image, Azure's five columns: the failed row (no prompt) is not an image.
    assert table[["input_csv_name", "row_number_per_file", "prompt", "generated_image"]].values.tolist() == [
        ["a.csv", 0, "a red cat", "images/a/0.png"],
        ["a.csv", 2, "a blue dog", "images/a/2.png"],
        ["b.csv", 0, "a tree", "images/b/0.png"],
    ]
    assert (
        sorted(str(p.relative_to(output)) for p in output.rglob("*.png")) == table["generated_image"].tolist()
    )
    assert "row 1 of a.csv failed: empty prompt" in capsys.readouterr().err  # the log; its record too
    records = {p: p.stat().st_mtime_ns for p in output.rglob("*.json")}
    job = json.loads((output / "job.json").read_text())["parameters"]
    assert job["num_inference_steps"] == 2 and isinstance(job["seed"], int)  # the job seed is kept

    # Azure retries a mini-batch after a timeout: nothing is generated again, the rows come back once.
    again = script.run(mini_batch)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*.json")} == records
    # Another worker of the same job (its init runs too) agrees on the job seed.
    script.init()
    assert script.run(mini_batch) == first


def test_batch_deployment_yaml_loads_and_fits_diffusion() -> None:
    deployment = load_batch_deployment(AZUREML / "batch-deployment.yml")
    endpoint = load_batch_endpoint(AZUREML / "batch-endpoint.yml")
    assert deployment.endpoint_name == endpoint.name
    code, retry = deployment.code_configuration, deployment.retry_settings
    assert code is not None and code.code and code.scoring_script and retry is not None
    assert (AZUREML / str(code.code) / code.scoring_script).resolve() == AZUREML / "batch_score.py"
    # Azure's default of 30 s per mini-batch would kill every diffusion mini-batch.
    assert int(retry.timeout) >= 600
    assert deployment.output_action == "append_row" and deployment.output_file_name == "predictions.csv"
    assert deployment.max_concurrency_per_instance == 1, "one model per GPU"
    env = dict(deployment.environment_variables)
    JobParams.from_file(env.pop("SD_BATCH_PARAMS"), "SD_BATCH_PARAMS").check(max_steps=150)
    known = {f"SD_{name.upper()}" for name in Settings.model_fields}
    assert {name for name in env if name.startswith("SD_")} <= known
