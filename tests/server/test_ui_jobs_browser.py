"""The playground's jobs, driven in headless Debian chromium against a real server on random:tiny:
"Run as a job" posts /score with Prefer: respond-async, the Jobs panel follows the job to its
images, and lists, opens, cancels and deletes the caller's jobs after a reload."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect

from tests.helpers.processes import Server, server_fixture
from tests.server.test_ui_browser import KEYS, WAIT_MS, fill_form, generate, open_playground

pytestmark = pytest.mark.slow


server = server_fixture("jobs-ui")
keyed_server = server_fixture("jobs-ui-keyed", fixture="keyed_server", SD_API_KEYS=",".join(KEYS))


def submit_as_job(page: Page) -> dict[str, Any]:
    """Generate with "Run as a job" ticked: the /score request carries Prefer: respond-async and is
    answered 202 with the job, which the Jobs panel then shows."""
    page.get_by_label("Run as a job").check()
    with page.expect_request("**/score", timeout=WAIT_MS) as request:
        response = generate(page)
    assert request.value.headers.get("prefer") == "respond-async"
    assert response.status == 202, response.text()
    job: dict[str, Any] = response.json()
    expect(row_of(page, job["id"])).to_be_visible()
    return job


def row_of(page: Page, job_id: str) -> Locator:
    return page.locator(f'#jobs-list li.job[data-id="{job_id}"]')


def job_of(server: Server, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers or {}, timeout=30)
    assert answer.status_code == 200, answer.text
    job: dict[str, Any] = answer.json()
    return job


def watch_progress(row: Locator, until: str) -> list[tuple[str, float, float]]:
    """The row's (state, bar value, bar max) as it changes, until its state reads ``until``."""
    seen: list[tuple[str, float, float]] = []
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        reading = row.evaluate(
            "row => [row.querySelector('.job-state').textContent,"
            " row.querySelector('progress').value, row.querySelector('progress').max]"
        )
        state = (reading[0], float(reading[1]), float(reading[2]))
        if not seen or seen[-1] != state:
            seen.append(state)
        if state[0] == until:
            return seen
        time.sleep(0.1)
    pytest.fail(f"the job did not read {until!r} in time; it read {seen}")


def test_a_job_is_followed_to_its_images_and_a_reload_lists_and_opens_it(server: Server, page: Page) -> None:
    open_playground(page, server)
    # 150 steps at 128x128: a few seconds, enough for the page to poll it mid-way.
    fill_form(page, prompt="a lighthouse as a job", steps="150")
    job = submit_as_job(page)
    assert job["state"] in ("queued", "running")
    row = row_of(page, job["id"])

    # 1. Followed: running with its progress as a bar, then succeeded, its image shown.
    seen = watch_progress(row, "succeeded")
    assert any(state == "running" and 0 < value < top for state, value, top in seen), seen
    assert seen[-1][1] == seen[-1][2] > 0
    done = job_of(server, job["id"])
    assert done["state"] == "succeeded"
    (record,) = done["result"]
    expect(page.locator("#images img")).to_have_count(1)
    assert page.get_attribute("#images img", "src") == f"data:image/png;base64,{record['generated_image']}"
    assert page.inner_text(".seed-value") == str(record["seed"])
    expect(page.locator("#request-id")).to_have_text(job["id"])
    expect(page.locator("#id-label")).to_have_text("job")
    expect(row.locator("button.job-cancel")).to_be_hidden()

    # 2. Reloaded: listed again (GET /v1/jobs?limit=10), and its images open from the panel.
    with page.expect_request("**/v1/jobs?limit=10", timeout=WAIT_MS):
        page.reload()
    expect(row.locator(".job-state")).to_have_text("succeeded")
    expect(row).to_contain_text("a lighthouse as a job")
    expect(page.locator("#images img")).to_have_count(0)
    row.get_by_role("button", name=f"Show images of job {job['id']}").click()
    expect(page.locator("#images img")).to_have_count(1)
    assert page.get_attribute("#images img", "src") == f"data:image/png;base64,{record['generated_image']}"
    expect(page.locator("#error")).to_be_hidden()

    # 3. A direct generation still works, and says "request id" again.
    page.get_by_label("Run as a job").uncheck()
    fill_form(page, prompt="a lighthouse, directly")
    assert generate(page).status == 200
    expect(page.locator("#id-label")).to_have_text("request id")


def test_a_running_job_is_cancelled_from_the_panel_and_then_deleted(server: Server, page: Page) -> None:
    open_playground(page, server)
    fill_form(page, prompt="a long job to cancel", steps="150")
    page.fill("#width", "256")
    page.fill("#height", "256")
    job = submit_as_job(page)
    row = row_of(page, job["id"])
    expect(row.locator(".job-state")).to_have_text("running", timeout=WAIT_MS)
    page.wait_for_function(
        "id => document.querySelector(`li.job[data-id='${id}'] progress`).value > 0",
        arg=job["id"],
        timeout=WAIT_MS,
    )

    with page.expect_response(f"**/v1/jobs/{job['id']}/cancel", timeout=WAIT_MS) as cancelled:
        row.get_by_role("button", name=f"Cancel job {job['id']}").click()
    assert cancelled.value.status == 200
    expect(row.locator(".job-state")).to_have_text("cancelled", timeout=WAIT_MS)
    expect(row.locator("button.job-cancel")).to_be_hidden()
    expect(row.locator("button.job-show")).to_be_hidden()
    assert job_of(server, job["id"])["state"] == "cancelled"
    expect(page.locator("#images img")).to_have_count(0)

    # Still "cancelled" after a reload; then deleted: gone from the panel and from the server.
    page.reload()
    expect(row.locator(".job-state")).to_have_text("cancelled")
    row.get_by_role("button", name=f"Delete job {job['id']}").click()
    expect(row).to_have_count(0)
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}", timeout=30).status_code == 404
    expect(page.locator("#error")).to_be_hidden()


def test_a_failed_job_shows_the_servers_message(server: Server, page: Page) -> None:
    open_playground(page, server)
    fill_form(page, prompt="a lighthouse", steps="0")
    job = submit_as_job(page)  # taken as a job; the route refuses it when it runs
    row = row_of(page, job["id"])
    expect(row.locator(".job-state")).to_have_text("failed", timeout=WAIT_MS)
    message = job_of(server, job["id"])["error"]["message"]
    assert "num_inference_steps" in message
    expect(page.locator("#error-message")).to_have_text(message)
    expect(row.locator(".job-error")).to_have_text(message)
    expect(page.locator("#error")).not_to_contain_text("undefined")

    # A job gone from the server (deleted elsewhere): the page shows the jobs route's error.message.
    assert httpx.delete(f"{server.url}/v1/jobs/{job['id']}", timeout=30).status_code == 200
    with page.expect_response(f"**/v1/jobs/{job['id']}", timeout=WAIT_MS) as answer:
        row.get_by_role("button", name=f"Delete job {job['id']}").click()
    assert answer.value.status == 404
    expect(row).to_have_count(0)


def test_with_keys_the_page_lists_the_jobs_of_its_own_key_only(keyed_server: Server, page: Page) -> None:
    own, other = ({"Authorization": f"Bearer {key}"} for key in KEYS)
    body = {"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {"num_inference_steps": 1}}}
    jobs = []
    for headers in (own, other):
        answer = httpx.post(
            f"{keyed_server.url}/score", json=body, headers={**headers, "Prefer": "respond-async"}, timeout=30
        )
        assert answer.status_code == 202, answer.text
        jobs.append(answer.json()["id"])

    page.goto(f"{keyed_server.url}/ui")
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#jobs-message")).to_contain_text("API key")
    page.fill("#key", KEYS[0])
    with page.expect_request("**/v1/jobs?limit=10", timeout=WAIT_MS) as listed:
        page.click("#key-submit")
    assert listed.value.headers.get("authorization") == f"Bearer {KEYS[0]}"
    row = row_of(page, jobs[0])
    expect(row.locator(".job-state")).to_have_text("succeeded", timeout=WAIT_MS)
    expect(row_of(page, jobs[1])).to_have_count(0)
    row.get_by_role("button", name="Show images").click()
    expect(page.locator("#images img")).to_have_count(1)
