"""The safety checker on tensors agrees with diffusers' PIL path; flagged images are exactly black."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import model
from model.safety import nsfw_flags, preprocess
from model.types import GenerationItem


@pytest.fixture()
def engine() -> model.Engine:
    return model.load("random:tiny", device="cpu")


def items(count: int, size: int = 128) -> list[GenerationItem]:
    return [
        GenerationItem(prompt=f"prompt {i}", seed=i, num_inference_steps=2, height=size, width=size)
        for i in range(count)
    ]


def pil_path_clip_input(engine: model.Engine, images: torch.Tensor) -> torch.Tensor:
    """What StableDiffusionPipeline feeds the checker: PIL images through CLIPImageProcessor."""
    from diffusers.image_processor import VaeImageProcessor

    pil = VaeImageProcessor().postprocess(images * 2 - 1, output_type="pil")
    pixel_values: torch.Tensor = engine.components.feature_extractor(pil, return_tensors="pt").pixel_values
    return pixel_values


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_tensor_preprocessing_matches_clip_image_processor(
    engine: model.Engine, size: tuple[int, int]
) -> None:
    height, width = size
    torch.manual_seed(0)
    images = torch.rand(3, 3, height, width)
    ours = preprocess(images, engine.components.feature_extractor)
    theirs = pil_path_clip_input(engine, images)
    assert ours.shape == theirs.shape == (3, 3, 224, 224)
    # bicubic kernels differ slightly between PIL and torch; the mean error is a fraction of a grey level
    assert (ours - theirs).abs().mean() < 0.02


def test_flags_match_the_pil_path_on_both_sides_of_the_threshold(engine: model.Engine) -> None:
    checker = engine.components.safety_checker
    # distinct colour gradients: a random model's own outputs all look alike to a random CLIP
    images = torch.zeros(8, 3, 128, 160)
    for i in range(8):
        images[i, i % 3] = torch.linspace(0, 1, 160).view(1, -1) * (i + 1) / 8
        images[i, (i + 1) % 3] = i / 8
    pil_input = pil_path_clip_input(engine, images)
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pil_input)[1])
        cosine = (
            torch.nn.functional.normalize(embeds, dim=-1)
            @ torch.nn.functional.normalize(checker.concept_embeds, dim=-1).T
        )
    # put concept 0's threshold between the images' scores so that some are flagged and some not
    scores = cosine[:, 0].sort().values
    checker.concept_embeds_weights[0] = float((scores[3] + scores[4]) / 2)
    _, reference_flags = checker(clip_input=pil_input, images=images.clone())
    ours = nsfw_flags(checker, preprocess(images, engine.components.feature_extractor)).tolist()
    assert ours == list(reference_flags)
    assert 0 < sum(ours) < len(ours)


def test_a_random_checker_flags_nothing(engine: model.Engine) -> None:
    assert [r.nsfw_content_detected for r in engine.generate(items(2))] == [False, False]


def test_flagged_images_are_all_black_with_flag_true(engine: model.Engine) -> None:
    engine.components.safety_checker.concept_embeds_weights.fill_(-1.0)  # every concept fires
    results = engine.generate(items(3))
    for result in results:
        assert result.nsfw_content_detected is True
        assert result.image.shape == (128, 128, 3) and not result.image.any()
    floats, flags = engine.generate_float(items(1))
    assert flags == [True] and float(floats.abs().max()) == 0.0


def test_nothing_in_an_item_turns_the_checker_off(engine: model.Engine) -> None:
    """Items carry no switch: every GenerationItem field is generation input, none is safety policy."""
    fields = set(GenerationItem.__dataclass_fields__)
    assert not {f for f in fields if "safe" in f or "nsfw" in f or "check" in f}
    engine.components.safety_checker.concept_embeds_weights.fill_(-1.0)
    mixed = [
        GenerationItem(prompt="p", seed=1, num_inference_steps=2, height=128, width=128, guidance_scale=g)
        for g in (0.0, 1.0, 30.0)
    ]
    assert all(r.nsfw_content_detected and not r.image.any() for r in engine.generate(mixed))
    assert np.all([r.seed == 1 for r in engine.generate(mixed)])
