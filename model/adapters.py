"""LoRA adapters on one engine: read from a folder at start-up, switched per group of rows.

Every adapter is loaded through diffusers' own ``load_lora_weights`` (its diffusers and kohya/A1111
converters, peft layers in the UNet and the text encoder) and activated with ``set_adapters``, so an
image gets exactly what a diffusers user gets with the same adapters and scales. The engine groups
rows by adapter set (one text-encoder call per set at admission, one UNet call per size and set
at each step) and calls ``activate`` before each group; switching only happens when the set changes.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from model.errors import InvalidRequestError, ModelLoadError
from model.types import MAX_ADAPTER_SCALE, MAX_ADAPTERS_PER_ITEM, AdapterSet

log = logging.getLogger(__name__)

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
SUFFIX = ".safetensors"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def find_adapters(directory: Path) -> dict[str, Path]:
    """Each entry of ``directory`` that looks like an adapter: a folder holding diffusers' LoRA file
    (named after the folder) or a ``NAME.safetensors`` file (named after its stem), by name."""
    if not directory.is_dir():
        raise ModelLoadError(
            f"SD_ADAPTERS={directory} is not a folder; point it at a folder of LoRA adapters"
        )
    found: dict[str, Path] = {}
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and (entry / DIFFUSERS_FILE).is_file():
            found[entry.name] = entry / DIFFUSERS_FILE
        elif entry.is_file() and entry.suffix == SUFFIX:
            found[entry.stem] = entry
    return found


class Adapters:
    """The adapters of one engine: those that load (``names``), those that did not (``broken``,
    with the reason), and the set active in the UNet and text encoder now."""

    def __init__(self, components: Any) -> None:
        self._components = components
        self._pipe: Any = None
        self.loaded: dict[str, Path] = {}
        self.broken: dict[str, str] = {}
        self._active: AdapterSet | None = ()  # None: unknown, set on the next activate

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.loaded)

    # ------------------------------------------------------------------ start-up
    def load_folder(self, directory: Path) -> None:
        """Load every adapter of ``directory``; one that does not fit the model is named in one
        log line and left out, and the others serve."""
        for name, path in find_adapters(directory).items():
            reason = self._load(name, path)
            if reason is None:
                self.loaded[name] = path
            else:
                self.broken[name] = reason
                log.error("adapter %s left out: %s", name, reason)
        if self.loaded:
            log.info("adapters: %s", ", ".join(self.loaded))
        self._active = None  # loading leaves the last adapter active in peft's layers
        self.activate(())

    def _load(self, name: str, path: Path) -> str | None:
        """Load one adapter into the UNet and text encoder; the reason it cannot serve, or None."""
        # 1. A name requests can carry.
        if not NAME.fullmatch(name):
            return "its name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        # 2. diffusers' loader: its converters, and peft's checks of every tensor's shape.
        pipe = self._pipeline()
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except Exception as error:  # any failure leaves the adapter out, never the server
            self._forget(name)
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return f"{path.name} does not fit this model ({first[:300]})"
        # 3. Something of it must have landed: a file of another model's names loads nothing.
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            self._forget(name)
            return f"{path.name} holds no LoRA layer of this model's UNet or text encoder"
        return None

    def _forget(self, name: str) -> None:
        try:
            self._pipeline().delete_adapters([name])
        except Exception:  # nothing of it was injected
            log.debug("adapter %s had nothing to delete", name)

    def _pipeline(self) -> Any:
        """A pipeline around the engine's own modules: only its LoRA methods are used."""
        if self._pipe is None:
            from diffusers import StableDiffusionPipeline

            modules = self._components.modules()
            self._pipe = StableDiffusionPipeline(**modules, requires_safety_checker=False)
        return self._pipe

    # ------------------------------------------------------------------ requests
    def check(self, adapters: AdapterSet) -> None:
        """InvalidRequestError unless every name serves and every scale is in range."""
        if not isinstance(adapters, tuple) or len(adapters) > MAX_ADAPTERS_PER_ITEM:
            raise InvalidRequestError(f"give at most {MAX_ADAPTERS_PER_ITEM} adapters per image")
        for name, scale in adapters:
            if name in self.broken:
                raise InvalidRequestError(f"adapter {name} could not be loaded: {self.broken[name]}")
            if name not in self.loaded:
                served = ", ".join(self.loaded) or "none on this server"
                raise InvalidRequestError(f"unknown adapter {name[:64]!r}; GET /info lists them: {served}")
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
                raise InvalidRequestError(f"adapter {name}'s scale must be a finite number")
            if abs(scale) > MAX_ADAPTER_SCALE:
                raise InvalidRequestError(
                    f"adapter {name}'s scale must be from {-MAX_ADAPTER_SCALE} to {MAX_ADAPTER_SCALE}"
                )

    def activate(self, adapters: AdapterSet) -> None:
        """Make ``adapters`` (name, scale pairs) the active set of the UNet and text encoder."""
        if adapters == self._active or not self.loaded:
            return
        pipe = self._pipeline()
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in adapters], adapter_weights=[float(s) for _, s in adapters])
        else:
            pipe.disable_lora()
        self._active = adapters
