"""`sd-endpoint generate`: send one prompt to a running endpoint and save the images as PNG files.

With ``--image`` (and ``--mask``) it asks for image to image (inpainting): the files go base64 in
/score's ``image`` and ``mask_image`` columns, as Azure's inpainting samples send them. With
``--async`` it is a job (``Prefer: respond-async``): its id is printed, for `sd-endpoint jobs` (jobs.py).

Speaks the same Azure ML scoring contract as any other client, so it also works against an Azure ML
online endpoint (pass its scoring URL and key). Imports only httpx and tenacity (its 429 retries):
starting it costs no torch.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import email.utils
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_attempt

DEFAULT_URL = "http://127.0.0.1:5001"
KEY_ENV = "SD_API_KEY"
# A server asking for a longer pause than this is better retried by the user, later.
MAX_RETRY_AFTER_S = 60.0
MAX_IMAGE_BYTES = 20 * 2**20  # the server's own bound on an input image (service/images_in)


class ClientError(Exception):
    """A failure the user can act on; the message is printed as one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"endpoint base or scoring URL (default {DEFAULT_URL})"
    )
    parser.add_argument("--key", help=f"API key, sent as 'Authorization: Bearer' (default: ${KEY_ENV})")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from")
    parser.add_argument("--steps", type=int, help="denoising steps (server default when omitted)")
    parser.add_argument("--guidance", type=float, help="guidance scale; above 1 follows the prompt more")
    parser.add_argument("--width", type=int, help="image width in pixels (multiple of 8)")
    parser.add_argument("--height", type=int, help="image height in pixels (multiple of 8)")
    parser.add_argument("--seed", type=int, help="seed of the first image (random when omitted)")
    parser.add_argument("--scheduler", help="scheduler name, one of those listed by GET /info")
    parser.add_argument("--model", help="model name, one of those listed by GET /info (default: its default)")
    parser.add_argument("--num-images", type=int, help="images for this prompt")
    parser.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        type=_adapter,
        metavar="NAME[:SCALE]",
        help="a LoRA adapter listed by GET /info, at SCALE (default 1); repeat for several",
    )
    parser.add_argument(
        "--image",
        type=Path,
        metavar="FILE",
        help="image to start from (PNG, JPEG, WEBP...; at most 20 MiB): image to image",
    )
    parser.add_argument(
        "--mask",
        type=Path,
        metavar="FILE",
        help="with --image: inpainting; white repaints, black keeps (the image's size)",
    )
    parser.add_argument(
        "--strength",
        type=_fraction,
        help="with --image: share of the schedule that runs, in (0, 1] (server default 0.8; 1 with a mask)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out"), help="folder for the PNG files (default ./out)"
    )
    parser.set_defaults(_parser=parser)
    parser.add_argument(
        "--timeout", type=_positive, default=300.0, help="seconds to wait for an answer (default 300)"
    )
    parser.add_argument(
        "--retries", type=_count, default=3, help="times to retry when the server is busy (default 3)"
    )
    parser.add_argument(
        "--async", dest="async_", action="store_true", help="submit as a job: print its id and exit"
    )
    parser.add_argument("--webhook", type=_ascii, metavar="URL", help="with --async: where events go")


def _ascii(text: str) -> str:  # a header's value
    if not text or not all(" " <= char <= "~" for char in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not printable ASCII")
    return text


def _float_in(text: str, fits: Callable[[float], bool], what: str) -> float:
    """``text`` as a number that ``fits``, else argparse's error saying it is not ``what``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # fits no range, as NaN itself does not
    if not fits(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _positive(text: str) -> float:
    return _float_in(text, lambda value: 0 < value < math.inf, "a positive number of seconds")


def _adapter(text: str) -> tuple[str, float]:
    """``NAME`` or ``NAME:SCALE`` -> (name, scale); the server checks the name and the range."""
    name, _, scale_text = text.partition(":")
    try:
        scale = float(scale_text or "1")
    except ValueError:
        scale = math.nan
    if not name or not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME or NAME:SCALE (SCALE a number such as 0.8)")
    return name, scale


def _fraction(text: str) -> float:
    return _float_in(text, lambda value: 0 < value <= 1, "a number in (0, 1]")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return value


def run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser | None = getattr(args, "_parser", None)
    for flag, given in (("--mask", args.mask), ("--strength", args.strength)):
        if given is not None and args.image is None and parser is not None:
            parser.error(f"argument {flag}: needs --image (the image to start from)")  # exits 2
    if args.webhook is not None and not args.async_ and parser is not None:
        parser.error("argument --webhook: needs --async (a webhook is a job's)")
    try:
        generate(args)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def generate(args: argparse.Namespace) -> list[Path]:
    # 1. Build the request: only the parameters the user gave, so the server's defaults apply otherwise.
    url = scoring_url(args.url)
    parameters: dict[str, Any] = {}
    for name, value in [
        ("num_inference_steps", args.steps),
        ("guidance_scale", args.guidance),
        ("width", args.width),
        ("height", args.height),
        ("seed", args.seed),
        ("scheduler", args.scheduler),
        ("model", args.model),
        ("num_images_per_prompt", args.num_images),
    ]:
        if value is not None:
            parameters[name] = value
    if args.adapters:
        parameters["adapters"] = dict(args.adapters)
    columns, row = ["prompt", "negative_prompt"], [args.prompt, args.negative_prompt]
    for column, flag, path in (("image", "--image", args.image), ("mask_image", "--mask", args.mask)):
        if path is not None:
            columns.append(column)
            row.append(base64.b64encode(read_image_file(path, flag)).decode("ascii"))
    if args.strength is not None:
        parameters["strength"] = args.strength
    body = {"input_data": {"columns": columns, "data": [row], "parameters": parameters}}
    request_id = uuid.uuid4().hex
    headers = {"x-request-id": request_id, **auth_headers(args.key)}
    if args.async_:
        submit_job(url, body, headers, args)
        return []

    # 2. The output folder, before the server does any work for it.
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ClientError(f"cannot create --out {args.out} ({error.strerror}); pass another folder") from None

    # 3. Post, waiting out 429s a bounded number of times.
    started = time.perf_counter()
    response = post_with_retries(url, body, headers, timeout_s=args.timeout, retries=args.retries)
    elapsed_s = time.perf_counter() - started
    request_id = response.headers.get("x-request-id", request_id)

    # 4. Write one PNG per image, named by prompt and seed so that any image can be made again.
    paths = write_images(parse_images(response), args.out, args.prompt)
    print(f"{len(paths)} image(s) in {elapsed_s:.1f} s, request id {request_id}", file=sys.stderr)
    return paths


def write_images(items: list[dict[str, Any]], out: Path, default_stem: str) -> list[Path]:
    """A file per image ("png": its bytes) and a line on stdout; only slug() and an int name a file."""
    paths: list[Path] = []
    for index, item in enumerate(items):
        seed = item.get("seed")
        prompt = item.get("prompt")
        stem = slug(str(prompt)) if prompt else default_stem
        number = seed if isinstance(seed, int) and not isinstance(seed, bool) else index
        path = out / f"{stem}-{number}.{item.get('extension', 'png')}"
        try:
            path.write_bytes(item["png"])
        except OSError as error:
            raise ClientError(f"cannot write {path} ({error.strerror}); pass another --out") from None
        paths.append(path)
        print(f"{path}\tnsfw={item.get('nsfw', nsfw_label(item.get('nsfw_content_detected')))}")
    return paths


def submit_job(url: str, body: dict[str, Any], headers: dict[str, str], args: argparse.Namespace) -> str:
    """``--async``: the request sent with ``Prefer: respond-async``; the job's id alone on stdout."""
    headers = {**headers, "Prefer": "respond-async", **({"Webhook": args.webhook} if args.webhook else {})}
    response = post_with_retries(url, body, headers, timeout_s=args.timeout, retries=args.retries)
    job_id = response.json().get("id") if response.status_code == 202 else None
    if not isinstance(job_id, str) or not re.fullmatch(r"job_[\w-]+", job_id, re.ASCII):
        raise ClientError(
            f"the server answered {response.status_code} without a job: it does not take "
            "Prefer: respond-async (an Azure ML endpoint does not); send the request without --async"
        )
    print(job_id)
    print(f"job {job_id} queued: `sd-endpoint jobs wait {job_id}` follows it", file=sys.stderr)
    return job_id


def auth_headers(key: str | None) -> dict[str, str]:
    """``Authorization: Bearer`` --key, else $SD_API_KEY."""
    key = key or os.environ.get(KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def read_image_file(path: Path, flag: str) -> bytes:
    """The bytes of an image file to send; ClientError, before anything is sent, for a file that
    is missing, unreadable, empty or larger than the server takes."""
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ClientError(
                f"{flag} {path} is {size:,} bytes, more than the {MAX_IMAGE_BYTES // 2**20} MiB the server "
                "takes; send a smaller or more compressed image (a JPEG or WEBP)"
            )
        with path.open("rb") as file:
            data = file.read(MAX_IMAGE_BYTES + 1)
    except OSError as error:
        raise ClientError(f"cannot read {flag} {path} ({error.strerror or error}); check the path") from None
    if len(data) > MAX_IMAGE_BYTES:  # it grew since
        raise ClientError(
            f"{flag} {path} is larger than {MAX_IMAGE_BYTES // 2**20} MiB; send a smaller image"
        )
    if not data:
        raise ClientError(f"{flag} {path} is empty; give an image file (PNG, JPEG, WEBP)")
    return data


def scoring_url(url: str) -> str:
    """Accept a base URL (http://host:5001) as well as a full scoring URL (.../score)."""
    url = url.rstrip("/")
    return url if url.endswith("/score") else f"{url}/score"


def post_with_retries(
    url: str, body: dict[str, Any], headers: dict[str, str], *, timeout_s: float, retries: int
) -> httpx.Response:
    """POST, retrying a busy server's 429 up to ``retries`` times after the pause its Retry-After
    asks for; every other failure is a ClientError at once."""

    def announce(state: RetryCallState) -> None:
        wait_s = state.next_action.sleep if state.next_action else 0.0
        print(
            f"server busy (429), retrying in {wait_s:g} s (retry {state.attempt_number} of {retries})",
            file=sys.stderr,
        )

    retrying = Retrying(
        retry=retry_if_result(lambda response: response.status_code == 429),
        stop=stop_after_attempt(retries + 1),
        wait=lambda state: retry_after_s(state.outcome.result()) if state.outcome else 1.0,
        before_sleep=announce,
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
    )
    response: httpx.Response = retrying(send, "POST", url, headers, timeout_s, body=body)
    if response.status_code == 429:
        raise ClientError(
            f"the server is still busy after {retries + 1} attempts (429: {error_message(response)}); "
            "try again later or raise --retries."
        )
    refuse_errors(response, headers)
    return response


def refuse_errors(response: httpx.Response, headers: dict[str, str]) -> None:
    """A ClientError for a 401 (saying which key to pass) or any other error answer."""
    if response.status_code == 401:
        problem = "refused the API key" if "Authorization" in headers else "needs an API key"
        raise ClientError(
            f"the server {problem} (401: {error_message(response)}); "
            f"pass the right one with --key or ${KEY_ENV}."
        )
    if response.is_error:
        raise ClientError(f"the server answered {response.status_code}: {error_message(response)}")


class ServerUnreachable(ClientError):
    """No connection could be made (the server is down, or the URL is wrong)."""


def send(
    method: str, url: str, headers: dict[str, str], timeout_s: float, *, body: Any = None, params: Any = None
) -> httpx.Response:
    """One request; a failure to get any answer is a ClientError saying what to check."""
    try:
        return httpx.request(method, url, json=body, params=params, headers=headers, timeout=timeout_s)
    except httpx.ConnectError as error:
        raise ServerUnreachable(
            f"cannot connect to {url} ({error}): is the server running? "
            "Start it with `sd-endpoint serve`, or pass --url."
        ) from error
    except httpx.TimeoutException as error:
        raise ClientError(
            f"no answer from {url} within {timeout_s:g} s; the server may be overloaded, "
            "or raise --timeout for large images and many steps."
        ) from error
    except httpx.HTTPError as error:
        raise ClientError(f"request to {url} failed: {error}") from error


def retry_after_s(response: httpx.Response) -> float:
    """Retry-After as seconds or an HTTP date, capped; one second when absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    seconds = 1.0
    if value.replace(".", "", 1).isdigit():
        seconds = float(value)
    elif value:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            seconds = 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def error_message(response: httpx.Response) -> str:
    """The server's error.message, or what the body says when it is not the error envelope."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
        if isinstance(message, str) and message:
            return message
    text = response.text.strip().replace("\n", " ")
    return text[:200] if text else response.reason_phrase or "no error message"


def parse_images(response: httpx.Response) -> list[dict[str, Any]]:
    try:
        body = response.json()
    except ValueError as error:
        raise ClientError(f"the server's answer is not JSON: {response.text[:200]!r}") from error
    return score_images(body)


def score_images(body: Any) -> list[dict[str, Any]]:
    """/score's answer (a list of records) as images, each with its PNG bytes under "png"."""
    if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
        raise ClientError(f"expected a list of images from the server, got: {str(body)[:200]}")
    items: list[dict[str, Any]] = []
    for item in body:
        try:
            png = base64.b64decode(item["generated_image"], validate=True)
        except (KeyError, TypeError, binascii.Error) as error:
            raise ClientError(f"an image in the server's answer is missing or not base64: {error}") from error
        items.append({**item, "png": png})
    return items


def slug(text: str) -> str:
    """A file-name-safe stem from a prompt (the playground names its downloads the same way)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-") or "image"


def nsfw_label(flag: object) -> str:
    return "unchecked" if flag is None else str(flag).lower()
