"""Schedulers offered by name. Each is built from the model's own scheduler config, as diffusers users do."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from model.errors import InvalidRequestError
from model.types import DEFAULT_SCHEDULER

SCHEDULER_CLASSES: dict[str, type[SchedulerMixin]] = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


def offered_schedulers() -> tuple[str, ...]:
    return (DEFAULT_SCHEDULER, *SCHEDULER_CLASSES)


def check_scheduler_name(name: str) -> None:
    if name != DEFAULT_SCHEDULER and name not in SCHEDULER_CLASSES:
        raise InvalidRequestError(
            f"unknown scheduler {name!r}; valid schedulers: {', '.join(offered_schedulers())}"
        )


def make_scheduler(model_scheduler: Any, name: str) -> Any:
    """A fresh scheduler (they hold per-run state) for ``name``, from the model's own config."""
    check_scheduler_name(name)
    if name == DEFAULT_SCHEDULER:
        return type(model_scheduler).from_config(model_scheduler.config)
    return SCHEDULER_CLASSES[name].from_config(model_scheduler.config)


def scheduler_name(scheduler: Any) -> str:
    """The offered name of a scheduler object (the model's own one), or "default" if not offered."""
    return next(
        (name for name, cls in SCHEDULER_CLASSES.items() if type(scheduler) is cls), DEFAULT_SCHEDULER
    )
