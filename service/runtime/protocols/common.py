"""What every protocol's mapping shares: the error that names a request field, and the one check of
a scheduler's name, which only the model knows."""

from __future__ import annotations

from model.types import ModelInfo
from schemas.samplers import engine_scheduler
from service.runtime.errors import ContractError


class FieldError(ContractError):
    """Off the contract at one top-level field of the body, which OpenAI's error shape names as ``param``."""

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def check_scheduler(scheduler: str | None, info: ModelInfo, where: str) -> str | None:
    """The one check of a request's scheduler: the names are the model's (GET /info), or an
    A1111 sampler name for one of them ("DPM++ 2M Karras"), which schemas/ cannot know; the
    message names the field without repeating the client's text. Returns the engine's name."""
    name = engine_scheduler(scheduler) if scheduler is not None else None
    if name is not None and name not in info.schedulers:
        param = where.rpartition(".")[2]
        raise FieldError(
            f"{where} must be one of: {', '.join(info.schedulers)}, or an AUTOMATIC1111 sampler name "
            '(GET /sdapi/v1/samplers, optionally followed by a schedule: "DPM++ 2M Karras")',
            param=param,
        )
    return name
