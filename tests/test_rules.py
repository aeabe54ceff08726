"""One definition of each rule: every way in (/score, OpenAI's, AUTOMATIC1111's and Hugging Face's
routes, batch parameters) takes the same values of the fields they share, hostile ones included,
and the lone-surrogate check is written once."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.a1111 import Txt2ImgRequest
from schemas.huggingface import TextToImageRequest
from schemas.openai import ImageGenerationRequest
from schemas.score import ScoreLimits, ScoreRequest
from service.batch.errors import BatchConfigError
from service.batch.params import JobParams
from service.runtime.scoring import describe_validation_error
from service.storage.names import unsafe_name_reason

ROOT = Path(__file__).resolve().parents[1]
LIMITS = ScoreLimits(max_prompts=4, max_prompt_chars=20, max_steps=40)
Accepts = Callable[[Any], bool]


def validates(model: type[Any], body: Callable[[Any], dict[str, Any]]) -> Accepts:
    def accepts(value: Any) -> bool:
        try:
            model.model_validate(body(value), context={"limits": LIMITS})
        except ValidationError:
            return False
        return True

    return accepts


def on_score(name: str) -> Accepts:
    return validates(
        ScoreRequest,
        lambda v: {"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {name: v}}},
    )


def on_score_row(value: Any) -> bool:
    body = {"input_data": {"columns": ["prompt", "seed"], "data": [[value, None]]}}
    return validates(ScoreRequest, lambda v: body)(value)


def on_openai(name: str) -> Accepts:
    return validates(ImageGenerationRequest, lambda v: {"prompt": "x", name: v})


def on_a1111(name: str) -> Accepts:
    return validates(Txt2ImgRequest, lambda v: {name: v})


def on_huggingface(name: str) -> Accepts:
    return validates(TextToImageRequest, lambda v: {"inputs": "x", "parameters": {name: v}})


def in_batch(name: str) -> Accepts:
    def accepts(value: Any) -> bool:
        try:
            JobParams(**{"num_inference_steps": 1, name: value}).check(max_steps=LIMITS.max_steps)
        except BatchConfigError:
            return False
        return True

    return accepts


HUGE = [2**63, 2**64, 10**30, -(2**70), 10**400]
NOT_NUMBERS = [True, False, "7", [7], {"v": 7}]
TEXTS = ["\ud800", "a \udfff b", "\ud83d", "x" * 21, "x" * 10_000]
# field: (the values to try, the ways in that take the field, each under its own name)
FIELDS: dict[str, tuple[list[Any], list[Accepts]]] = {
    "steps": (
        [1, 40, 41, 0, -1, 2.0, *HUGE, *NOT_NUMBERS],
        [on_score("num_inference_steps"), on_openai("num_inference_steps"), on_a1111("steps"),
         on_huggingface("num_inference_steps"), in_batch("num_inference_steps")],
    ),
    "guidance": (
        [0, 7, 30, 7.5, 30.5, -0.1, math.nan, math.inf, -math.inf, 1e308, *HUGE, *NOT_NUMBERS],
        [on_score("guidance_scale"), on_openai("guidance_scale"), on_a1111("cfg_scale"),
         on_huggingface("guidance_scale"), in_batch("guidance_scale")],
    ),
    "seed": (
        [0, 7, 2**63 - 1, -1, -2, 1.0, *HUGE, *NOT_NUMBERS],
        [on_score("seed"), on_openai("seed"), on_huggingface("seed"), in_batch("seed")],
    ),
    "side": (
        [128, 512, 1024, 1032, 100, 0, 8, 136.0, *HUGE, *NOT_NUMBERS],
        [on_score("width"), on_score("height"), on_a1111("width"), on_huggingface("height")],
    ),
    "negative prompt": (
        ["a", "x" * 20, 5, *TEXTS],
        [on_score("negative_prompt"), on_openai("negative_prompt"), on_a1111("negative_prompt"),
         on_huggingface("negative_prompt")],
    ),
    "prompt": (
        ["a", "x" * 20, 5, *TEXTS],
        [on_score_row, on_openai("prompt"), on_a1111("prompt"),
         validates(TextToImageRequest, lambda v: {"inputs": v})],
    ),
    "scheduler": (
        ["euler", "x" * 64, "x" * 65, "\ud800", 3],
        [on_score("scheduler"), on_openai("scheduler"), on_huggingface("scheduler"), in_batch("scheduler")],
    ),
    "adapters": (
        [{"style": 1}, {"style": 2.0}, {"a.b-c_1": -2}, {"style": 2.5}, {"style": math.nan},
         {"style": math.inf}, {"style": True}, {"style": "1"}, {"../x": 1.0}, {"": 1.0},
         {"x" * 65: 1.0}, {"\ud800": 1.0},
         {str(i): 1.0 for i in range(5)}, ["style"], 1.0],
        [on_score("adapters"), on_openai("adapters"), on_a1111("adapters"), in_batch("adapters")],
    ),
}  # fmt: skip


@pytest.mark.parametrize("field", list(FIELDS))
def test_every_way_in_takes_the_same_values_of_a_field(field: str) -> None:
    values, ways = FIELDS[field]
    for value in values:
        answers = [accepts(value) for accepts in ways]
        assert len(set(answers)) == 1, (field, value, answers)
    assert any(ways[0](value) for value in values) and not all(ways[0](value) for value in values)


def test_rule_messages_follow_the_place_they_name() -> None:
    body = {
        "input_data": {"columns": ["prompt"], "data": ["x" * 21], "parameters": {"negative_prompt": "\ud800"}}
    }
    with pytest.raises(ValidationError) as raised:
        ScoreRequest.model_validate(body, context={"limits": LIMITS})
    message = describe_validation_error(raised.value)
    assert "input_data.data[0].prompt is longer than 20 characters" in message
    assert (
        "input_data.parameters.negative_prompt is not valid Unicode text (it holds a lone surrogate)"
        in message
    )
    with pytest.raises(BatchConfigError, match="num_inference_steps may be at most 40 on this server"):
        JobParams(num_inference_steps=41).check(max_steps=40)


def test_the_lone_surrogate_check_is_written_once() -> None:
    """Every path in asks schemas.fields.is_text; no other module tries an encoding to find out."""
    writers = sorted(
        str(path.relative_to(ROOT))
        for package in ("model", "schemas", "service")
        for path in (ROOT / package).rglob("*.py")
        if "UnicodeEncodeError" in path.read_text(encoding="utf-8")
    )
    assert writers == ["schemas/fields.py"]
    assert "not valid UTF-8" in unsafe_name_reason("a\udcff.csv")


def test_seeds_past_the_generators_bound_are_refused_on_every_route_before_conversion() -> None:
    """Image k of a request gets seed + k on every route; the last one must still fit."""
    top = 2**63 - 1
    refused = [
        (ImageGenerationRequest, {"prompt": "x", "seed": top, "n": 2}),
        (Txt2ImgRequest, {"seed": top, "batch_size": 2}),
        (Txt2ImgRequest, {"seed": top - 1, "n_iter": 3}),
        (ScoreRequest, {"input_data": {"columns": ["prompt"], "data": ["a", "b"],
                                       "parameters": {"seed": top}}}),
        (ScoreRequest, {"input_data": {"columns": ["prompt", "seed"], "data": [["a", top]],
                                       "parameters": {"num_images_per_prompt": 2}}}),
    ]  # fmt: skip
    for model, body in refused:
        assert not validates(model, lambda v: v)(body), body
    taken = [
        (ImageGenerationRequest, {"prompt": "x", "seed": top - 1, "n": 2}),
        (Txt2ImgRequest, {"seed": -1, "batch_size": 4}),
        (ScoreRequest, {"input_data": {"columns": ["prompt", "seed"], "data": [["a", None], ["b", 5]],
                                       "parameters": {"seed": top}}}),
    ]  # fmt: skip
    for model, body in taken:
        assert validates(model, lambda v: v)(body), body
