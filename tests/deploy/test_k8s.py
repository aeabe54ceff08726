"""deploy/k8s/*.yaml and deploy/ray/*.yaml: parsed and checked against the server's settings and routes."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from service.hosts.server import FINAL_CLOSE_TIMEOUT_S
from service.settings import Settings
from service.web.app import create_app
from tests.helpers.deploy import settings_env_names, settings_under

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
RAY = ROOT / "deploy" / "ray"
RAY_IMPORT_PATH = "service.hosts.ray_serve:app_builder"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = {path.name: documents(path) for path in sorted(K8S.glob("*.yaml"))}


def one(kind: str) -> dict[str, Any]:
    found = [doc for docs in MANIFESTS.values() for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def image_user() -> int:
    users = re.findall(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "the Dockerfile has no numeric USER"
    return int(users[-1])


def routed(path: str) -> bool:
    """Whether the app has a GET route for `path` (any answer but 404/405), without loading a model."""
    status = TestClient(create_app(Settings(model="random:tiny"))).get(path).status_code
    return status not in (404, 405)


@pytest.fixture(scope="module")
def pod() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    [server] = pod["containers"]
    return dict(server)


@pytest.fixture()
def settings(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What the server reads in the pod; variables from Secrets stay at their defaults."""
    plain = {env["name"]: str(env["value"]) for env in container["env"] if "value" in env}
    return settings_under(plain, monkeypatch)


def test_kustomization_applies_every_manifest() -> None:
    resources = one("Kustomization")["resources"]
    others = {name for name in MANIFESTS if name != "kustomization.yaml"}
    assert set(resources) == others, (
        f"kustomization.yaml lists {sorted(resources)}; the folder: {sorted(others)}"
    )


def test_env_names_are_server_settings(container: dict[str, Any], settings: Settings) -> None:
    names = {env["name"] for env in container["env"]}
    unknown = {name for name in names if name.startswith("SD_")} - settings_env_names()
    assert not unknown, f"the Deployment sets {sorted(unknown)}, which Settings does not read (a typo?)"


def test_one_gpu_and_the_servers_port(container: dict[str, Any], settings: Settings) -> None:
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": settings.port}, (
        f"container ports {ports} differ from the server's {settings.port}"
    )
    # The image's CMD binds 0.0.0.0; a command here would replace it.
    assert "command" not in container and "args" not in container


def test_probes_ask_the_servers_health_routes(container: dict[str, Any]) -> None:
    liveness, readiness = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    # Liveness must not fail while the model loads (minutes); readiness is `/`, 503 until it is ready.
    assert liveness["path"] == "/health/live" and readiness["path"] == "/"
    assert liveness["port"] == readiness["port"] == "http"
    missing = [path for path in (liveness["path"], readiness["path"]) if not routed(path)]
    assert not missing, f"the probes ask {missing}, which the app does not serve"


def test_shutdown_waits_for_the_load_balancer_then_the_drain(
    pod: dict[str, Any], container: dict[str, Any], settings: Settings
) -> None:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", f"preStop should pause so endpoints drop the pod before SIGTERM: {command}"
    pause_s = float(command[1])
    grace_s = pod["terminationGracePeriodSeconds"]
    needed_s = pause_s + settings.drain_timeout_s + FINAL_CLOSE_TIMEOUT_S
    assert grace_s > needed_s, (
        f"terminationGracePeriodSeconds {grace_s} must exceed the preStop pause ({pause_s} s) plus "
        f"SD_DRAIN_TIMEOUT_S ({settings.drain_timeout_s} s) plus the last connections' "
        f"{FINAL_CLOSE_TIMEOUT_S} s, or Kubernetes kills requests still running"
    )
    assert settings.drain_timeout_s >= settings.request_timeout_s, (
        "SD_DRAIN_TIMEOUT_S must be at least SD_REQUEST_TIMEOUT_S, or a rolling update cuts off "
        "requests it accepted"
    )


def test_model_is_read_only_and_the_compile_cache_writable(
    pod: dict[str, Any], container: dict[str, Any], settings: Settings
) -> None:
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {PurePosixPath(mount["mountPath"]): mount for mount in container["volumeMounts"]}

    def mount_of(path: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = [
            mount for where, mount in mounts.items() if PurePosixPath(path).is_relative_to(where)
        ]
        assert found, f"{path} is on no volume: it would vanish with the pod"
        return found[0]

    model = mount_of(settings.model_spec)
    assert model["readOnly"] is True
    assert volumes[model["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert settings.compile_cache_dir is not None
    cache = mount_of(str(settings.compile_cache_dir))
    assert not cache.get("readOnly", False), "the compile cache must be writable"


def test_runs_as_the_images_non_root_user(pod: dict[str, Any]) -> None:
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == image_user()


def test_service_and_monitor_reach_the_pods(container: dict[str, Any]) -> None:
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    service, monitor = one("Service"), one("ServiceMonitor")
    assert service["spec"]["selector"].items() <= labels.items(), "the Service selects none of the pods"
    [port] = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [scrape] = monitor["spec"]["endpoints"]
    assert scrape["port"] == port["name"] and routed(scrape["path"])


def test_autoscaler_scales_the_deployment_on_queue_depth(settings: Settings) -> None:
    scaled = one("ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "prometheus" and "sd_queue_depth" in trigger["metadata"]["query"]
    # One more replica per full batch waiting per replica.
    assert float(trigger["metadata"]["threshold"]) == settings.max_batch_size


# -- Ray ----------------------------------------------------------------------------------------------


def serve_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((RAY / "serve-config.yaml").read_text())
    return config


def ray_service() -> dict[str, Any]:
    [service] = documents(RAY / "rayservice.yaml")
    assert service["kind"] == "RayService"
    return service


def test_serve_configs_are_valid_and_agree() -> None:
    from ray.serve.schema import ServeDeploySchema

    embedded = yaml.safe_load(ray_service()["spec"]["serveConfigV2"])
    for config in (serve_config(), embedded):
        ServeDeploySchema.model_validate(config)
    assert embedded["applications"] == serve_config()["applications"], (
        "rayservice.yaml's serveConfigV2 and serve-config.yaml must deploy the same applications"
    )
    [app] = serve_config()["applications"]
    assert app["import_path"] == RAY_IMPORT_PATH


def test_serve_env_names_are_settings_and_timeouts_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    config = serve_config()
    [app] = config["applications"]
    env = app["runtime_env"]["env_vars"]
    unknown = {name for name in env if name.startswith("SD_")} - settings_env_names()
    assert not unknown, f"the Serve config sets {sorted(unknown)}, which Settings does not read (a typo?)"
    settings = settings_under(env, monkeypatch)
    embedded = yaml.safe_load(ray_service()["spec"]["serveConfigV2"])
    for http_options in (config["http_options"], embedded["http_options"]):
        assert settings.request_timeout_s < http_options["request_timeout_s"], (
            "Serve's request_timeout_s must outlast SD_REQUEST_TIMEOUT_S, so clients get the server's 504"
        )


def test_ray_workers_have_one_gpu_each_and_the_model_read_only() -> None:
    cluster = ray_service()["spec"]["rayClusterConfig"]
    [app] = serve_config()["applications"]
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        [worker] = pod["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == app["args"]["num_gpus"] == 1
        model_path = app["runtime_env"]["env_vars"]["SD_MODEL"]
        model = next(m for m in worker["volumeMounts"] if m["mountPath"] == model_path)
        assert model["readOnly"] is True
        assert pod["securityContext"]["runAsUser"] == image_user()
    # Replicas do not belong on the head: it holds no GPU.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_serve_import_path_builds_the_app() -> None:
    from ray.serve import Application

    module_name, attribute = RAY_IMPORT_PATH.split(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    [app] = serve_config()["applications"]
    # Building binds deployments only; nothing starts and no model loads.
    built = builder(json.loads(json.dumps(app["args"])))
    assert isinstance(built, Application), f"{RAY_IMPORT_PATH}(args) returned {type(built).__name__}"
