"""Bad input never gives a 500, never echoes what was sent, and leaves the server serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.helpers.servers import GatedEngine, ThreadServer, request_body, tiny_engine

MARK = "ZEBRA-7741"  # planted in bad input; no error message may repeat it
MAX_PROMPTS, MAX_PROMPT_CHARS, MAX_STEPS = 4, 300, 40


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    settings = Settings(max_prompts=MAX_PROMPTS, max_prompt_chars=MAX_PROMPT_CHARS, max_steps=MAX_STEPS)
    engine = GatedEngine(tiny_engine())
    with ThreadServer(settings, engine) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def with_input(**fields: Any) -> dict[str, Any]:
    body = request_body([f"a {MARK}"])
    body["input_data"].update(fields)
    return body


def with_parameters(**parameters: Any) -> dict[str, Any]:
    body = request_body([f"a {MARK}"])
    body["input_data"]["parameters"].update(parameters)
    return body


CASES: dict[str, tuple[str | dict[str, Any] | list[str], int, str]] = {
    # name: (body (str = raw text), status, a word the message must contain)
    "malformed JSON": ('{"input_data": {"columns": ["prompt"], "data": ["' + MARK, 400, "not valid JSON"),
    "not UTF-8": ("\udcff", 400, "not valid JSON"),
    "unknown parameter": (with_parameters(**{f"x{MARK}".replace("-", "_"): 1}), 422, "Extra inputs"),
    "odd unknown key": (with_parameters(**{f"<{MARK}>": 1}), 422, "Extra inputs"),
    "bare NaN": (
        '{"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {"guidance_scale": NaN}}}',
        422,
        "NaN",
    ),
    "infinite guidance": (
        '{"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {"guidance_scale": Infinity}}}',
        422,
        "Infinity",
    ),
    "steps as a string": (with_parameters(num_inference_steps="50"), 422, "num_inference_steps"),
    "steps 0": (with_parameters(num_inference_steps=0), 422, "num_inference_steps"),
    "steps above the server's cap": (with_parameters(num_inference_steps=MAX_STEPS + 1), 422, str(MAX_STEPS)),
    "width 7": (with_parameters(width=7), 422, "width"),
    "height too large": (with_parameters(height=2048), 422, "height"),
    "guidance above 30": (with_parameters(guidance_scale=31), 422, "guidance_scale"),
    "five images per prompt": (with_parameters(num_images_per_prompt=5), 422, "num_images_per_prompt"),
    "negative seed": (with_parameters(seed=-1), 422, "seed"),
    "unknown scheduler": (with_parameters(scheduler=f"s{MARK}"), 422, "scheduler"),
    "index length mismatch": (with_input(index=[0, 1]), 422, "index"),
    "non-string prompt": (with_input(data=[42]), 422, "data[0]"),
    "non-string prompt in a list row": (with_input(columns=["prompt", "seed"], data=[[1, 2]]), 422, "prompt"),
    "string seed in a row": (with_input(columns=["prompt", "seed"], data=[[MARK, "7"]]), 422, "seed"),
    "no prompt column": (with_input(columns=["negative_prompt"], data=[MARK]), 422, "prompt"),
    "unknown column": (with_input(columns=["prompt", MARK]), 422, "columns"),
    "empty data": (with_input(data=[]), 422, "data"),
    "too many rows": (with_input(data=[MARK] * (MAX_PROMPTS + 1)), 422, str(MAX_PROMPTS)),
    "prompt too long": (with_input(data=[MARK * 100]), 422, str(MAX_PROMPT_CHARS)),
    "row object with an unknown key": (with_input(data=[{"prompt": "a", MARK: 1}]), 422, "data[0]"),
    "data not a list": (with_input(data=MARK), 422, "data"),
    "no input_data": ({"inputs": MARK}, 422, "input_data"),
    "a list at the top": ([MARK], 422, "dictionary"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_clear_json_error_without_the_input(client: httpx.Client, name: str) -> None:
    body, status, expected_word = CASES[name]
    content = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else json.dumps(body).encode()
    response = client.post("/score", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and error["code"] and error["code"] == error["code"].lower()
    assert expected_word in error["message"]
    assert MARK not in response.text


def test_the_server_still_serves_after_bad_input(client: httpx.Client) -> None:
    for body, _, _ in CASES.values():
        content = (
            body.encode("utf-8", "surrogateescape") if isinstance(body, str) else json.dumps(body).encode()
        )
        client.post("/score", content=content, headers={"content-type": "application/json"})
    response = client.post("/score", json=request_body(["after all that"]))
    assert response.status_code == 200
    assert len(response.json()) == 1


def test_unknown_route_and_method_answer_the_json_envelope(client: httpx.Client) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = client.get("/score")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
