"""LoRA adapters (SD_ADAPTERS): files checked at start-up (files.py), which live on the device
(policy.py), and the engine's adapters, loaded on first use and switched per group of rows
(manager.py)."""

from model.adapters.files import DIFFUSERS_FILE, NAME, find_adapters
from model.adapters.manager import DEFAULT_MAX_RESIDENT, Adapters
from model.adapters.policy import Plan, Residency

__all__ = ["DEFAULT_MAX_RESIDENT", "DIFFUSERS_FILE", "NAME", "Adapters", "Plan", "Residency", "find_adapters"]
