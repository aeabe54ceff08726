"""Every way in takes the same samplers and schedules: /score's, OpenAI's and Hugging Face's
``scheduler`` take this server's names and AUTOMATIC1111's (with a schedule after them or not),
and each becomes the engine scheduler A1111's ``sampler_name`` + ``scheduler`` give."""

from __future__ import annotations

from dataclasses import replace

import pytest

from model.schedulers import offered_schedulers
from schemas.a1111 import Txt2ImgRequest
from schemas.huggingface import TextToImageRequest
from schemas.openai import ImageGenerationRequest
from schemas.score import ScoreRequest
from service.runtime.protocols import FieldError, items_of
from tests.runtime.fakes import INFO

SERVED = replace(INFO, schedulers=offered_schedulers())


def schedulers_of(scheduler: str) -> set[str]:
    score = ScoreRequest.model_validate(
        {"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {"scheduler": scheduler}}}
    )
    openai = ImageGenerationRequest.model_validate({"prompt": "x", "scheduler": scheduler})
    hf = TextToImageRequest.model_validate({"inputs": "x", "parameters": {"scheduler": scheduler}})
    items = [
        *items_of(score.input_data, SERVED),
        *items_of(openai, SERVED),
        *items_of(hf, SERVED),
    ]
    return {item.scheduler for item in items}


@pytest.mark.parametrize(
    ("name", "sampler", "schedule", "expected"),
    [
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras", "dpmsolver++:karras"),
        ("DPM++ 2M", "DPM++ 2M", "Automatic", "dpmsolver++:karras"),
        ("dpmsolver++", "DPM++ 2M", "Uniform", "dpmsolver++"),
        ("Euler a", "Euler a", None, "euler_ancestral"),
        ("k_lms", "LMS", "normal", "lms"),
        ("DPM++ 2M SDE", "DPM++ 2M SDE", "automatic", "dpmsolver++_sde:exponential"),
        ("euler:exponential", "Euler", "Exponential", "euler:exponential"),
    ],
)
def test_the_same_choice_through_every_route(
    name: str, sampler: str, schedule: str | None, expected: str
) -> None:
    assert schedulers_of(name) == {expected}
    body = {"prompt": "x", "sampler_name": sampler} | ({"scheduler": schedule} if schedule else {})
    assert {item.scheduler for item in items_of(Txt2ImgRequest.model_validate(body), SERVED)} == {expected}


def test_a_scheduler_no_route_knows_names_the_field_and_the_a1111_names() -> None:
    openai = ImageGenerationRequest.model_validate({"prompt": "x", "scheduler": "DDIM Karras"})
    with pytest.raises(FieldError, match="AUTOMATIC1111 sampler name") as caught:
        items_of(openai, SERVED)
    assert caught.value.param == "scheduler"
