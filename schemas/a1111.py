"""AUTOMATIC1111's web UI API on the wire (``/sdapi/v1/txt2img`` and what its clients read first).

Open WebUI, SillyTavern, the Krita and GIMP plugins and scripts built on ``webuiapi`` send the
whole txt2img form, most of it at values that change nothing. Each field is accepted at the values
where this server draws the same image A1111 would, and refused by name at any other (a
high-resolution pass, face restoration), so that nothing is silently ignored.
The generation fields are the definitions every route shares (schemas/fields.py), under the
operator's limits (``ScoreLimits``).

Samplers and schedules map onto this server's schedulers through one table (schemas/samplers.py);
``eta`` and CLIP skip are honoured as A1111 reads them.

This module imports nothing outside ``schemas/``. Error messages never repeat what the client sent.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from schemas.fields import (
    ADAPTER_NAME,
    DEFAULT_STEPS,
    MAX_IMAGES_PER_PROMPT,
    MAX_MODEL_NAME_CHARS,
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
    printable_name,
    seeds_fit,
)
from schemas.fields import contract_error as _error
from schemas.samplers import (
    SAMPLERS,
    A1111Sampler,
    resolve,
    sampler_rule,
    schedule_rule,
    split_sampler,
)

# A1111's extra-network syntax for a LoRA in the prompt: <lora:NAME> or <lora:NAME:SCALE>.
LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)

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


SAMPLER_RULE = sampler_rule()
MAX_CLIP_SKIP = 12  # A1111's slider; the model's text encoder may have fewer layers (the engine says)

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
    "enable_hr": (
        (False, None),
        "the hires fix is not run as one request here; send false, then send the image to "
        "/sdapi/v1/img2img at the larger size with denoising_strength (what the fix does)",
    ),
    "restore_faces": ((False, None), "this server runs no face restoration; send false"),
    "tiling": ((False, None), "this server draws no tileable images; send false"),
    "subseed_strength": ((0, None), "variation seeds are not supported; send 0"),
    "seed_resize_from_h": ((-1, 0, None), "seed resizing is not supported; send -1"),
    "seed_resize_from_w": ((-1, 0, None), "seed resizing is not supported; send -1"),
    "s_churn": ((0, None), "stochastic churn is not supported; send 0"),
    "s_min_uncond": ((0, None), "skipping guidance at low sigmas is not supported; send 0"),
    "send_images": ((True, None), "the images are always sent back; send true"),
    "styles": (([], None), "saved styles are not supported; put their text in the prompt"),
    "script_name": (("", None), "scripts are not supported; leave it out"),
    "script_args": (([], None), "scripts are not supported; leave it out"),
    "use_deprecated_controlnet": ((False, None), "ControlNet is not run here; send false"),
    "controlnet_units": (([], None), "ControlNet is not run here; send no units"),
    "refiner_checkpoint": (("", None), "refiner models are not supported; leave it out"),
    "infotext": (("", None), "settings from infotext are not supported; send the fields themselves"),
}
# override_settings: the options whose values here change nothing (sd_model_checkpoint picks the
# request's model: the route resolves it against the library, which knows the names).
NEUTRAL_OPTIONS: dict[str, tuple[Any, ...]] = {
    "CLIP_stop_at_last_layers": (1, None),  # any of 1-12 is applied (Txt2ImgRequest.clip_layers)
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
    # The fields accepted and not used, and the ones accepted at neutral values (img2img adds some).
    ignored: ClassVar[tuple[str, ...]] = IGNORED
    neutral: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = NEUTRAL

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
    scheduler: Name | None = Field(default=None, description=schedule_rule()[8:])
    eta: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="DDIM's eta (default 0); samplers with their own noise (Euler a...) take only 1.",
    )
    clip_skip: int | None = Field(
        default=None, ge=1, le=MAX_CLIP_SKIP, description="CLIP_stop_at_last_layers: 1 uses the last layer."
    )
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
        if value is not None and value and split_sampler(value) is None:
            raise _error(SAMPLER_RULE)
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_schedule(cls, value: str | None) -> str | None:
        if value:
            try:
                resolve(None, value)
            except ValueError:
                raise _error(schedule_rule()) from None
        return value

    @field_validator("override_settings")
    @classmethod
    def _neutral_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for name, setting in (value or {}).items():
            allowed = NEUTRAL_OPTIONS.get(name)
            if name == "CLIP_stop_at_last_layers" and _is_clip_skip(setting):
                continue
            if allowed is None:
                raise _error(f"{_shown(name)} is not an option this server can apply; leave it out")
            if allowed and not _is(setting, allowed):
                raise _error(f"{_shown(name)} must be left at {allowed[0]!r} on this server")
            if name == "sd_model_checkpoint":  # which titles serve is the library's to say (404)
                check_checkpoint(setting)
        return value

    @model_validator(mode="after")
    def _the_rest(self) -> Txt2ImgRequest:
        # 1. Every other field: ignored, neutral at its value, or refused by name.
        for name, value in (self.model_extra or {}).items():
            if name in self.ignored:
                continue
            if name == "alwayson_scripts":
                _scripts_off(value)
                continue
            if name == "s_noise":
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise _error("s_noise must be a number (1: the noise unscaled)")
                if value != 1 and self.sampler_entry is not None and self.sampler_entry.eta == "noise":
                    raise _error("s_noise must be 1 with samplers that add noise: it is not scaled here")
                continue
            neutral = self.neutral.get(name)
            if neutral is None:
                raise _error(f"{_shown(name)} is not a field this server knows; leave it out")
            if not _is(value, neutral[0]):
                raise _error(f"{name}: {neutral[1]}")
        # 2. The images of one request.
        if self.batch_size * self.n_iter > MAX_IMAGES_PER_PROMPT:
            raise _error(f"batch_size x n_iter may be at most {MAX_IMAGES_PER_PROMPT} images per request")

        # 3. eta as A1111 reads it for this sampler.
        entry = self.sampler_entry
        if self.eta is not None and entry is not None and entry.eta == "noise" and self.eta != 1:
            raise _error(
                f"eta: {self.sampler_label} runs with its own noise, A1111's eta 1; send 1 or leave it out "
                "(for eta 0 pick the sampler without noise, such as Euler for Euler a)"
            )
        # 4. A schedule without a sampler, and two CLIP skips that disagree, would be ignored in part.
        if entry is None and self.scheduler and self.scheduler_name is None and not _plain(self.scheduler):
            raise _error("scheduler: a schedule other than Automatic needs a sampler_name to apply to")
        setting = (self.override_settings or {}).get("CLIP_stop_at_last_layers")
        if self.clip_skip is not None and setting is not None and setting != self.clip_skip:
            raise _error("clip_skip and override_settings.CLIP_stop_at_last_layers differ; send one value")
        # 5. LoRA tags out of the prompt's text, into the adapters (checked as /score checks them).
        self.prompt, tagged = lora_tags(self.prompt)
        if tagged:
            try:
                self.adapters = check_adapters({**(self.adapters or {}), **tagged})
            except PydanticCustomError as error:
                raise _error(f"the prompt's <lora:...> tags: {error.message()}") from None
        return self

    @property
    def sampler_label(self) -> str | None:
        """A1111's name of the sampler asked for (sampler_name first, as A1111 reads them)."""
        found = split_sampler(self.sampler_name or self.sampler_index or "")
        return found[0] if found else None

    @property
    def sampler_entry(self) -> A1111Sampler | None:
        label = self.sampler_label
        return SAMPLERS[label] if label else None

    @property
    def scheduler_name(self) -> str | None:
        """This server's scheduler (None: the model's own); a schedule in the sampler's name wins."""
        return resolve(self.sampler_name or self.sampler_index, self.scheduler)

    @property
    def engine_eta(self) -> float:
        """The eta of the engine's item: DDIM's (A1111's default 0); the others take none."""
        entry = self.sampler_entry
        return float(self.eta or 0) if entry is not None and entry.eta == "ddim" else 0.0

    @property
    def clip_layers(self) -> int:
        """A1111's CLIP_stop_at_last_layers (1: the last layer): clip_skip, else the override."""
        setting = (self.override_settings or {}).get("CLIP_stop_at_last_layers")
        if self.clip_skip is not None:
            return self.clip_skip
        return setting if isinstance(setting, int) and _is_clip_skip(setting) else 1

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def checkpoint(self) -> str | None:
        value = (self.override_settings or {}).get("sd_model_checkpoint")
        return value if isinstance(value, str) else None


def check_checkpoint(value: Any) -> None:
    """A checkpoint's title, with every route's rules of a model's name (schemas/fields.py)."""
    if not isinstance(value, str | None):
        raise _error("sd_model_checkpoint must be a checkpoint's title (GET /sdapi/v1/sd-models)")
    if value is not None and len(value) > MAX_MODEL_NAME_CHARS:
        raise _error(f"sd_model_checkpoint is longer than {MAX_MODEL_NAME_CHARS} characters")
    try:
        printable_name(value or "")
    except PydanticCustomError as error:
        raise _error(f"sd_model_checkpoint {error.message()}") from None


def _scripts_off(scripts: Any) -> None:
    """``alwayson_scripts`` asks for nothing when each script's ``args`` are empty or switched off
    (False, null, or units with ``"enabled": false``): webuiapi and stable-diffusion-api send
    ``{"ControlNet": {"args": []}}`` and ``{"ADetailer": {"args": [false]}}`` so that A1111 does not
    reuse earlier arguments. A script with work to do is refused by name."""
    if scripts is None:
        return
    if not isinstance(scripts, dict):
        raise _error("alwayson_scripts must be an object of scripts, each with its args")
    for name, entry in scripts.items():
        args = entry.get("args", []) if isinstance(entry, dict) else entry
        if not isinstance(args, list) or not all(_switched_off(arg) for arg in args):
            raise _error(
                f"alwayson_scripts: {_shown(name)} asks for work this server does not do "
                "(it runs no extension scripts); send it with empty args, or leave it out"
            )


def _switched_off(arg: Any) -> bool:
    return arg is None or arg is False or (isinstance(arg, dict) and arg.get("enabled") is False)


def _plain(schedule: str) -> bool:
    """Whether a schedule is the scheduler's own (Automatic, Uniform, Normal), which needs no sampler."""
    try:
        return resolve("Euler", schedule) == "euler"
    except ValueError:
        return False


def _is_clip_skip(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_CLIP_SKIP


def _is(value: Any, allowed: tuple[Any, ...]) -> bool:
    """``value`` is one of ``allowed``, a boolean only where a boolean is (JSON's false is not 0)."""
    return any(value == each and isinstance(value, bool) == isinstance(each, bool) for each in allowed)


def _shown(name: str) -> str:
    """A field name fit to repeat: short and plain, else a placeholder."""
    plain = name.replace("_", "").replace(" ", "")
    return name if len(name) <= 64 and plain.isalnum() and name.isascii() else "a field"


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
