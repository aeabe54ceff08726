"""AUTOMATIC1111's web UI API on the wire (``/sdapi/v1/txt2img`` and what its clients read first).

Open WebUI, SillyTavern, the Krita and GIMP plugins and scripts built on ``webuiapi`` send the
whole txt2img form, most of it at values that change nothing. Each field is accepted at the values
where this server draws the same image A1111 would, and refused by name at any other (a
high-resolution pass, face restoration, another checkpoint), so that nothing is silently ignored.
The generation fields are the definitions every route shares (schemas/fields.py), under the
operator's limits (``ScoreLimits``).

Samplers map onto this server's schedulers (``SAMPLERS``); the "Karras" and other sigma schedules
are not offered, so only A1111's ``Automatic`` schedule is accepted.

This module imports nothing outside ``schemas/``. Error messages never repeat what the client sent.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from schemas.fields import (
    ADAPTER_NAME,
    DEFAULT_STEPS,
    MAX_IMAGES_PER_PROMPT,
    MAX_SEED,
    Adapters,
    Guidance,
    ImageCount,
    Name,
    Prompt,
    Side,
    Steps,
    StepsWithinLimit,
    check_adapters,
    seeds_fit,
)
from schemas.fields import contract_error as _error

# A1111's extra-network syntax for a LoRA in the prompt: <lora:NAME> or <lora:NAME:SCALE>.
LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)

# A1111's sampler names -> this server's schedulers; each also answers to A1111's aliases.
SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Euler": ("euler", ("k_euler",)),
    "Euler a": ("euler_ancestral", ("k_euler_a",)),
    "DDIM": ("ddim", ("ddim",)),
    "PLMS": ("pndm", ("plms",)),
    "DPM++ 2M": ("dpmsolver++", ("k_dpmpp_2m",)),
    "UniPC": ("unipc", ("unipc",)),
}
AUTOMATIC = "Automatic"  # A1111's schedule "as the sampler chooses": the one diffusers' schedulers use
DEFAULT_CFG_SCALE = 7.0  # A1111's default, not /score's 7.5

SAMPLE_TXT2IMG: dict[str, Any] = {
    "prompt": "a photograph of an astronaut riding a horse",
    "negative_prompt": "blurry",
    "steps": 20,
    "cfg_scale": 7,
    "width": 512,
    "height": 512,
    "seed": 42,
    "sampler_name": "Euler a",
    "batch_size": 1,
}


def scheduler_of(sampler: str) -> str | None:
    """This server's scheduler for an A1111 sampler name or alias (any case); None when unknown."""
    wanted = sampler.strip().lower()
    for name, (scheduler, aliases) in SAMPLERS.items():
        if wanted in (name.lower(), scheduler, *aliases):
            return scheduler
    return None


SAMPLER_RULE = f"must be one of: {', '.join(SAMPLERS)} (GET /sdapi/v1/samplers)"

# Fields that matter only when another one is on (the high-resolution pass, the refiner, extension
# scripts): any value is accepted, none is used. SillyTavern's relay adds url and auth (its own
# settings), which are never used, logged or sent back.
IGNORED = (
    "denoising_strength", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
    "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
    "hr_additional_modules", "hr_cfg", "hr_distilled_cfg", "firstphase_width", "firstphase_height",
    "firstpass_image", "refiner_switch_at", "subseed", "s_tmin", "s_tmax", "comments", "force_task_id",
    "save_images", "do_not_save_grid", "do_not_save_samples", "override_settings_restore_afterwards",
    "disable_extra_networks", "url", "auth",
)  # fmt: skip
# Fields accepted at the values that change nothing here, and why another value is refused.
NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "enable_hr": ((False, None), "this server makes no high-resolution second pass; send false"),
    "restore_faces": ((False, None), "this server runs no face restoration; send false"),
    "tiling": ((False, None), "this server draws no tileable images; send false"),
    "subseed_strength": ((0, None), "variation seeds are not supported; send 0"),
    "seed_resize_from_h": ((-1, 0, None), "seed resizing is not supported; send -1"),
    "seed_resize_from_w": ((-1, 0, None), "seed resizing is not supported; send -1"),
    "eta": ((0, None), "the samplers run with eta 0 here; leave it out"),
    "s_churn": ((0, None), "stochastic churn is not supported; send 0"),
    "s_min_uncond": ((0, None), "skipping guidance at low sigmas is not supported; send 0"),
    "clip_skip": ((1, 0, None), "the text encoder's last layer is always used; send 1"),
    "send_images": ((True, None), "the images are always sent back; send true"),
    "styles": (([], None), "saved styles are not supported; put their text in the prompt"),
    "script_name": (("", None), "scripts are not supported; leave it out"),
    "script_args": (([], None), "scripts are not supported; leave it out"),
    "alwayson_scripts": (({}, None), "extension scripts (ADetailer, ControlNet...) are not run here"),
    "refiner_checkpoint": (("", None), "refiner models are not supported; leave it out"),
    "infotext": (("", None), "settings from infotext are not supported; send the fields themselves"),
}
# override_settings: the options whose values here change nothing (sd_model_checkpoint is checked
# against the served names by the route, which knows them).
NEUTRAL_OPTIONS: dict[str, tuple[Any, ...]] = {
    "CLIP_stop_at_last_layers": (1, None),
    "sd_vae": ("Automatic", "None", None, ""),
    "forge_additional_modules": ([], None),
    "samples_format": ("png", None),
    "eta_noise_seed_delta": (0, None),
    "sd_model_checkpoint": (),
}


class Txt2ImgRequest(StepsWithinLimit):
    """The body of ``POST /sdapi/v1/txt2img`` (the fields named here are used; see ``IGNORED`` and
    ``NEUTRAL`` for the others A1111's clients send)."""

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"examples": [SAMPLE_TXT2IMG]})
    steps_field = "steps"

    prompt: Prompt = Field(default="", description="What to draw.")
    negative_prompt: Prompt = Field(default="", description="What to draw away from.")
    steps: Steps = Field(
        default=DEFAULT_STEPS, description="Sampling steps. Default: 50, or the server's max."
    )
    cfg_scale: Guidance = DEFAULT_CFG_SCALE
    width: Side | None = Field(default=None, description="Default: native.")
    height: Side | None = Field(default=None, description="Default: native.")
    batch_size: ImageCount = 1
    n_iter: ImageCount = Field(default=1, description="Batches; images = both.")
    # A1111's -1 draws a seed: its own rule, beside the other routes' Seed; after the image counts,
    # which its validator reads.
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED, description="-1: random. Image k gets seed + k.")
    sampler_name: Name | None = Field(default=None, description=SAMPLER_RULE[8:])
    sampler_index: Name | None = Field(default=None, description="Used when sampler_name is not.")
    scheduler: Name | None = Field(default=None, description=f'Only "{AUTOMATIC}".')
    adapters: Adapters = Field(
        default=None,
        description='LoRA adapters, as /score\'s {"NAME": scale}; each <lora:NAME:SCALE> of the prompt '
        "(A1111's syntax; SCALE defaults to 1) is taken out of the text and added here.",
    )
    override_settings: dict[str, Any] | None = Field(
        default=None, description="Accepted where each value is what this server uses anyway."
    )

    @field_validator("seed")
    @classmethod
    def _seeds_fit(cls, value: int, info: ValidationInfo) -> int:
        images = info.data.get("batch_size", 1) * info.data.get("n_iter", 1)
        if value >= 0 and not seeds_fit(value, images):
            raise _error(f"seed + images - 1 must be at most {MAX_SEED}; send a smaller seed")
        return value

    @field_validator("sampler_name", "sampler_index")
    @classmethod
    def _known_sampler(cls, value: str | None) -> str | None:
        if value is not None and value and scheduler_of(value) is None:
            raise _error(SAMPLER_RULE)
        return value

    @field_validator("scheduler")
    @classmethod
    def _automatic_only(cls, value: str | None) -> str | None:
        if value and value.lower() != AUTOMATIC.lower():
            raise _error(f'must be "{AUTOMATIC}": the samplers run on their own schedules here')
        return value

    @field_validator("override_settings")
    @classmethod
    def _neutral_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for name, setting in (value or {}).items():
            allowed = NEUTRAL_OPTIONS.get(name)
            if allowed is None:
                raise _error(f"{_shown(name)} is not an option this server can apply; leave it out")
            if allowed and not _is(setting, allowed):
                raise _error(f"{_shown(name)} must be left at {allowed[0]!r} on this server")
            if name == "sd_model_checkpoint" and not isinstance(setting, str | None):
                # Checked against the served titles by the route, which reads strings only.
                raise _error("sd_model_checkpoint must be a checkpoint's title (GET /sdapi/v1/sd-models)")
        return value

    @model_validator(mode="after")
    def _the_rest(self) -> Txt2ImgRequest:
        # 1. Every other field: ignored, neutral at its value, or refused by name.
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED:
                continue
            if name == "s_noise":
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise _error("s_noise must be a number (1: the noise unscaled)")
                if value != 1 and self.scheduler_name == "euler_ancestral":
                    raise _error("s_noise must be 1 with Euler a: its noise is not scaled here")
                continue
            neutral = NEUTRAL.get(name)
            if neutral is None:
                raise _error(f"{_shown(name)} is not a field this server knows; leave it out")
            if not _is(value, neutral[0]):
                raise _error(f"{name}: {neutral[1]}")
        # 2. The images of one request.
        if self.batch_size * self.n_iter > MAX_IMAGES_PER_PROMPT:
            raise _error(f"batch_size x n_iter may be at most {MAX_IMAGES_PER_PROMPT} images per request")

        # 3. LoRA tags out of the prompt's text, into the adapters (checked as /score checks them).
        self.prompt, tagged = lora_tags(self.prompt)
        if tagged:
            try:
                self.adapters = check_adapters({**(self.adapters or {}), **tagged})
            except PydanticCustomError as error:
                raise _error(f"the prompt's <lora:...> tags: {error.message()}") from None
        return self

    @property
    def scheduler_name(self) -> str | None:
        """This server's scheduler (None: the model's own); sampler_name first, as A1111 reads them."""
        sampler = self.sampler_name or self.sampler_index
        return scheduler_of(sampler) if sampler else None

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def checkpoint(self) -> str | None:
        value = (self.override_settings or {}).get("sd_model_checkpoint")
        return value if isinstance(value, str) else None


def _is(value: Any, allowed: tuple[Any, ...]) -> bool:
    """``value`` is one of ``allowed``, a boolean only where a boolean is (JSON's false is not 0)."""
    return any(value == each and isinstance(value, bool) == isinstance(each, bool) for each in allowed)


def _shown(name: str) -> str:
    """A field name fit to repeat: short and plain, else a placeholder."""
    return name if len(name) <= 64 and name.replace("_", "").isalnum() and name.isascii() else "a field"


def lora_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """The prompt without its ``<lora:NAME:SCALE>`` tags, and the adapters they name; a tag this
    server cannot apply (no name, a scale that is not a number, A1111's separate text-encoder and
    UNet weights) is refused by what is wrong with it."""
    adapters: dict[str, float] = {}
    for match in LORA_TAG.finditer(prompt):
        name, _, rest = match.group(1).partition(":")
        name = name.strip()
        if not ADAPTER_NAME.fullmatch(name):
            raise _error(
                "a <lora:NAME:SCALE> tag of the prompt names no adapter (GET /sdapi/v1/loras lists them)"
            )
        if ":" in rest:
            raise _error(f"<lora:{name}:...> gives two weights; this server applies one scale per adapter")
        try:
            scale = float(rest) if rest.strip() else 1.0
        except ValueError:
            raise _error(f"<lora:{name}:...>: the scale is not a number") from None
        if not math.isfinite(scale):
            raise _error(f"<lora:{name}:...>: the scale must be a finite number")
        adapters[name] = scale
    if not adapters:
        return prompt, adapters
    return " ".join(LORA_TAG.sub(" ", prompt).split()), adapters
