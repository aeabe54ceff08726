"""`sd-endpoint generate --async` and `sd-endpoint jobs` as a user runs them, against a real server
(random:tiny, two keys, its own SD_DATA_DIR, webhooks signed and allowed to 127.0.0.1)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.helpers.ports import free_port
from tests.helpers.processes import REPO, Server, clean_env, serving
from tests.helpers.webhooks import Receiver, receiver_fixture

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "service.cli.main"]
KEYS = ("jobs-cli-key-1", "jobs-cli-key-2")
SMALL = ["--steps", "2", "--width", "128", "--height", "128"]
SECRET = "whsec_" + base64.b64encode(b"thirty-two bytes of a test key!!").decode()
JOB_ID = re.compile(r"job_[A-Za-z0-9_-]{24}")


# The CLI test only reads which events came; 204 is as good an answer as any 2xx.
receiver = receiver_fixture(status=204)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(
        tmp_path_factory.mktemp("jobs-cli") / "server.log",
        SD_API_KEYS=",".join(KEYS),
        SD_WEBHOOK_SECRET=SECRET,
        SD_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
    ) as running:
        yield running


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=clean_env(**env), cwd=REPO, timeout=600
    )


def jobs(server: Server, action: str, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("jobs", action, *args, "--url", server.url, "--key", KEYS[0])


def submitted(server: Server, *args: str) -> str:
    """`generate --async`'s job id: its one line on stdout."""
    result = cli("generate", *args, "--async", "--url", server.url, "--key", KEYS[0])
    assert result.returncode == 0, result.stderr
    assert JOB_ID.fullmatch(result.stdout.strip()) and result.stdout.count("\n") == 1, result.stdout
    return result.stdout.strip()


def waited(server: Server, job_id: str) -> None:
    result = jobs(server, "wait", job_id, "--timeout", "300")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and f"{job_id}: succeeded" in result.stderr


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


def test_an_async_job_is_fetched_as_the_images_generate_writes(server: Server, tmp_path: Path) -> None:
    job_id = submitted(server, "A lighthouse, at dawn!", "--seed", "42", "--num-images", "2", *SMALL)
    waited(server, job_id)
    fetched = jobs(server, "fetch", job_id, "--out", str(tmp_path / "job"))
    assert fetched.returncode == 0, fetched.stderr
    direct = cli(
        "generate", "A lighthouse, at dawn!", "--seed", "42", "--num-images", "2", *SMALL,
        "--url", server.url, "--key", KEYS[0], "--out", str(tmp_path / "direct"),
    )  # fmt: skip
    assert direct.returncode == 0, direct.stderr
    names = ["a-lighthouse-at-dawn-42.png", "a-lighthouse-at-dawn-43.png"]
    assert fetched.stdout.splitlines() == [f"{tmp_path / 'job' / name}\tnsfw=false" for name in names]
    for name in names:
        assert (tmp_path / "job" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()


def test_list_and_show_a_job_with_the_seed_it_was_given(server: Server, tmp_path: Path) -> None:
    job_id = submitted(server, "a cat", *SMALL)  # no seed: the server pins one at submit
    waited(server, job_id)
    listed = jobs(server, "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "ROUTE", "PROGRESS", "CREATED"]
    [row] = [row.split() for row in rows if row.startswith(job_id)]
    assert row[1:3] == ["succeeded", "/score"] and re.fullmatch(r"\d{4}-\d\d-\d\d", row[4])
    assert row[3] in ("2/2", "-")  # the steps the runner last recorded (a quick job may finish first)
    shown = jobs(server, "show", job_id)
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)
    assert job["id"] == job_id and job["state"] == "succeeded"
    [record] = job["result"]
    assert re.fullmatch(r"<[\d,]+ characters>", record["generated_image"])
    fetched = jobs(server, "fetch", job_id, "--out", str(tmp_path))
    assert fetched.returncode == 0, fetched.stderr
    assert [p.name for p in tmp_path.iterdir()] == [f"a-cat-{record['seed']}.png"]
    # the other key sees none of it
    other = cli("jobs", "show", job_id, "--url", server.url, SD_API_KEY=KEYS[1])
    assert "no job of yours has that id" in one_error_line(other)


def test_fetch_writes_the_images_of_every_route(server: Server, tmp_path: Path) -> None:
    bodies: dict[str, tuple[dict[str, Any], list[str]]] = {
        "/v1/images/generations": (
            {"prompt": "a boat", "n": 2, "seed": 5, "num_inference_steps": 2, "size": "128x128",
             "response_format": "b64_json"},
            ["{id}-5.png", "{id}-6.png"],
        ),
        "/sdapi/v1/txt2img": (
            {"prompt": "a boat", "steps": 2, "width": 128, "height": 128, "seed": 9, "batch_size": 2},
            ["a-boat-10.png", "a-boat-9.png"],
        ),
        "/": ({"inputs": "a boat", "parameters": {"num_inference_steps": 2}}, ["{id}-0.png"]),
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {KEYS[0]}", "Prefer": "respond-async"}
    for route, (body, names) in bodies.items():
        answer = httpx.post(f"{server.url}{route}", json=body, headers=headers, timeout=30)
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        waited(server, job_id)
        out = tmp_path / (route.strip("/").replace("/", "-") or "huggingface")
        fetched = jobs(server, "fetch", job_id, "--out", str(out))
        assert fetched.returncode == 0, (route, fetched.stderr)
        assert sorted(p.name for p in out.iterdir()) == [name.format(id=job_id) for name in names], route
        for path in out.iterdir():
            with Image.open(path) as image:
                assert image.format == "PNG"


def test_cancel_wait_and_delete(server: Server, tmp_path: Path) -> None:
    job_id = submitted(server, "a long one", "--steps", "150", "--num-images", "4")
    impatient = jobs(server, "wait", job_id, "--timeout", "0.5")
    *progress, last = impatient.stderr.strip().splitlines()
    assert impatient.returncode == 1 and progress[0].startswith(f"{job_id}: "), impatient.stderr
    assert last.startswith(f"error: job {job_id} is still") and f"jobs cancel {job_id}" in last
    cancelled = jobs(server, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(f"{job_id}: ")
    waiting = jobs(server, "wait", job_id, "--timeout", "120")
    assert waiting.returncode == 1
    assert waiting.stderr.strip().splitlines()[-1].startswith(f"error: job {job_id} cancelled")
    assert "cancelled" in one_error_line(jobs(server, "fetch", job_id, "--out", str(tmp_path)))
    assert list(tmp_path.iterdir()) == []
    deleted = jobs(server, "delete", job_id)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"{job_id}: deleted"
    assert "no job of yours has that id" in one_error_line(jobs(server, "show", job_id))


def test_a_webhook_is_sent_the_jobs_events(server: Server, receiver: Receiver) -> None:
    job_id = submitted(server, "a fox", *SMALL, "--webhook", receiver.url)
    waited(server, job_id)
    deadline = time.monotonic() + 10
    while ("job.completed", job_id) not in receiver.events and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [event for event in receiver.events if event[1] == job_id] == [("job.completed", job_id)]
    refused = cli("generate", "a fox", "--async", "--webhook", "http://10.0.0.5/x", "--url", server.url,
                  "--key", KEYS[0])  # fmt: skip
    line = one_error_line(refused)  # /score's own refusal (422), as without --async
    assert "webhook:" in line and "SD_WEBHOOK_ALLOWED_HOSTS" in line
    usage = cli("generate", "a fox", "--webhook", receiver.url, "--url", server.url)
    assert usage.returncode == 2 and "argument --webhook: needs --async" in usage.stderr


def test_errors_are_one_line(server: Server) -> None:
    for job_id in ("job_" + "A" * 24, "../../score", "x" * 500):
        assert "no job of yours has that id" in one_error_line(jobs(server, "show", job_id))
    refused = cli("jobs", "list", "--url", server.url, "--key", "wrong")
    assert "refused the API key (401" in one_error_line(refused)
    missing = cli("jobs", "list", "--url", server.url)
    assert "needs an API key (401" in one_error_line(missing)
    down = cli("jobs", "wait", "job_" + "A" * 24, "--url", f"http://127.0.0.1:{free_port()}")
    assert "cannot connect" in one_error_line(down) and "sd-endpoint serve" in down.stderr
    for usage in (["jobs"], ["jobs", "show"], ["jobs", "list", "--limit", "0"], ["jobs", "frob"]):
        assert cli(*usage).returncode == 2, usage
