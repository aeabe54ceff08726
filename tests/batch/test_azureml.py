"""The Azure ML batch deployment: its entry script run as Azure runs it, and its YAML loaded offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from azure.ai.ml import load_batch_deployment, load_batch_endpoint

from service.batch.params import JobParams
from service.settings import Settings

AZUREML = Path(__file__).resolve().parents[2] / "deploy" / "azureml"
AZURE_COLUMNS = [
    "row_number_per_file",
    "prompt",
    "generated_image",
    "nsfw_content_detected",
    "input_csv_name",
]


def entry_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("batch_score", AZUREML / "batch_score.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_entry_script_scores_each_row_once_even_when_azure_retries_a_mini_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
    assert list(first.columns)[:5] == AZURE_COLUMNS
    assert first[["input_csv_name", "row_number_per_file", "status"]].values.tolist() == [
        ["a.csv", "0", "ok"], ["a.csv", "1", "failed"], ["a.csv", "2", "ok"], ["b.csv", "0", "ok"],
    ]  # fmt: skip
    assert sorted(str(p.relative_to(output)) for p in output.rglob("*.png")) == [
        "images/a/0.png", "images/a/2.png", "images/b/0.png",
    ]  # fmt: skip
    records = {p: p.stat().st_mtime_ns for p in output.rglob("*.json")}

    # Azure retries a mini-batch after a timeout: nothing is generated again, the rows come back once.
    again = script.run(mini_batch)
    assert again.equals(first)
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*.json")} == records


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
