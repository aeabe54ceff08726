"""Ray Serve (service/hosts/ray_serve.py) on a real local Ray cluster: two replicas of the app, each with
its own random:tiny engine on the CPU, behind Serve's HTTP proxy on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from service.hosts.ray_serve import REPLICA_HEADER, ServeArgs, app_builder, deployment_options
from service.settings import Settings
from tests.helpers.ports import free_port
from tests.helpers.servers import decode_png, metric_value, request_body

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"model": "random:tiny", "device": "cpu", "max_batch_size": 4, "max_batch_wait_ms": 50}
# Two replicas (autoscaling pinned at two), half a CPU each, at most two requests each at a time:
# with more requests in flight than that, Serve must route some of them to the second replica.
ARGS = {
    "num_cpus": 0.5,
    "min_replicas": 2,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "max_ongoing_requests": 2,
    "settings": SETTINGS,
}
SHUTDOWN_LIMIT_S = 60


@pytest.fixture(scope="module")
def serve_url() -> Iterator[str]:
    import ray
    from ray import serve

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")  # Ray's default; set here so that it is undone afterwards
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            logging_level=logging.WARNING,
        )
        ray_processes = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            # serve.run returns once every replica has started, which includes its model's warm-up.
            serve.run(app_builder(ARGS), name="sd-endpoint", route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()
            _, alive = psutil.wait_procs(ray_processes, timeout=SHUTDOWN_LIMIT_S)
            assert not alive, f"Ray processes left running: {[p.pid for p in alive]}"


def score(url: str, body: dict[str, Any], request_id: str) -> httpx.Response:
    return httpx.post(f"{url}/score", json=body, headers={"x-request-id": request_id}, timeout=120)


@pytest.mark.slow
def test_two_replicas_answer_concurrent_score_requests(serve_url: str) -> None:
    # Ready as soon as Serve says the app runs: replicas only start taking requests once warm.
    health = httpx.get(f"{serve_url}/")
    assert (health.status_code, health.text) == (200, "Healthy")
    bodies = [request_body([f"a lighthouse, take {i}"], seed=100 + i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(score, [serve_url] * len(bodies), bodies, [f"r{i}" for i in range(8)]))
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        [record] = response.json()
        assert record["prompt"] == f"a lighthouse, take {i}" and record["seed"] == 100 + i
        assert record["nsfw_content_detected"] is False
        assert decode_png(record["generated_image"]).shape == (128, 128, 3)
        # One request id, the client's (Serve's proxy and the app would otherwise both add it).
        assert response.headers.get_list("x-request-id") == [f"r{i}"]
    replicas = {response.headers[REPLICA_HEADER] for response in responses}
    assert len(replicas) == 2, f"every request went to replica {replicas}"


@pytest.mark.slow
def test_each_replica_runs_its_own_app_and_metrics(serve_url: str) -> None:
    # 1. Ask /metrics until both replicas have answered (Serve picks one at random each time).
    metrics: dict[str, str] = {}
    for _ in range(100):
        response = httpx.get(f"{serve_url}/metrics")
        metrics[response.headers[REPLICA_HEADER]] = response.text
        if len(metrics) == 2:
            break
    assert len(metrics) == 2, "only one replica ever answered /metrics"
    # 2. Each counts only its own images; together, one per /score request served so far.
    served = [metric_value(text, "sd_images_generated_total") for text in metrics.values()]
    assert all(count > 0 for count in served) and sum(served) >= 8
    # 3. The settings given to app_builder reached every replica.
    info = httpx.get(f"{serve_url}/info").json()
    assert (info["name"], info["device"], info["limits"]["max_batch_size"]) == ("random:tiny", "cpu", 4)


@pytest.mark.slow
def test_the_contract_holds_through_serve(serve_url: str) -> None:
    malformed = httpx.post(
        f"{serve_url}/score", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "malformed_json"
    off_contract = score(serve_url, request_body(["a cat"], num_inference_steps=0), "bad")
    assert off_contract.status_code == 422
    assert set(off_contract.json()["error"]) == {"code", "message", "status"}
    assert httpx.get(f"{serve_url}/health/live").status_code == 200
    assert httpx.get(f"{serve_url}/swagger.json").json()["paths"]["/score"]["post"]
    # Serve's proxy forwards the clients' Host, whatever name they reach the cluster by.
    assert httpx.get(f"{serve_url}/info", headers={"host": "sd.cluster.example"}).status_code == 200


@pytest.mark.slow
def test_a_replica_whose_model_cannot_load_fails_the_deploy(serve_url: str) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    broken = {"num_replicas": 1, "num_cpus": 0.5, "settings": {**SETTINGS, "model": "/no/such/model"}}
    with pytest.raises(RuntimeError, match="failed"):
        serve.run(app_builder(broken), name="broken", route_prefix="/broken")
    assert serve.status().applications["broken"].status == ApplicationStatus.DEPLOY_FAILED
    serve.delete("broken")
    # The healthy application kept serving throughout.
    assert httpx.get(f"{serve_url}/").status_code == 200


def test_the_serve_config_asks_one_gpu_per_replica_and_autoscales_on_ongoing_requests() -> None:
    [app] = yaml.safe_load((ROOT / "deploy" / "ray" / "serve-config.yaml").read_text())["applications"]
    options = deployment_options(ServeArgs.model_validate(app["args"]))
    autoscaling = options["autoscaling_config"]
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert autoscaling["target_ongoing_requests"] == 8
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 4)
    assert "num_replicas" not in options
    # A stopping replica finishes every request it accepted (Serve's own drain).
    assert options["graceful_shutdown_timeout_s"] >= Settings().request_timeout_s
    assert ServeArgs().graceful_shutdown_timeout_s >= Settings().request_timeout_s


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"num_gpu": 1}, "num_gpu"),
        ({"min_replicas": 5, "max_replicas": 2}, "min_replicas 5 is above max_replicas 2"),
        ({"target_ongoing_requests": 32}, "max_ongoing_requests"),
        ({"settings": {"max_batch": 4}}, "unknown server setting"),
    ],
)
def test_bad_args_fail_the_build_with_the_reason(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        app_builder(args)
