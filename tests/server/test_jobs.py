"""Jobs that outlive their request, against a real server process (random:tiny, two keys, SQLite in
a fresh SD_DATA_DIR): submit and collect on every kind of route, cog's Prefer: respond-async,
idempotency, keys that never see each other's jobs, cancel and delete, back-pressure, and webhooks
verified by a receiver with the ``standardwebhooks`` library."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.helpers.processes import Server, serving
from tests.helpers.webhooks import Receiver, receiver_fixture

pytestmark = pytest.mark.slow
KEY_A, KEY_B = "jobs-key-a", "jobs-key-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
SECRET = "whsec_" + base64.b64encode(b"a secret of thirty-two bytes!!!!").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"an older secret, still signing..").decode()


receiver = receiver_fixture(SECRET)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(
        tmp_path_factory.mktemp("jobs") / "server.log",
        SD_API_KEYS=f"{KEY_A},{KEY_B}",
        SD_WEBHOOK_SECRET=f"{OLD_SECRET},{SECRET}",
        SD_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        SD_MAX_JOBS_PER_KEY="6",
        SD_WEBHOOK_PROGRESS_S="0.5",
    ) as running:
        yield running


def score_body(seed: int | None = None, steps: int = 4) -> dict[str, Any]:
    parameters: dict[str, Any] = {"num_inference_steps": steps}
    if seed is not None:
        parameters["seed"] = seed
    return {"input_data": {"columns": ["prompt"], "data": ["a red fox"], "parameters": parameters}}


def submit(
    server: Server, route: str, body: dict[str, Any], headers: dict[str, str] = A, **extra: Any
) -> Any:
    answer = httpx.post(
        f"{server.url}/v1/jobs", json={"route": route, "body": body, **extra}, headers=headers, timeout=30
    )
    assert answer.status_code == 202, answer.text
    return answer.json()


def wait(server: Server, job_id: str, headers: dict[str, str] = A, limit_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not finish within {limit_s} s")


def test_a_score_job_answers_what_the_request_answers_with_its_fixed_seed(server: Server) -> None:
    job = submit(server, "/score", score_body())
    assert job["state"] == "queued" and job["id"].startswith("job_")
    done = wait(server, job["id"])
    assert done["state"] == "succeeded" and done["status"] == 200, done
    (record,) = done["result"]
    direct = httpx.post(f"{server.url}/score", json=score_body(record["seed"]), headers=A, timeout=120).json()
    assert direct[0]["generated_image"] == record["generated_image"]
    assert done["progress"]["step"] == done["progress"]["steps"] > 0 or done["progress"]["steps"] == 0


def test_prefer_respond_async_on_every_kind_of_route(server: Server) -> None:
    prefer = {**A, "Prefer": "respond-async"}
    bodies = {
        "/v1/images/generations": {
            "prompt": "a boat",
            "num_inference_steps": 2,
            "response_format": "b64_json",
        },
        "/sdapi/v1/txt2img": {"prompt": "a boat", "steps": 2, "width": 128, "height": 128},
        "/": {"inputs": "a boat", "parameters": {"num_inference_steps": 2}},
    }
    for route, body in bodies.items():
        answer = httpx.post(f"{server.url}{route}", json=body, headers=prefer, timeout=30)
        assert answer.status_code == 202, (route, answer.text)
        job = answer.json()
        assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
        done = wait(server, job["id"])
        assert done["state"] == "succeeded", done
        result = httpx.get(f"{server.url}/v1/jobs/{job['id']}/result", headers=A, timeout=30)
        assert result.status_code == 200
        if route == "/":
            assert result.headers["content-type"] == "image/png" and result.content.startswith(b"\x89PNG")
            assert done["result"]["content_type"] == "image/png"
        else:
            assert result.json() == done["result"]


def test_an_edit_form_becomes_a_job_with_its_files(server: Server) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (20, 90, 160)).save(buffer, format="PNG")
    answer = httpx.post(
        f"{server.url}/v1/images/edits",
        files={"image": ("a.png", buffer.getvalue(), "image/png")},
        data={"prompt": "a sea", "num_inference_steps": "2", "response_format": "b64_json"},
        headers={**A, "Prefer": "respond-async"},
        timeout=30,
    )
    assert answer.status_code == 202, answer.text
    done = wait(server, answer.json()["id"])
    assert done["state"] == "succeeded" and len(done["result"]["data"]) == 1


def test_idempotency_key_returns_the_first_job(server: Server) -> None:
    headers = {**A, "Idempotency-Key": "order-1234"}
    first = httpx.post(
        f"{server.url}/v1/jobs", json={"route": "/score", "body": score_body()}, headers=headers
    )
    again = httpx.post(
        f"{server.url}/v1/jobs", json={"route": "/score", "body": score_body()}, headers=headers
    )
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other_key = httpx.post(
        f"{server.url}/v1/jobs",
        json={"route": "/score", "body": score_body()},
        headers={**B, "Idempotency-Key": "order-1234"},
    )
    assert other_key.json()["id"] != first.json()["id"]


def test_keys_never_see_each_others_jobs_and_forged_ids_are_not_found(server: Server) -> None:
    job = submit(server, "/score", score_body())
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/result"):
        assert httpx.get(f"{server.url}{path}", headers=B).status_code == 404
    assert httpx.post(f"{server.url}/v1/jobs/{job['id']}/cancel", headers=B).status_code == 404
    assert httpx.delete(f"{server.url}/v1/jobs/{job['id']}", headers=B).status_code == 404
    assert job["id"] not in [
        each["id"] for each in httpx.get(f"{server.url}/v1/jobs", headers=B).json()["data"]
    ]
    for forged in ("job_../../etc/passwd", "x" * 5000, "job_" + "A" * 24, "%00", "job_é"):
        answer = httpx.get(f"{server.url}/v1/jobs/{forged}", headers=A)
        assert answer.status_code == 404, forged
        assert "error" in answer.json()
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}").status_code == 401  # no key
    wait(server, job["id"])


def test_listing_is_paged_newest_first(server: Server) -> None:
    ids = [submit(server, "/score", score_body(steps=1))["id"] for _ in range(3)]
    first = httpx.get(f"{server.url}/v1/jobs", params={"limit": 2}, headers=A).json()
    assert [each["id"] for each in first["data"]] == ids[::-1][:2] and first["next"] == ids[1]
    second = httpx.get(
        f"{server.url}/v1/jobs", params={"limit": 2, "before": first["next"]}, headers=A
    ).json()
    assert second["data"][0]["id"] == ids[0]
    for job_id in ids:
        wait(server, job_id)


def test_cancel_and_delete(server: Server) -> None:
    job = submit(server, "/score", score_body(steps=40))
    cancelled = httpx.post(f"{server.url}/v1/jobs/{job['id']}/cancel", headers=A)
    assert cancelled.status_code == 200
    done = wait(server, job["id"])
    assert done["state"] == "cancelled" and done["error"]["code"] == "cancelled"
    assert httpx.delete(f"{server.url}/v1/jobs/{job['id']}", headers=A).json()["deleted"] is True
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=A).status_code == 404


def test_a_bad_body_fails_its_job_with_the_routes_own_error(server: Server) -> None:
    job = submit(
        server,
        "/score",
        {"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {"num_inference_steps": 0}}},
    )
    done = wait(server, job["id"])
    assert (
        done["state"] == "failed"
        and done["status"] == 422
        and "num_inference_steps" in done["error"]["message"]
    )
    refused = httpx.post(f"{server.url}/v1/jobs", json={"route": "/admin", "body": {}}, headers=A)
    assert refused.status_code == 400 and "route" in refused.json()["error"]["message"]
    streamed = httpx.post(
        f"{server.url}/v1/jobs",
        json={"route": "/v1/images/generations", "body": {"prompt": "x", "stream": True}},
        headers=A,
    )
    assert streamed.status_code == 400 and "stream" in streamed.json()["error"]["message"]


def test_a_key_past_its_job_bound_gets_429_with_retry_after(server: Server) -> None:
    answers = [
        httpx.post(f"{server.url}/v1/jobs", json={"route": "/score", "body": score_body(steps=30)}, headers=B)
        for _ in range(8)
    ]
    refused = [answer for answer in answers if answer.status_code == 429]
    assert refused and int(refused[0].headers["retry-after"]) >= 1
    assert "SD_MAX_JOBS_PER_KEY" in refused[0].json()["error"]["message"]
    for answer in answers:
        if answer.status_code == 202:
            httpx.post(f"{server.url}/v1/jobs/{answer.json()['id']}/cancel", headers=B)


def test_webhooks_are_signed_and_say_start_progress_and_completed(server: Server, receiver: Receiver) -> None:
    job = submit(
        server,
        "/score",
        score_body(steps=12),
        webhook=receiver.url,
        webhook_events_filter=["start", "progress", "completed"],
    )
    done = wait(server, job["id"])
    deadline = time.monotonic() + 10
    while "job.completed" not in receiver.events_of(job["id"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    events = receiver.events_of(job["id"])
    assert events[0] == "job.start" and events[-1] == "job.completed", events
    mine = [each for each in receiver.received if each["body"]["data"]["id"] == job["id"]]
    assert all(each["verified"] for each in mine)  # signed with both secrets; the receiver knows the newer
    assert all(len(each["headers"]["webhook-signature"].split()) == 2 for each in mine)
    assert (
        mine[-1]["body"]["data"]["state"] == "succeeded"
        and mine[-1]["body"]["data"]["result"] == done["result"]
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://127.0.0.2:9/hook",
        "http://[::1]/hook",
        "ftp://example.com/x",
        "http://user:pw@example.com/x",
        "not a url",
    ],
)
def test_webhooks_to_inner_addresses_are_refused_at_submit(server: Server, url: str) -> None:
    answer = httpx.post(
        f"{server.url}/v1/jobs", json={"route": "/score", "body": score_body(), "webhook": url}, headers=A
    )
    assert answer.status_code == 400, answer.text
    assert url not in answer.text


def test_a_job_body_larger_than_any_valid_request_is_refused_at_submit(server: Server) -> None:
    """The routes' own budget of JSON values holds for a body submitted as a job (it would be
    kept, and failed only when run, otherwise)."""
    flood = b'{"prompt": "x", "user": [' + b"0," * 200_000 + b"0]}"
    prefer = {**A, "Prefer": "respond-async", "Content-Type": "application/json"}
    answer = httpx.post(f"{server.url}/v1/images/generations", content=flood, headers=prefer, timeout=60)
    assert answer.status_code == 400 and "JSON values" in answer.json()["error"]["message"], answer.text
