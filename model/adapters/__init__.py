"""LoRA adapters (SD_ADAPTERS): files checked at start-up (files.py), which live on the device
(policy.py), and the engine's adapters, loaded on first use and switched per group of rows
(manager.py).

Importing the package is light (no torch): the step loop's scheduler keeps each device's residency
with policy.py alone; files.py and manager.py are imported on first use of their names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model.adapters.policy import Plan, Residency

if TYPE_CHECKING:
    from model.adapters.files import DIFFUSERS_FILE, NAME, find_adapters
    from model.adapters.manager import DEFAULT_MAX_RESIDENT, Adapters

__all__ = ["DEFAULT_MAX_RESIDENT", "DIFFUSERS_FILE", "NAME", "Adapters", "Plan", "Residency", "find_adapters"]


def __getattr__(name: str) -> Any:
    if name in ("DIFFUSERS_FILE", "NAME", "find_adapters"):
        from model.adapters import files

        return getattr(files, name)
    if name in ("DEFAULT_MAX_RESIDENT", "Adapters"):
        from model.adapters import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'model.adapters' has no attribute {name!r}")
