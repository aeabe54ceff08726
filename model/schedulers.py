"""Schedulers offered by name. Each is built from the model's own scheduler config, as diffusers users do.

A name is a sampler, optionally followed by a sigma schedule: ``"dpmsolver++"`` (the model's own
spacing) or ``"dpmsolver++:karras"``. Each sampler is one diffusers scheduler class with the
options that make it the sampler AUTOMATIC1111 names (schemas/samplers.py holds that table), and
each schedule is the config flag diffusers documents for it; a schedule is offered only with the
classes that take its flag. A request's scheduler is therefore exactly what a diffusers user gets
with ``Class.from_config(pipe.scheduler.config, **options)``: the tests build it that way by hand.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from model.errors import InvalidRequestError
from model.types import DEFAULT_SCHEDULER

SCHEDULE_SEPARATOR = ":"


@dataclass(frozen=True)
class Sampler:
    """One diffusers scheduler class and the options that make it the named sampler.

    ``seeded``: the class draws its noise from a seed of its config, not from the generator passed
    to step() (DPMSolverSDEScheduler's Brownian tree): the item's seed goes there, so that the
    same seed gives the same image. ``needs``: a module the class imports when it is built."""

    cls: type[SchedulerMixin]
    options: dict[str, Any] = field(default_factory=dict)
    seeded: bool = False
    needs: str | None = None


SAMPLERS: dict[str, Sampler] = {
    "pndm": Sampler(PNDMScheduler),
    "ddim": Sampler(DDIMScheduler),
    "euler": Sampler(EulerDiscreteScheduler),
    "euler_ancestral": Sampler(EulerAncestralDiscreteScheduler),
    "lms": Sampler(LMSDiscreteScheduler, needs="scipy"),
    "heun": Sampler(HeunDiscreteScheduler),
    "dpm2": Sampler(KDPM2DiscreteScheduler),
    "dpm2_ancestral": Sampler(KDPM2AncestralDiscreteScheduler),
    "dpmsolver++": Sampler(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmsolver++_sde": Sampler(
        DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
    ),
    # diffusers has no ancestral single-step solver; its stochastic second-order one is the closest.
    "dpmsolver++_2s": Sampler(
        DPMSolverSinglestepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
    ),
    "dpmsolver_sde": Sampler(DPMSolverSDEScheduler, seeded=True, needs="torchsde"),
    "unipc": Sampler(UniPCMultistepScheduler),
    "lcm": Sampler(LCMScheduler),
}
# Schedules: the config flag diffusers documents for each of AUTOMATIC1111's sigma schedules.
SCHEDULES: dict[str, dict[str, Any]] = {
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
}
# Kept for callers that list the classes: every offered sampler's class by name.
SCHEDULER_CLASSES: dict[str, type[SchedulerMixin]] = {name: each.cls for name, each in SAMPLERS.items()}


def _available(sampler: Sampler) -> bool:
    return sampler.needs is None or importlib.util.find_spec(sampler.needs) is not None


def _takes(cls: type[SchedulerMixin], options: dict[str, Any]) -> bool:
    return set(options) <= set(inspect.signature(cls.__init__).parameters)


def offered_schedulers() -> tuple[str, ...]:
    """Every name a request may give: the model's own, each sampler, each with the schedules its
    class takes. A sampler whose optional module is not installed is left out."""
    names = [DEFAULT_SCHEDULER]
    for name, sampler in SAMPLERS.items():
        if not _available(sampler):
            continue
        names.append(name)
        names += [
            f"{name}{SCHEDULE_SEPARATOR}{schedule}"
            for schedule, flags in SCHEDULES.items()
            if _takes(sampler.cls, flags)
        ]
    return tuple(names)


def check_scheduler_name(name: str) -> None:
    if name not in offered_schedulers():
        raise InvalidRequestError(
            f"unknown scheduler {name!r}; valid schedulers: {', '.join(offered_schedulers())}"
        )


def scheduler_options(name: str, seed: int = 0) -> tuple[type[SchedulerMixin], dict[str, Any]]:
    """The diffusers class of an offered sampler name and the options it is built with from the
    model's config (``seed``: the item's, for the classes that draw noise from their config)."""
    sampler_name, _, schedule = name.partition(SCHEDULE_SEPARATOR)
    sampler = SAMPLERS[sampler_name]
    options = {**sampler.options, **(SCHEDULES[schedule] if schedule else {})}
    if sampler.seeded:
        options["noise_sampler_seed"] = seed
    return sampler.cls, options


def make_scheduler(model_scheduler: Any, name: str, seed: int = 0) -> Any:
    """A fresh scheduler (they hold per-run state) for ``name``, from the model's own config."""
    check_scheduler_name(name)
    if name == DEFAULT_SCHEDULER:
        return type(model_scheduler).from_config(model_scheduler.config)
    cls, options = scheduler_options(name, seed)
    return cls.from_config(model_scheduler.config, **options)


def takes_eta(model_scheduler: Any, name: str) -> bool:
    """Whether the scheduler of ``name`` has an eta (DDIM's): the one whose step() takes it."""
    if name == DEFAULT_SCHEDULER:
        cls = type(model_scheduler)
    else:
        cls = SAMPLERS[name.partition(SCHEDULE_SEPARATOR)[0]].cls
    return "eta" in inspect.signature(cls.step).parameters


def scheduler_name(scheduler: Any) -> str:
    """The offered name of a scheduler object (the model's own one), or "default" if not offered."""
    return next(
        (name for name, sampler in SAMPLERS.items() if type(scheduler) is sampler.cls), DEFAULT_SCHEDULER
    )
