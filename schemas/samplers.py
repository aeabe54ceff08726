"""AUTOMATIC1111's samplers and schedules, and the diffusers scheduler each one runs here.

The one table of names (docs/api.md repeats it; tests/test_docs.py keeps the two equal): each
A1111 sampler is one of this server's scheduler names (model/schedulers.py: a diffusers class and
its options), and each schedule one config flag, as diffusers' own mapping documents them. Every
route takes these names: ``sampler_name`` + ``scheduler`` on /sdapi/v1, ``scheduler`` ("DPM++ 2M
Karras", "dpmsolver++:karras") on /score, OpenAI's and Hugging Face's routes.

This module imports nothing outside ``schemas/``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class A1111Sampler:
    """One of A1111's samplers: the scheduler it runs, its aliases, the schedule "Automatic" means
    for it (A1111 1.9+ gives some samplers Karras or Exponential sigmas by default), and how it
    takes ``eta``: "ddim" (DDIM's own eta), "noise" (its own noise is A1111's eta 1: only 1 is
    honoured) or "none" (deterministic: A1111 ignores eta for it, and so does this server)."""

    scheduler: str
    aliases: tuple[str, ...] = ()
    automatic: str | None = None  # None: the scheduler's own spacing (the model's config)
    eta: str = "none"


SAMPLERS: dict[str, A1111Sampler] = {
    "DPM++ 2M": A1111Sampler("dpmsolver++", ("k_dpmpp_2m",), automatic="karras"),
    "DPM++ SDE": A1111Sampler("dpmsolver_sde", ("k_dpmpp_sde",), automatic="karras", eta="noise"),
    "DPM++ 2M SDE": A1111Sampler(
        "dpmsolver++_sde", ("k_dpmpp_2m_sde",), automatic="exponential", eta="noise"
    ),
    "DPM++ 2S a": A1111Sampler("dpmsolver++_2s", ("k_dpmpp_2s_a",), eta="noise"),
    "Euler a": A1111Sampler("euler_ancestral", ("k_euler_a",), eta="noise"),
    "Euler": A1111Sampler("euler", ("k_euler",)),
    "LMS": A1111Sampler("lms", ("k_lms",)),
    "Heun": A1111Sampler("heun", ("k_heun",)),
    "DPM2": A1111Sampler("dpm2", ("k_dpm_2",)),
    "DPM2 a": A1111Sampler("dpm2_ancestral", ("k_dpm_2_a",), eta="noise"),
    "DDIM": A1111Sampler("ddim", ("ddim",), eta="ddim"),
    "PLMS": A1111Sampler("pndm", ("plms",)),
    "UniPC": A1111Sampler("unipc", ("unipc",)),
    "LCM": A1111Sampler("lcm", ("k_lcm",), eta="noise"),
}
SAMPLER_OF_SCHEDULER = {sampler.scheduler: name for name, sampler in SAMPLERS.items()}
AUTOMATIC = "Automatic"  # A1111's schedule "as the sampler chooses" (``A1111Sampler.automatic``)
# A1111's schedules: name -> (label, this server's schedule: None for the scheduler's own spacing).
# "uniform" and "normal" are two spacings of the same sigmas in A1111; diffusers has one, the
# model's config ("leading" or "linspace"), which both name here.
SCHEDULES: dict[str, tuple[str, str | None]] = {
    "automatic": (AUTOMATIC, None),
    "uniform": ("Uniform", None),
    "normal": ("Normal", None),
    "karras": ("Karras", "karras"),
    "exponential": ("Exponential", "exponential"),
}
SCHEDULE_SEPARATOR = ":"  # model/schedulers.py's: "dpmsolver++:karras"


def _schedule_key(text: str) -> str | None:
    wanted = text.strip().lower()
    return next((key for key, (label, _) in SCHEDULES.items() if wanted in (key, label.lower())), None)


def split_sampler(text: str) -> tuple[str, str | None] | None:
    """An A1111 sampler name or alias (any case), optionally with a schedule after it (the legacy
    combined names: "DPM++ 2M Karras") -> (the sampler's name, the schedule's key or None); None
    when it names no sampler."""
    wanted = " ".join(text.split()).lower()
    for name, sampler in SAMPLERS.items():
        if wanted in (name.lower(), sampler.scheduler, *sampler.aliases):
            return name, None
    head, _, tail = wanted.rpartition(" ")
    schedule = _schedule_key(tail) if head else None
    if schedule is not None:
        found = split_sampler(head)
        if found is not None and found[1] is None:
            return found[0], schedule
    return None


def scheduler_for(sampler: str, schedule: str | None) -> str:
    """This server's scheduler name for an A1111 sampler (a ``SAMPLERS`` key) and schedule key
    (None or "automatic": the sampler's default)."""
    entry = SAMPLERS[sampler]
    flag = entry.automatic if schedule in (None, "automatic") else SCHEDULES[schedule][1]
    return entry.scheduler + (SCHEDULE_SEPARATOR + flag if flag else "")


def resolve(sampler: str | None, schedule: str | None) -> str | None:
    """A1111's ``sampler_name`` and ``scheduler`` -> this server's scheduler name; a schedule in the
    sampler's name wins, as in A1111. Raises ValueError saying which of the two is unknown."""
    key = None
    if schedule:
        key = _schedule_key(schedule)
        if key is None:
            raise ValueError("scheduler")
    if not sampler:
        return None
    found = split_sampler(sampler)
    if found is None:
        raise ValueError("sampler_name")
    name, named = found
    return scheduler_for(name, named or key)


def engine_scheduler(text: str) -> str:
    """A ``scheduler`` field of /score, OpenAI's or Hugging Face's routes: this server's own name
    as given, or an A1111 sampler name ("DPM++ 2M Karras") turned into it."""
    if SCHEDULE_SEPARATOR in text or text in SAMPLER_OF_SCHEDULER:  # already this server's name
        return text
    found = split_sampler(text)
    return scheduler_for(*found) if found is not None else text


def sampler_rule() -> str:
    return f"must be one of: {', '.join(SAMPLERS)} (GET /sdapi/v1/samplers)"


def schedule_rule() -> str:
    labels = ", ".join(label for label, _ in SCHEDULES.values())
    return f"must be one of: {labels} (GET /sdapi/v1/schedulers)"
