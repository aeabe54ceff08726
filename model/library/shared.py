"""Components that several models of one device share, by content: the same VAE, text encoder or
safety checker in two models (fine-tunes of one base usually change only the UNet) is on the device
once.

A component's digest is a hash of its class, its configuration and every tensor of its state (names,
dtypes, shapes, bytes), taken on the CPU before the model goes to its device, so the same weights
read from a diffusers folder or from a single checkpoint file are one component. The UNet is never
shared: fine-tunes differ there, and hashing several GB at every load would cost more than it saves.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

# The parts worth sharing: small enough to hash at each load, often equal between models.
SHAREABLE = ("vae", "text_encoder", "safety_checker")


def digest(module: Any) -> str:
    """The content hash of a torch module: its class, its config and every tensor of its state."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:  # diffusers' FrozenDict, or a transformers config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        # where it was read from and which library wrote it are not what it computes
        kept = {
            str(k): repr(v)
            for k, v in values.items()
            if not str(k).startswith("_") and k != "transformers_version"
        }
        hasher.update(repr(sorted(kept.items())).encode())
    for name, tensor in module.state_dict().items():
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            hasher.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def size_of(modules: Iterable[Any]) -> int:
    """Bytes of the parameters and buffers of ``modules`` (each counted once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class _Entry:
    module: Any
    owners: set[str] = field(default_factory=set)


class SharedComponents:
    """The shareable components of the models loaded on one device, by digest, with the models that
    use each. Thread-safe: a background load shares while the engine thread evicts."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def share(self, owner: str, components: Any, parts: Iterable[str] = SHAREABLE) -> list[str]:
        """Replace each of ``parts`` of ``components`` (still on the CPU) by the same component
        already loaded for another model, when there is one; register the rest. Returns the parts
        taken from another model."""
        taken = []
        for part in parts:
            module = getattr(components, part, None)
            if module is None:
                continue
            key = f"{part}:{digest(module)}"
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    self._entries[key] = _Entry(module, {owner})
                    continue
                entry.owners.add(owner)
                setattr(components, part, entry.module)
            taken.append(part)
        return taken

    def release(self, owner: str) -> None:
        """``owner`` is gone: the components only it used are forgotten."""
        with self._lock:
            for key in list(self._entries):
                entry = self._entries[key]
                entry.owners.discard(owner)
                if not entry.owners:
                    del self._entries[key]

    def others_use(self, owner: str, module: Any, active: Iterable[str]) -> bool:
        """Whether a model of ``active`` other than ``owner`` uses ``module`` too."""
        others = set(active) - {owner}
        with self._lock:
            return any(entry.module is module and entry.owners & others for entry in self._entries.values())
