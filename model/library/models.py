"""Several models on one device behind the one engine protocol: each image names its model
(``GenerationItem.model``; None: the default one), and every engine call is routed to the engine of
that model, so one step advances every model's images (one UNet call per model and group).

Which models are on the device is decided elsewhere (the step loop's scheduler, with the policy of
model/adapters/policy.py: at most ``cap``, least recently used out, never one with running images):
``start_load`` reads a model in the background (from the host cache when it was evicted recently,
else from disk) while the others keep stepping, and ``place`` swaps models in and out at a step
boundary, in the engine's thread. A caller without a scheduler (a batch job, ``generate``) gets the
model loaded on first use, synchronously (``admit_all``).

Evicted models stay in host memory up to ``host_cache_bytes`` (least recently evicted out), so a
switch back is a copy to the device, not a read from disk. Components equal between models (the
same VAE, text encoder or safety checker, by content) are loaded once (shared.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from model.engine import Engine
from model.errors import EngineFailure, InvalidRequestError, ModelLoadError
from model.library.adapters import ModelAdapters
from model.library.parts import Loaded, Shell, by_model
from model.library.shared import SHAREABLE, SharedComponents, size_of
from model.loading import READING
from model.types import GenerationItem, GenerationResult, ModelInfo

log = logging.getLogger(__name__)

# A model's loader: given the hook that shares components (called on the CPU, before the device),
# returns the model's engine on this device.
# What a caller whose model did not load can do (the step loop's refusals say the same).
FIX = "fix its files or choose another model (GET /v1/models)"
Loader = Callable[[Callable[[Any], None]], Engine]


class ModelSet:
    """The models of one device: ``resident`` ones serve; the others load on demand."""

    def __init__(
        self,
        default: str,
        loaders: Mapping[str, Loader],
        first: Engine,
        *,
        cap: int = 1,
        host_cache_bytes: int = 0,
        share_parts: tuple[str, ...] = SHAREABLE,
        events: Callable[[str, str, float], None] | None = None,
    ) -> None:
        """``first``: the default model, loaded already; ``cap``: the models on the device at once
        for callers without a scheduler (``ensure``); ``share_parts``: the components that may be
        shared (none that an optimisation rewrites in place, nor a text encoder with LoRA layers);
        ``events(kind, model, value)`` hears of
        loads ("load_disk", "load_host": seconds) and evictions ("evict": bytes freed)."""
        self.default = default
        self.loaders = dict(loaders)
        self.resident: OrderedDict[str, Engine] = OrderedDict({default: first})
        self._files = first.adapters  # SD_ADAPTERS' files, as the default model found them
        self._adapters = ModelAdapters(first, self.resident, lambda: self.default)
        self._info = first.info
        self._shell = Shell(first)  # checks items while no model is on the device
        self.shared = SharedComponents()
        self.cap = max(1, cap)
        self.host_cache_bytes = host_cache_bytes
        self.share_parts = share_parts
        self._host: OrderedDict[str, tuple[Engine, int]] = OrderedDict()  # evicted, kept in host memory
        self._loads: dict[str, Future[Loaded]] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-load")
        self._lock = threading.Lock()  # the host cache: the loader thread takes from it
        self._handles = itertools.count(1)
        self._owners: dict[int, tuple[str, int]] = {}  # our handle -> (model, its engine's handle)
        self.failed: dict[str, str] = {}  # models whose last load failed, with why
        self.events = events or (lambda kind, model, value: None)
        self.shared.share(default, first.components, share_parts)

    # ------------------------------------------------------------------ description
    @property
    def info(self) -> ModelInfo:
        """The default model's, also while it is off the device (as it was when it last was)."""
        engine = self.resident.get(self.default)
        if engine is not None:
            self._info = engine.info
        return self._info

    @property
    def adapters(self) -> ModelAdapters:
        """The LoRA adapters of every model of the device, as the step loop places them (each an
        adapter on one model: model/library/adapters.py)."""
        return self._adapters

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.loaders)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes each resident model holds on the device (a shared component counted for each)."""
        return {name: size_of(_networks(engine)) for name, engine in self.resident.items()}

    def _default_engine(self) -> Engine:
        engine = self.resident.get(self.default)
        if engine is None:
            raise EngineFailure(f"the default model {self.default} is not on the device")
        return engine

    def _name(self, item: GenerationItem) -> str:
        return item.model or self.default

    def _engine_of(self, item: GenerationItem) -> Engine:
        name = self._name(item)
        if name not in self.loaders:
            raise InvalidRequestError(f"no model {name!r} here; the models: {', '.join(self.loaders)}")
        engine = self.resident.get(name)
        if engine is None and name in self.failed:
            raise ModelLoadError(f"model {name} could not be loaded: {self.failed[name]}; {FIX}")
        if engine is None:
            raise EngineFailure(f"model {name} is not on the device yet")
        self.resident.move_to_end(name)
        return engine

    # ------------------------------------------------------------------ validation
    def validate(self, items: Sequence[GenerationItem]) -> None:
        """``Engine.validate``'s rules for one batch, each item checked by ``validate_item``."""
        Engine.validate(self, items)  # type: ignore[arg-type]

    def validate_item(self, item: GenerationItem) -> None:
        """An item's values, by its model's engine when it is on the device; else by the default's
        (what differs between models of one family: nothing an item can get wrong), its adapters
        only by name and scale: whether one fits that model is known once it loads (an adapter that
        does not fit is refused then, with 422, naming the model)."""
        name = self._name(item)
        checker = self._checker(name)
        if item.adapters and name not in self.resident:
            self._files.check(item.adapters, another_model=True)
            item = dataclasses.replace(item, adapters=())
        checker.validate_item(item)

    def _checker(self, name: str) -> Engine:
        """The engine that checks an item of ``name``: its own when resident, else the default one
        (what differs between the models, an inpainting UNet say, the caller checks from the
        catalog; what an engine checks, steps, sizes, seeds and schedulers, is the same for all)."""
        if name not in self.loaders:
            raise InvalidRequestError(f"no model {name!r} here; the models: {', '.join(self.loaders)}")
        return self.resident.get(name) or self.resident.get(self.default) or self._shell  # type: ignore[return-value]

    # ------------------------------------------------------------------ residency
    def start_load(self, name: str) -> Future[Loaded]:
        """Read ``name`` in the background (host cache first, else its loader); the result waits
        for ``place``. A second call while one runs returns the same future."""
        with self._lock:
            if name in self._loads:
                return self._loads[name]
            future = self._loader.submit(self._load, name)
            self._loads[name] = future
            return future

    def _load(self, name: str) -> Loaded:
        started = time.perf_counter()
        with self._lock:
            cached = self._host.pop(name, None)
        if cached is not None:
            engine = cached[0]
            engine.components.to(engine.device)
            return Loaded(engine, None, time.perf_counter() - started, "host")
        try:
            engine = self.loaders[name](lambda components: self._share(name, components))
        except Exception as error:
            self.shared.release(name)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            log.error("model %s could not be loaded: %s", name, reason)
            return Loaded(None, reason, time.perf_counter() - started, "disk")
        return Loaded(engine, None, time.perf_counter() - started, "disk")

    def _share(self, name: str, components: Any) -> None:
        taken = self.shared.share(name, components, self.share_parts)
        if taken:
            log.info("model %s shares its %s with a model already loaded", name, ", ".join(taken))

    def place(self, evict: Iterable[str], install: Iterable[str]) -> dict[str, str]:
        """At a step boundary, in the engine's thread: ``evict`` off the device (into the host cache
        while it has room), then ``install`` the loads that finished (waiting for each). Returns the
        models that could not be installed, with why. Never raises."""
        failures: dict[str, str] = {}
        for name in evict:
            try:
                self._evict(name)
            except Exception:  # it stays on the device; the step loop goes on
                log.exception("model %s could not leave the device", name)
        for name in install:
            if name in self.resident:
                continue
            try:
                loaded = self.start_load(name).result()
            except Exception as error:  # the loader itself broke
                loaded = Loaded(None, f"{type(error).__name__}: {error}", 0.0, "disk")
            with self._lock:
                self._loads.pop(name, None)
            if loaded.engine is None:
                failures[name] = self.failed[name] = loaded.error or "it could not be loaded"
                continue
            self.failed.pop(name, None)
            self.resident[name] = loaded.engine
            self.events(f"load_{loaded.source}", name, loaded.seconds)
            log.info("model %s on the device (from %s, %.2f s)", name, loaded.source, loaded.seconds)
        return failures

    def _evict(self, name: str) -> None:
        engine = self.resident.pop(name, None)
        if engine is None:
            return
        if any(owner == name for owner, _ in self._owners.values()):
            raise EngineFailure(f"model {name} still has images running; it cannot leave the device")
        own = [m for m in _networks(engine) if not self.shared.others_use(name, m, self.resident)]
        freed = size_of(own)
        self.events("evict", name, float(freed))
        if freed > self.host_cache_bytes:
            self._drop(name, engine)
            return
        for module in own:  # to host memory; shared ones stay where the others use them
            module.to("cpu")
        with self._lock:
            self._host[name] = (engine, freed)
            while sum(size for _, size in self._host.values()) > self.host_cache_bytes:
                old, (dropped, _) = self._host.popitem(last=False)
                self._drop(old, dropped)
        log.info("model %s off the device (kept in host memory: %d MiB)", name, freed >> 20)

    def _drop(self, name: str, engine: Engine) -> None:
        self.shared.release(name)
        engine.close()
        log.info("model %s off the device and out of memory", name)

    def ensure(self, names: Iterable[str]) -> None:
        """Synchronously: ``names`` on the device (for callers without a scheduler), evicting the
        least recently used models with no running images beyond ``len(resident)``'s bound."""
        for name in dict.fromkeys(names):
            if name in self.resident:
                continue
            if name not in self.loaders:
                raise InvalidRequestError(f"no model {name!r} here; the models: {', '.join(self.loaders)}")
            room = len(self.resident) + 1 - self.cap
            failures = self.place(self.evictable({name})[: max(room, 0)], [name])
            if failures:
                raise ModelLoadError(f"model {name} could not be loaded: {failures[name]}; {FIX}")

    def evictable(self, keep: Collection[str]) -> list[str]:
        """Resident models with no running image and not in ``keep``, least recently used first."""
        busy = {owner for owner, _ in self._owners.values()}
        return [name for name in self.resident if name not in busy and name not in keep]

    # ------------------------------------------------------------------ step by step
    def admit(self, item: GenerationItem) -> int:
        return self.admit_all([item])[0]

    def admit_all(self, items: Sequence[GenerationItem]) -> list[int]:
        self.ensure(self._name(item) for item in items)
        return self._admit(items, checked=False)

    def admit_checked(self, items: Sequence[GenerationItem]) -> list[int]:
        return self._admit(items, checked=True)

    def _admit(self, items: Sequence[GenerationItem], checked: bool) -> list[int]:
        """Each model's items admitted together by its engine; all or none."""
        handles: dict[int, int] = {}
        done: list[tuple[Engine, list[int]]] = []
        try:
            for name, group in by_model(items, self.default, indexed=True):
                engine = self._engine_of(group[0][1])
                inner = (engine.admit_checked if checked else engine.admit_all)([item for _, item in group])
                done.append((engine, inner))
                for (index, _), handle in zip(group, inner, strict=True):
                    ours = next(self._handles)
                    self._owners[ours] = (name, handle)
                    handles[index] = ours
        except Exception:
            for engine, inner in done:
                for handle in inner:
                    engine.cancel(handle)
            for ours in handles.values():
                self._owners.pop(ours, None)
            raise
        return [handles[index] for index in range(len(items))]

    def step(self, only: Collection[int] | None = None) -> list[int]:
        """One step of every model's running images (or of ``only``): one engine call per model."""
        finished: list[int] = []
        for name, engine in list(self.resident.items()):
            theirs = {h: ours for ours, (n, h) in self._owners.items() if n == name}
            if only is not None:
                theirs = {h: ours for h, ours in theirs.items() if ours in only}
            if not theirs:
                continue
            done = engine.step(None if only is None else set(theirs))
            finished += [theirs[h] for h in done if h in theirs]
        return finished

    def retire(self, handles: Sequence[int]) -> list[GenerationResult]:
        for ours in handles:
            if ours not in self._owners:
                raise ValueError(f"no item with handle {ours}")
        results: dict[int, GenerationResult] = {}
        groups: dict[str, list[int]] = {}
        for ours in handles:
            groups.setdefault(self._owners[ours][0], []).append(ours)
        for name, group in groups.items():
            engine = self.resident[name]
            for ours, result in zip(group, engine.retire([self._owners[o][1] for o in group]), strict=True):
                results[ours] = result
                del self._owners[ours]
        return [results[ours] for ours in handles]

    def owner(self, handle: int) -> tuple[Engine, int]:
        """The engine that holds ``handle`` and its own handle there."""
        name, inner = self._owners[handle]
        return self.resident[name], inner

    def cancel(self, handle: int) -> None:
        owner = self._owners.pop(handle, None)
        if owner is not None and owner[0] in self.resident:
            self.resident[owner[0]].cancel(owner[1])

    def finish(self, handle: int) -> None:
        owner = self._owners.get(handle)
        if owner is not None:
            self.resident[owner[0]].finish(owner[1])

    def preview(self, handle: int) -> np.ndarray:
        owner = self._owners.get(handle)
        if owner is None:
            raise ValueError(f"no item with handle {handle}")
        return self.resident[owner[0]].preview(owner[1])

    def place_adapters(self, evict: Sequence[str], install: Sequence[str]) -> dict[str, str]:
        # peft makes parameters as it injects: never while a background load has nn.Module patched
        # process-wide (accelerate's empty weights: model/loading's READING says why)
        with READING:
            try:
                return self._adapters.place(evict, install)
            except Exception as error:  # the step loop must go on for the other images
                log.exception("putting LoRA adapters on the device failed")
                return dict.fromkeys(install, f"it could not be put on the device ({type(error).__name__})")

    def install_adapters(self, wait: float = 0.0) -> None:
        for engine in list(self.resident.values()):
            engine.install_adapters(wait)

    # ------------------------------------------------------------------ whole batches
    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        results: dict[int, GenerationResult] = {}
        for name, group in by_model(items, self.default, indexed=True):
            self.ensure([name])
            drawn = self.resident[name].generate([item for _, item in group])
            for (index, _), result in zip(group, drawn, strict=True):
                results[index] = result
        return [results[index] for index in range(len(items))]

    def warmup(self) -> None:
        self._default_engine().warmup()

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._adapters.close()
        for engine in [*self.resident.values(), *(engine for engine, _ in self._host.values())]:
            engine.close()
        self.resident.clear()
        self._host.clear()


def _networks(engine: Engine) -> list[Any]:
    c = engine.components
    return [m for m in (c.unet, c.vae, c.text_encoder, c.safety_checker) if m is not None]
