"""`sd-endpoint jobs`: list, show, wait for, fetch, cancel and delete the jobs of a running endpoint
(`generate --async`, ``POST /v1/jobs``, ``Prefer: respond-async``), with `generate`'s ``--url`` and
``--key`` (or SD_API_KEY), one-line errors and exit statuses (0 done, 1 failed, 2 usage).

``fetch`` writes a finished job's images as `generate` writes them (``<prompt>-<seed>.png``) from
/score's answer, and from the other routes' where the answer tells: OpenAI's ``data[].b64_json`` (or
its links), AUTOMATIC1111's ``images[]``, Hugging Face's image bytes. Imports only httpx (through
client.py): starting it costs no torch.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.cli.client import (
    DEFAULT_URL,
    KEY_ENV,
    ClientError,
    ServerUnreachable,
    _positive,
    auth_headers,
    error_message,
    nsfw_label,
    refuse_errors,
    score_images,
    send,
    write_images,
)

FINISHED = ("succeeded", "failed", "cancelled")
REQUEST_TIMEOUT_S = 30.0
POLL_S = 0.5
# `wait` rides out a server restart (its jobs run again from their seeds) for this long.
UNREACHABLE_FOR_S = 120.0
# What a job id may be before it goes into a URL (the server's: job_ and 24 of these characters).
JOB_ID = re.compile(r"job_[A-Za-z0-9_-]{1,200}")
LONG_TEXT = 200  # `show` replaces longer strings of the result (base64 images) with their length


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=DEFAULT_URL, help=f"endpoint base URL (default {DEFAULT_URL})")
    common.add_argument("--key", help=f"API key, sent as 'Authorization: Bearer' (default: ${KEY_ENV})")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, text: str, with_id: bool = True) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=text, description=text)
        if with_id:
            sub.add_argument(
                "job_id", metavar="ID", help="the job's id (job_...), as generate --async printed it"
            )
        return sub

    listing = action("list", "your jobs, newest first: id, state, route, progress, created", with_id=False)
    listing.add_argument("--limit", type=_page, default=20, help="jobs per page, 1 to 100 (default 20)")
    listing.add_argument("--before", metavar="ID", help="the page after this job (as the last page ends)")
    action("show", "the job as JSON, its result's base64 replaced by its length")
    wait = action("wait", "wait for the job to finish: exit 0 when it succeeded, 1 when it failed")
    wait.add_argument("--timeout", type=_positive, help="give up after this many seconds (default: never)")
    fetch = action("fetch", "write a finished job's images, named as generate names them")
    fetch.add_argument("--out", type=Path, default=Path("out"), help="folder for the images (default ./out)")
    action("cancel", "cancel the job: a queued one at once, a running one at its next step")
    action("delete", "delete the job and its result (a running one is stopped)")


def _page(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to 100")
    return int(text)


def run(args: argparse.Namespace) -> int:
    try:
        return ACTIONS[args.action](Api(args.url, args.key), args)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


class Api:
    """The jobs routes of one server, with the caller's key; every failure a one-line ClientError."""

    def __init__(self, url: str, key: str | None) -> None:
        url = url.rstrip("/")
        self.base = url.removesuffix("/score") + "/v1/jobs"
        self.headers = auth_headers(key)

    def call(self, method: str, job_id: str | None = None, suffix: str = "", **params: Any) -> Any:
        if job_id is not None and not JOB_ID.fullmatch(job_id):
            raise _not_found(job_id)  # never put into a URL
        url = self.base + (f"/{job_id}{suffix}" if job_id is not None else "")
        response = send(method, url, self.headers, REQUEST_TIMEOUT_S, params=params or None)
        if response.status_code == 404:
            if job_id is not None and _code(response) == "job_not_found":
                raise _not_found(job_id)
            raise ClientError(
                f"the server has no jobs API at {self.base} (404: {error_message(response)}); "
                "pass the server's base URL with --url"
            )
        refuse_errors(response, self.headers)
        try:
            return response.json()
        except ValueError:
            raise ClientError(f"the server's answer is not JSON: {response.text[:200]!r}") from None

    def job(self, job_id: str) -> dict[str, Any]:
        job = self.call("GET", job_id)
        if not isinstance(job, dict) or job.get("state") not in ("queued", "running", *FINISHED):
            raise ClientError(f"the server's answer is not a job: {str(job)[:200]}")
        return job


def _code(response: Any) -> str | None:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


def _not_found(job_id: str) -> ClientError:
    shown = job_id if len(job_id) <= 40 and job_id.isprintable() else repr(job_id[:40]) + "..."
    return ClientError(
        f"no job of yours has that id ({shown}): unknown, expired, deleted, or another key's; "
        "`sd-endpoint jobs list` lists yours"
    )


# ----------------------------------------------------------------------------- the actions
def list_jobs(api: Api, args: argparse.Namespace) -> int:
    page = api.call("GET", limit=args.limit, **({"before": args.before} if args.before else {}))
    jobs = page.get("data") if isinstance(page, dict) else None
    if not isinstance(jobs, list):
        raise ClientError(f"the server's answer is not a list of jobs: {str(page)[:200]}")
    rows = [("ID", "STATE", "ROUTE", "PROGRESS", "CREATED")]
    rows += [
        (str(j.get("id")), str(j.get("state")), str(j.get("route")), _progress(j), _when(j)) for j in jobs
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)), row[4]]))
    if not jobs:
        print("no jobs of yours are kept on this server", file=sys.stderr)
    if page.get("next"):
        print(f"more: sd-endpoint jobs list --before {page['next']}", file=sys.stderr)
    return 0


def show(api: Api, args: argparse.Namespace) -> int:
    job = api.job(args.job_id)
    job["result"] = _shortened(job.get("result"))
    print(json.dumps(job, indent=2))
    return 0


def wait(api: Api, args: argparse.Namespace) -> int:
    started = time.monotonic()
    job = api.job(args.job_id)  # a first answer: an unknown id or a server that is down ends here
    shown, unreachable_since = "", None
    try:
        while True:
            line = f"{job['id']}: {job['state']}" + (
                f", step {_progress(job)}" if _progress(job) != "-" else ""
            )
            if line != shown:
                print(line, file=sys.stderr)
                shown = line
            if job["state"] in FINISHED:
                return _outcome(job)
            if args.timeout is not None and time.monotonic() - started >= args.timeout:
                raise ClientError(
                    f"job {job['id']} is still {job['state']} after {args.timeout:g} s; wait again, or stop "
                    f"it with `sd-endpoint jobs cancel {job['id']}`"
                )
            time.sleep(POLL_S)
            try:
                job, unreachable_since = api.job(args.job_id), None
            except ServerUnreachable:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > UNREACHABLE_FOR_S:
                    raise
    except KeyboardInterrupt:
        print(
            f"stopped waiting; the job goes on (sd-endpoint jobs cancel {args.job_id} stops it)",
            file=sys.stderr,
        )
        return 130


def _outcome(job: dict[str, Any]) -> int:
    if job["state"] == "succeeded":
        print(
            f"{job['id']} succeeded: `sd-endpoint jobs fetch {job['id']}` writes its images", file=sys.stderr
        )
        return 0
    error = _dict(job.get("error"))
    why = f" ({job['status']})" if job.get("status") else ""
    print(
        f"error: job {job['id']} {job['state']}{why}: {error.get('message') or 'no message'}", file=sys.stderr
    )
    return 1


def fetch(api: Api, args: argparse.Namespace) -> int:
    job = api.job(args.job_id)
    if job["state"] != "succeeded":
        if job["state"] in FINISHED:
            return _outcome(job)
        raise ClientError(
            f"job {job['id']} is still {job['state']}; `sd-endpoint jobs wait {job['id']}` waits for it"
        )
    images = images_of(api, job)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ClientError(f"cannot create --out {args.out} ({error.strerror}); pass another folder") from None
    paths = write_images(images, args.out, job["id"])
    print(f"{len(paths)} image(s) of {job['id']} ({job.get('route')})", file=sys.stderr)
    return 0


def cancel(api: Api, args: argparse.Namespace) -> int:
    job = api.call("POST", args.job_id, "/cancel")
    state = job.get("state") if isinstance(job, dict) else None
    if state == "running":
        print(f"{args.job_id}: cancel requested; it stops at its next step")
    else:
        print(f"{args.job_id}: {state}" + ("" if state == "cancelled" else " already; nothing to cancel"))
    return 0


def delete(api: Api, args: argparse.Namespace) -> int:
    api.call("DELETE", args.job_id)
    print(f"{args.job_id}: deleted")
    return 0


ACTIONS: dict[str, Callable[[Api, argparse.Namespace], int]] = {
    "list": list_jobs,
    "show": show,
    "wait": wait,
    "fetch": fetch,
    "cancel": cancel,
    "delete": delete,
}


# ----------------------------------------------------------------------------- answers
def images_of(api: Api, job: dict[str, Any]) -> list[dict[str, Any]]:
    """The images of a succeeded job's answer, as write_images takes them ("png": the bytes)."""
    result, route = job.get("result"), job.get("route")
    if route == "/score":
        return score_images(result)
    if isinstance(result, dict) and isinstance(result.get("data"), list):  # OpenAI's
        return [_openai_image(api, item) for item in result["data"] if isinstance(item, dict)]
    if isinstance(result, dict) and isinstance(result.get("images"), list):  # AUTOMATIC1111's
        info = _json_object(result.get("info"))
        seeds = info["all_seeds"] if isinstance(info.get("all_seeds"), list) else []
        return [
            {**_image(text), "seed": seeds[n] if n < len(seeds) else None, "prompt": info.get("prompt")}
            for n, text in enumerate(result["images"])
        ]
    if isinstance(result, dict) and str(result.get("content_type", "")).startswith("image/"):  # HF's
        return [_image(result.get("base64"))]
    raise ClientError(
        f"job {job['id']}'s answer ({route}) holds no images this client can tell; "
        f"`sd-endpoint jobs show {job['id']}` prints it"
    )


def _openai_image(api: Api, item: dict[str, Any]) -> dict[str, Any]:
    seed, nsfw = item.get("seed"), item.get("nsfw_content_detected")
    if item.get("b64_json"):
        return {**_image(item["b64_json"]), "seed": seed, "nsfw": nsfw_label(nsfw)}
    link = str(item.get("url") or "")
    if not link.startswith(("http://", "https://", "/")):
        raise ClientError("an image of the job's answer has neither b64_json nor a url")
    if link.startswith("/"):
        link = api.base.removesuffix("/v1/jobs") + link
    response = send("GET", link, {}, REQUEST_TIMEOUT_S)  # the unguessable link is the permission
    refuse_errors(response, {})
    return {
        "png": response.content,
        "extension": _extension(response.content),
        "seed": seed,
        "nsfw": nsfw_label(nsfw),
    }


def _image(text: Any) -> dict[str, Any]:
    """A base64 image (a data: prefix allowed), with its extension told from its first bytes."""
    if isinstance(text, str) and text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (TypeError, ValueError, binascii.Error):
        raise ClientError("an image in the job's answer is missing or not base64") from None
    return {"png": data, "extension": _extension(data), "nsfw": "unknown"}


def _extension(data: bytes) -> str:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"


def _json_object(text: Any) -> dict[str, Any]:
    try:
        return _dict(json.loads(text) if isinstance(text, str) else text)
    except ValueError:
        return {}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _shortened(value: Any) -> Any:
    if isinstance(value, str) and len(value) > LONG_TEXT:
        return f"<{len(value):,} characters>"
    if isinstance(value, list):
        return [_shortened(item) for item in value]
    if isinstance(value, dict):
        return {key: _shortened(item) for key, item in value.items()}
    return value


def _progress(job: dict[str, Any]) -> str:
    progress = _dict(job.get("progress"))
    step, steps = progress.get("step"), progress.get("steps")
    return f"{step}/{steps}" if isinstance(steps, int) and steps > 0 else "-"


def _when(job: dict[str, Any]) -> str:
    created = job.get("created_at")
    if not isinstance(created, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
