"""The JSON value budget of every route's body (service/runtime/scoring.py): told from the bytes
before the parser runs, so that a megabyte of tiny values never holds the interpreter (and every
other request, health checks included) for the parse; the same count as on the parsed document."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import service.runtime.scoring as scoring
from schemas.score import ScoreLimits, ScoreRequest
from service.runtime.errors import ContractError, MalformedJsonError

LIMITS = ScoreLimits()
BUDGET = 256 + 16 * LIMITS.max_prompts

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
)


def values(document: Any) -> int:
    """Values plus keys, the smallest budget _holds_more_values accepts."""
    budget = 0
    while scoring._holds_more_values(document, budget):
        budget += 1
    return budget


@settings(max_examples=300, deadline=None)
@given(documents, st.sampled_from([None, 1, "\t"]))
def test_the_scan_counts_what_the_parser_reads(document: Any, indent: int | str | None) -> None:
    body = json.dumps(document, indent=indent, ensure_ascii=False).encode()
    count = values(document)
    assert not scoring._too_deep_or_too_many(body, count)
    if count:
        assert scoring._too_deep_or_too_many(body, count - 1)


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({f"k{i}": i for i in range(90_000)}).encode(),  # the costly body
        b"[" + b"{}," * 300_000 + b"{}]",  # many empty containers, never deep
        b"[" + b'"",' * 300_000 + b'""]',
        b'{"input_data": {"columns": ["prompt"], "data": [' + b'"a\\"b",' * 100_000 + b'"x"]}}',
        b"[" + b"1 ," * 300_000 + b"1]",
    ],
)
def test_a_body_over_the_budget_is_refused_without_being_parsed(
    body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_parse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("json.loads ran on a body the scan could refuse")

    monkeypatch.setattr(scoring.json, "loads", no_parse)
    with pytest.raises(ContractError, match=f"more than {BUDGET} JSON values"):
        scoring.parse_body(body, ScoreRequest, LIMITS)


@pytest.mark.parametrize(
    "body", [b"[" * 200_000 + b"]" * 200_000, b'{"input_data": ' * 50_000 + b"1" + b"}" * 50_000]
)
def test_nesting_deeper_than_the_parser_goes_is_still_the_parsers_400(body: bytes) -> None:
    with pytest.raises(MalformedJsonError, match="nests too deeply"):
        scoring.parse_body(body, ScoreRequest, LIMITS)


def test_a_valid_request_with_every_limit_used_passes_the_scan() -> None:
    prompt = ('a, b: [c] {d} \\" é ' * 200)[: LIMITS.max_prompt_chars]
    document = {
        "input_data": {
            "columns": ["prompt"],
            "data": [prompt] * LIMITS.max_prompts,
            "index": list(range(LIMITS.max_prompts)),
            "parameters": {"num_inference_steps": 2, "guidance_scale": 7.5, "seed": 1},
        }
    }
    body = json.dumps(document).encode()
    assert not scoring._too_deep_or_too_many(body, BUDGET)
    assert len(scoring.parse_body(body, ScoreRequest, LIMITS).input_data.rows) == LIMITS.max_prompts
