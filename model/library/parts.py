"""The pieces of a ModelSet (models.py) that are not its policy: a finished background load, the
stand-in that checks items while no model is on the device, and items grouped by model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from model.engine import Engine
from model.types import GenerationItem


@dataclass
class Loaded:
    """A finished background load: the engine, or why there is none; and where it came from."""

    engine: Engine | None
    error: str | None
    seconds: float
    source: str  # "disk" or "host"


class Shell:
    """What ``Engine.validate_item`` reads of an engine (its scheduler, its text encoder's depth, its
    adapters), kept from the default model so that items are checked while no model is on the
    device (its last one evicted, the next one failed to load)."""

    def __init__(self, engine: Engine) -> None:
        c = engine.components
        self.components = SimpleNamespace(
            scheduler=c.scheduler, text_encoder=SimpleNamespace(config=c.text_encoder.config)
        )
        self.adapters = engine.adapters

    def validate_item(self, item: GenerationItem) -> None:
        Engine.validate_item(self, item)  # type: ignore[arg-type]

    def validate(self, items: Sequence[GenerationItem]) -> None:
        Engine.validate(self, items)  # type: ignore[arg-type]


def by_model(items: Sequence[GenerationItem], default: str, indexed: bool = False) -> list[tuple[str, Any]]:
    """``items`` grouped by model, in order of first appearance (with their indexes when asked)."""
    groups: dict[str, list[Any]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item.model or default, []).append((index, item) if indexed else item)
    return list(groups.items())
