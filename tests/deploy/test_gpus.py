"""Every GPU of a VM behind one endpoint, statically: in each deployment (Azure ML online
deployments, the Kubernetes base and its multi-GPU overlay) the GPU count, SD_DEVICES, the batch
size, Azure's concurrency, the queue and KEDA's threshold agree; docs/deploy.md and the YAML's table
of instance types agree with the GPU counts; the image serves every GPU by default; the dashboard
shows the engine-level metrics per engine."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings
from tests.deploy.test_azureml import GPUS_PER_INSTANCE
from tests.deploy.test_docker import image_env
from tests.deploy.test_grafana import dashboard_queries, grouping_labels, metric_names
from tests.helpers.deploy import settings_under

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ENGINE_FAMILIES = (
    "sd_images_generated_total", "sd_running_images", "sd_step_seconds", "sd_admitted_per_step",
    "sd_time_to_first_step_seconds", "sd_batch_size", "sd_engine_failures_total",
)  # fmt: skip


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def json_patch(doc: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 `replace` and `add` (what the overlay uses), as kustomize applies them."""
    doc = copy.deepcopy(doc)
    for operation in operations:
        assert operation["op"] in ("replace", "add"), f"the test does not apply {operation['op']}"
        *parents, last = [
            part.replace("~1", "/").replace("~0", "~") for part in operation["path"][1:].split("/")
        ]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if operation["op"] == "replace":
            assert (key < len(node)) if isinstance(node, list) else (key in node), (
                f"{operation['path']} is absent"
            )
        node[key] = operation["value"]
    return doc


def k8s_variants() -> dict[str, dict[str, dict[str, Any]]]:
    """kind -> document, for the base (deploy/k8s) and each overlay folder under it."""
    base = {doc["kind"]: doc for path in sorted(K8S.glob("*.yaml")) for doc in documents(path)}
    variants = {"deploy/k8s": base}
    for overlay in sorted(K8S.glob("*/kustomization.yaml")):
        [kustomization] = documents(overlay)
        assert kustomization["resources"] == [".."], f"{overlay}: an overlay of deploy/k8s"
        patched = dict(base)
        for patch in kustomization["patches"]:
            kind = patch["target"]["kind"]
            patched[kind] = json_patch(patched[kind], yaml.safe_load(patch["patch"]))
        variants[str(overlay.parent.relative_to(ROOT))] = patched
    return variants


K8S_VARIANTS = k8s_variants()


@pytest.mark.parametrize("where", sorted(K8S_VARIANTS))
def test_each_k8s_variant_serves_every_gpu_of_its_pod_with_queue_and_autoscaler_to_match(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = K8S_VARIANTS[where]
    [container] = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    env = {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}
    settings: Settings = settings_under(env, monkeypatch)
    devices = settings.device_list
    assert devices == ("all",) or len(devices) == gpus, f"{where}: SD_DEVICES {devices} on {gpus} GPUs"
    full = settings.max_batch_size * gpus  # one full batch per GPU
    assert settings.max_queue_items >= full, f"{where}: SD_MAX_QUEUE_ITEMS below {full} (a batch per GPU)"
    [trigger] = kinds["ScaledObject"]["spec"]["triggers"]
    assert float(trigger["metadata"]["threshold"]) == full, (
        f"{where}: KEDA's threshold must be one full batch per GPU waiting per replica ({full})"
    )


def test_the_multi_gpu_overlay_has_more_than_one_gpu() -> None:
    counts = {
        where: kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
            "nvidia.com/gpu"
        ]
        for where, kinds in K8S_VARIANTS.items()
    }
    assert counts == {"deploy/k8s": 1, "deploy/k8s/multi-gpu": 4}


TABLE_ROW = re.compile(r"(Standard_\w+) \((\d+)[^)]*\): (\d+)")


def test_the_instance_table_in_the_online_deployment_agrees_with_the_gpu_counts() -> None:
    text = (ROOT / "deploy" / "azureml" / "online-deployment.yml").read_text()
    rows = TABLE_ROW.findall(text)
    assert {name for name, _, _ in rows} >= {
        "Standard_NC6s_v3", "Standard_NC12s_v3", "Standard_NC24s_v3", "Standard_ND40rs_v2",
        "Standard_ND96asr_v4", "Standard_ND96amsr_A100_v4",
    }  # fmt: skip
    for name, gpus, concurrency in rows:
        assert int(gpus) == GPUS_PER_INSTANCE[name], f"{name} has {GPUS_PER_INSTANCE[name]} GPUs"
        assert int(concurrency) == 8 * int(gpus), f"{name}: max_concurrent_requests_per_instance 8 x {gpus}"


def test_the_docs_table_of_instance_types_agrees_with_the_gpu_counts() -> None:
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    section = deploy.split("## Every GPU of the machine", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(Standard_\w+)` \| (\d+) [^|]*\| (\d+) \|", section, re.MULTILINE)
    assert len(rows) >= 6, "docs/deploy.md's multi-GPU section lists the instance types with their GPUs"
    for name, gpus, concurrency in rows:
        assert int(gpus) == GPUS_PER_INSTANCE[name], f"docs: {name} has {GPUS_PER_INSTANCE[name]} GPUs"
        assert int(concurrency) == 8 * int(gpus), f"docs: {name}'s concurrency is 8 x {gpus}"


def test_the_image_serves_every_gpu_and_leaves_sd_device_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    env = image_env()
    assert "SD_DEVICES" not in env, "an SD_DEVICES in the image would override a user's SD_DEVICE"
    assert settings_under(env, monkeypatch).device_list == ("all",)
    assert settings_under({**env, "SD_DEVICE": "cuda:1"}, monkeypatch).device_list == ("cuda:1",)


def test_the_dashboard_shows_engine_level_metrics_per_engine() -> None:
    shown = set()
    for _, expr in dashboard_queries():
        if "engine" in grouping_labels(expr):
            names = metric_names(expr)
            shown |= {family for family in ENGINE_FAMILIES for n in names if n.startswith(family)}
    assert shown == set(ENGINE_FAMILIES), f"no per-engine panel for {sorted(set(ENGINE_FAMILIES) - shown)}"
