"""The LoRA adapters of a device's models, as one manager for the step loop (model/adapters/manager.py
is one model's): an adapter belongs to a model, so each name the scheduler places is an adapter on
one model, "style (model two)". Every model checks SD_ADAPTERS' files against its own UNet and text
encoder when it loads: one that does not fit that model is broken there (its images get 422), and
fits the others still.

A file is read in the background whatever model is on the device (reading does not touch a model);
at a step boundary the read is injected into its model's engine, which the scheduler has put on the
device first (service/runtime/batching: models, then adapters).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from model.adapters.files import AdapterFile, read_adapter
from model.engine import Engine


class ModelAdapters:
    def __init__(
        self, default: Engine, resident: Mapping[str, Engine], on_default: Callable[[], str]
    ) -> None:
        """``default``: the default model's engine (its manager found SD_ADAPTERS' files);
        ``resident``: the device's engines by model, live; ``on_default``: the default's name."""
        self._files = default.adapters  # every adapter's file, and the cap, are the server's
        self._resident = resident
        self._default = on_default
        self._pairs: dict[str, tuple[str, str]] = {}  # placed name -> (model, adapter)
        self._lock = threading.RLock()
        self._reader: ThreadPoolExecutor | None = None
        self._reads: dict[str, Future[AdapterFile]] = {}  # placed name -> its file, reading or read

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters of SD_ADAPTERS that fit the default model (what /info lists)."""
        names: tuple[str, ...] = self._files.names
        return names

    @property
    def max_resident(self) -> int:
        cap: int = self._files.max_resident
        return cap

    def placed_name(self, model: str, adapter: str) -> str:
        """The name the scheduler places for ``adapter`` on ``model``."""
        name = f"{adapter} (model {model})"
        with self._lock:
            self._pairs.setdefault(name, (model, adapter))
        return name

    def _pair(self, name: str) -> tuple[str, str]:
        with self._lock:
            return self._pairs.get(name, (self._default(), name))

    def start_read(self, name: str) -> Future[AdapterFile]:
        """Read ``name``'s file in the background, whether its model is on the device or not."""
        _, adapter = self._pair(name)
        path = self._files.served.get(adapter)
        with self._lock:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="adapter-read")
            if name in self._reads:
                return self._reads[name]
            if path is None:  # not one of SD_ADAPTERS' files: placing it says so
                future: Future[AdapterFile] = Future()
                future.set_exception(KeyError(adapter))
            else:
                future = self._reader.submit(read_adapter, path)
            self._reads[name] = future
            return future

    def place(self, evict: Collection[str], install: Collection[str]) -> dict[str, str]:
        """Engine thread, at a step boundary: each model's adapters off, then on, through its own
        manager (with the files ``start_read`` read). Returns those that failed, with why."""
        failed: dict[str, str] = {}
        by_model: dict[str, tuple[list[str], list[str]]] = {}
        for names, slot in ((evict, 0), (install, 1)):
            for name in names:
                model, adapter = self._pair(name)
                by_model.setdefault(model, ([], []))[slot].append(adapter)
        for model, (out, into) in by_model.items():
            engine = self._resident.get(model)
            if engine is None:  # gone with its model (out), or its model is not here (in)
                failed |= {self.placed_name(model, a): f"model {model} is not on the device" for a in into}
                continue
            manager = engine.adapters
            ready = []
            for adapter in into:
                if adapter in manager.broken or adapter not in manager.served:
                    why = manager.broken.get(adapter, "it is not one of this server's adapters (SD_ADAPTERS)")
                    failed[self.placed_name(model, adapter)] = why
                    continue
                placed = self.placed_name(model, adapter)
                with self._lock:
                    future = self._reads.pop(placed, None)
                if future is not None:
                    manager.take_read(adapter, future)
                ready.append(adapter)
            problems = manager.place([a for a in out if a in manager.resident], ready)
            failed |= {self.placed_name(model, adapter): why for adapter, why in problems.items()}
        return failed

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
