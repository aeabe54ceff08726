"""deploy/azureml/*.yml: loaded offline by the azure-ai-ml SDK and checked against the server's settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from azure.ai.ml import (
    load_batch_deployment,
    load_batch_endpoint,
    load_environment,
    load_online_deployment,
    load_online_endpoint,
)
from azure.ai.ml.entities import Environment, ManagedOnlineDeployment, ManagedOnlineEndpoint
from fastapi.testclient import TestClient

from service.settings import Settings
from service.web.app import create_app
from tests.helpers.deploy import settings_env_names, settings_under

AZUREML = Path(__file__).resolve().parents[2] / "deploy" / "azureml"
# A full model can take minutes to load and warm up; Azure must not give up on the container sooner.
MODEL_LOAD_BUDGET_S = 600
# The SDK loader for each `$schema` a file declares.
LOADERS = {
    "managedOnlineEndpoint.schema.json": load_online_endpoint,
    "managedOnlineDeployment.schema.json": load_online_deployment,
    "batchEndpoint.schema.json": load_batch_endpoint,
    "batchDeployment.schema.json": load_batch_deployment,
    "modelBatchDeployment.schema.json": load_batch_deployment,
    "environment.schema.json": load_environment,
}


def load(path: Path) -> Any:
    schema = yaml.safe_load(path.read_text()).get("$schema", "")
    loader = LOADERS.get(schema.rsplit("/", 1)[-1])
    assert loader, f"{path.name}: unknown or missing $schema {schema!r}; add its loader to LOADERS"
    return loader(path)


def routed(settings: Settings, method: str, path: str) -> bool:
    """Whether the app has a route for `method path` (any answer but 404/405), without loading a model."""
    status = TestClient(create_app(settings)).request(method, path).status_code
    return status not in (404, 405)


@pytest.fixture(scope="module")
def endpoint() -> ManagedOnlineEndpoint:
    loaded = load(AZUREML / "online-endpoint.yml")
    assert isinstance(loaded, ManagedOnlineEndpoint)
    return loaded


# GPUs of the VMs the model catalog lists (and of the A100 NC-series), for the concurrency rule.
GPUS_PER_INSTANCE = {
    "Standard_NC6s_v3": 1, "Standard_NC12s_v3": 2, "Standard_NC24s_v3": 4, "Standard_ND40rs_v2": 8,
    "Standard_ND96asr_v4": 8, "Standard_ND96amsr_A100_v4": 8,
    "Standard_NC24ads_A100_v4": 1, "Standard_NC48ads_A100_v4": 2, "Standard_NC96ads_A100_v4": 4,
}  # fmt: skip
ONLINE_DEPLOYMENTS = ["online-deployment.yml", "online-deployment-multi-gpu.yml"]


@pytest.fixture(scope="module", params=ONLINE_DEPLOYMENTS)
def deployment(request: pytest.FixtureRequest) -> ManagedOnlineDeployment:
    loaded = load(AZUREML / request.param)
    assert isinstance(loaded, ManagedOnlineDeployment)
    return loaded


@pytest.fixture()
def settings(deployment: ManagedOnlineDeployment, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What the server in the container reads (the image's defaults overridden by the deployment)."""
    return settings_under(dict(deployment.environment_variables), monkeypatch)


@pytest.mark.parametrize("path", sorted(AZUREML.glob("*.yml")), ids=lambda p: p.name)
def test_every_yaml_loads_with_the_sdk(path: Path) -> None:
    assert load(path) is not None


def test_batch_deployment_belongs_to_the_batch_endpoint() -> None:
    endpoint_file, deployment_file = AZUREML / "batch-endpoint.yml", AZUREML / "batch-deployment.yml"
    if not (endpoint_file.exists() and deployment_file.exists()):
        pytest.skip("the batch endpoint and deployment files are not there (yet)")
    assert load(deployment_file).endpoint_name == load(endpoint_file).name


def test_deployment_belongs_to_the_endpoint(
    endpoint: ManagedOnlineEndpoint, deployment: ManagedOnlineDeployment
) -> None:
    assert deployment.endpoint_name == endpoint.name
    assert endpoint.auth_mode == "key", "Azure's front end should check keys (two, rotatable)"


def test_routes_are_the_servers_routes_on_its_port(
    deployment: ManagedOnlineDeployment, settings: Settings
) -> None:
    environment = deployment.environment
    assert isinstance(environment, Environment), "define the custom container's environment inline"
    config = environment.inference_config
    assert config, "the environment needs an inference_config (the container's routes)"
    routes = {name: config[f"{name}Route"] for name in ("liveness", "readiness", "scoring")}
    assert routes["liveness"]["path"] == "/" and routes["readiness"]["path"] == "/", (
        "Azure's probes must ask GET /, which answers 200 only once the model is ready"
    )
    assert routes["scoring"]["path"] == "/score"
    for name, route in routes.items():
        assert route["port"] == settings.port, (
            f"the {name} route's port {route['port']} is not the server's {settings.port}"
        )
        method = "POST" if name == "scoring" else "GET"
        assert routed(settings, method, route["path"]), (
            f"the app has no {method} {route['path']} ({name} route)"
        )


def test_concurrency_and_timeout_match_the_servers_batching(
    deployment: ManagedOnlineDeployment, settings: Settings
) -> None:
    request = deployment.request_settings
    assert request is not None, "set request_settings"
    assert request.request_timeout_ms == 90_000
    # Azure lets this many requests in at once; more queue there, and the server batches what arrives:
    # one full batch per GPU (one engine each, SD_DEVICES).
    gpus = GPUS_PER_INSTANCE.get(deployment.instance_type or "")
    assert gpus, f"{deployment.instance_type}: add its GPU count to GPUS_PER_INSTANCE"
    devices = settings.device_list
    assert devices == ("all",) or len(devices) == gpus, (
        f"SD_DEVICES lists {len(devices)} devices; {deployment.instance_type} has {gpus} GPUs: set all"
    )
    assert request.max_concurrent_requests_per_instance == settings.max_batch_size * gpus, (
        f"max_concurrent_requests_per_instance {request.max_concurrent_requests_per_instance} must be "
        f"SD_MAX_BATCH_SIZE {settings.max_batch_size} x {gpus} GPUs ({deployment.instance_type})"
    )
    assert settings.max_queue_items >= request.max_concurrent_requests_per_instance, (
        "SD_MAX_QUEUE_ITEMS must hold at least one image of every request Azure lets in, or it answers 429"
    )
    assert settings.request_timeout_s * 1000 < request.request_timeout_ms, (
        "SD_REQUEST_TIMEOUT_S must end before Azure's request_timeout_ms, so clients get the server's 504"
    )
    assert settings.drain_timeout_s >= settings.request_timeout_s, (
        "SD_DRAIN_TIMEOUT_S must be at least SD_REQUEST_TIMEOUT_S, so that an update never cuts off a "
        "request the instance accepted"
    )


def test_the_defaults_drain_at_least_as_long_as_a_request_may_take() -> None:
    defaults = Settings()
    assert defaults.drain_timeout_s >= defaults.request_timeout_s


def test_probes_wait_long_enough_for_a_model_load(deployment: ManagedOnlineDeployment) -> None:
    for name in ("liveness_probe", "readiness_probe"):
        probe = getattr(deployment, name)
        budget = probe.initial_delay + probe.period * probe.failure_threshold
        assert budget >= MODEL_LOAD_BUDGET_S, (
            f"{name} gives up after {budget} s, before a model load may finish ({MODEL_LOAD_BUDGET_S} s): "
            "raise initial_delay or failure_threshold"
        )


def test_gpu_instance_and_a_model_where_azure_mounts_it(
    deployment: ManagedOnlineDeployment, settings: Settings
) -> None:
    # Azure's GPU VM families are the N series (NC, ND, NV).
    assert re.fullmatch(r"Standard_N[CDV]\w+", deployment.instance_type or ""), (
        f"{deployment.instance_type} is not a GPU SKU"
    )
    name, version = str(deployment.model).removeprefix("azureml:").split(":")
    # Azure mounts a registered model at AZUREML_MODEL_DIR = /var/azureml-app/azureml-models/<name>/<version>.
    assert settings.model_spec == f"/var/azureml-app/azureml-models/{name}/{version}", (
        f"SD_MODEL {settings.model_spec!r} is not where Azure mounts model {name}:{version}"
    )


def test_environment_variables_are_server_settings(deployment: ManagedOnlineDeployment) -> None:
    unknown = {
        name for name in deployment.environment_variables if name.startswith("SD_")
    } - settings_env_names()
    assert not unknown, (
        f"online-deployment.yml sets {sorted(unknown)}, which Settings does not read (a typo?)"
    )
