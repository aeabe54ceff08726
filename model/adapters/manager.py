"""LoRA adapters of one engine: checked at start-up, put on the device on first use (at most
``max_resident`` at once, least recently used out), switched per group of rows.

An adapter is injected through diffusers' own loaders (``load_lora_into_unet`` /
``load_lora_into_text_encoder``, what ``load_lora_weights`` calls: peft layers in the UNet and the
text encoder) and activated with ``set_adapters``, so an image gets exactly what a diffusers user
gets with the same adapters and scales. The engine groups rows by adapter set and calls
``activate`` before each group; switching only happens when the set changes.

Loading is split so that it never stalls running images: ``request`` starts reading the file in a
background thread (tensors from disk, kohya names converted: the slow part), and
``install_pending``, called by the engine thread at a step boundary, injects what finished reading
and deletes the least recently used adapters that no running image uses (policy.py decides which;
peft changes the module tree, so only the engine thread may). ``ready`` tells the step loop
whether an image's adapters are on the device; the step loop leaves an image waiting until then.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from pathlib import Path
from typing import Any

from model.adapters.files import (
    AdapterFile,
    find_adapters,
    first_line,
    fit_problem,
    read_adapter,
    without_folders,
)
from model.adapters.policy import Names, Residency, names_of
from model.errors import InvalidRequestError
from model.types import MAX_ADAPTER_SCALE, MAX_ADAPTERS_PER_ITEM, AdapterSet

log = logging.getLogger(__name__)

DEFAULT_MAX_RESIDENT = 8  # SD_MAX_ADAPTERS
READ_TIMEOUT_S = 600.0  # what a blocking load (``ensure``) waits for a file at most


class Adapters:
    """The adapters of one engine: those found fit at start-up (``served``; on the device or not),
    those that cannot serve (``broken``, with the reason; it wins over ``served``), and the set
    active in the UNet and text encoder now. ``ready``/``request`` may be called from any thread;
    everything else from the engine's own thread."""

    def __init__(self, components: Any) -> None:
        self._components = components
        self._pipe: Any = None
        self.served: dict[str, Path] = {}
        self.broken: dict[str, str] = {}
        self._residency = Residency(DEFAULT_MAX_RESIDENT)
        self._lock = threading.Lock()  # the residency and the reads: asked from the event loop too
        self._reads: dict[str, Future[AdapterFile]] = {}
        self._reader: ThreadPoolExecutor | None = None
        self._active: AdapterSet | None = ()  # None: unknown, set on the next activate
        self.installed = 0  # injections and evictions so far (logs, tests, benchmarks)
        self.evicted = 0

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters that serve (one that failed to inject since start-up is left out)."""
        return tuple(name for name in self.served if name not in self.broken)

    @property
    def max_resident(self) -> int:
        return self._residency.cap

    @property
    def resident(self) -> tuple[str, ...]:
        """Adapters on the device now, least recently used first."""
        with self._lock:
            return self._residency.resident

    # ------------------------------------------------------------------ start-up
    def load_folder(self, directory: Path, max_resident: int = DEFAULT_MAX_RESIDENT) -> None:
        """Check every adapter of ``directory`` against the model from its file's shapes (nothing
        is put on the device yet); one that does not fit is named in one log line and left out,
        and the others serve."""
        self._residency = Residency(max_resident)
        c = self._components
        for name, path in find_adapters(directory).items():
            reason = fit_problem(name, path, c.unet, c.text_encoder)
            if reason is None:
                self.served[name] = path
            else:
                self.broken[name] = without_folders(reason)  # what clients read: no server paths
                log.error("adapter %s left out: %s", name, reason)
        if self.served:
            log.info(
                "adapters (loaded on first use, at most %d on the device): %s",
                max_resident, ", ".join(self.served),
            )  # fmt: skip

    # ------------------------------------------------------------------ requests
    def check(self, adapters: AdapterSet, *, another_model: bool = False) -> None:
        """InvalidRequestError unless every name serves, every scale is in range and the set fits
        on the device at once. ``another_model``: the image is for another model, not loaded yet,
        which checks the fit itself: an adapter this model does not take may still serve there."""
        if not isinstance(adapters, tuple) or len(adapters) > MAX_ADAPTERS_PER_ITEM:
            raise InvalidRequestError(f"give at most {MAX_ADAPTERS_PER_ITEM} adapters per image")
        for name, scale in adapters:
            if name in self.broken and not another_model:
                raise InvalidRequestError(f"adapter {name} could not be loaded: {self.broken[name]}")
            if name not in self.served and not (another_model and name in self.broken):
                served = ", ".join(self.names) or "none on this server"
                raise InvalidRequestError(f"unknown adapter {name[:64]!r}; GET /info lists them: {served}")
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
                raise InvalidRequestError(f"adapter {name}'s scale must be a finite number")
            if abs(scale) > MAX_ADAPTER_SCALE:
                raise InvalidRequestError(
                    f"adapter {name}'s scale must be from {-MAX_ADAPTER_SCALE} to {MAX_ADAPTER_SCALE}"
                )
        if len(adapters) > self.max_resident:
            raise InvalidRequestError(
                f"this image asks for {len(adapters)} adapters at once but this server keeps at most "
                f"{self.max_resident} on the device (SD_MAX_ADAPTERS); ask for fewer"
            )

    def _names(self, adapters: AdapterSet) -> Names:
        """The adapters of the set that can be put on the device (others: admission refuses them)."""
        return names_of(name for name, _ in adapters if name in self.served and name not in self.broken)

    def ready(self, adapters: AdapterSet) -> bool:
        """Whether an image with ``adapters`` can run now (all on the device, or nothing to wait
        for: admission refuses unknown or broken ones)."""
        names = self._names(adapters)
        if not names:
            return True
        with self._lock:
            return self._residency.ready(names)

    def request(self, adapters: AdapterSet) -> None:
        """Start reading what ``adapters`` lacks on the device, in the background; non-blocking.
        Ask again (``ready``/``request``) between install passes, or the request lapses."""
        names = self._names(adapters)
        if not names:
            return
        with self._lock:
            for name in self._residency.want(names):
                if name not in self._reads:
                    if self._reader is None:
                        self._reader = ThreadPoolExecutor(1, thread_name_prefix="adapter-read")
                    self._reads[name] = self._reader.submit(read_adapter, self.served[name])

    # ------------------------------------------------------------------ directed by a step loop
    def start_read(self, name: str) -> Future[AdapterFile]:
        """Start reading ``name``'s file in the background (the step loop's scheduler decided it
        will be needed here); the future says when it is read."""
        with self._lock:
            future = self._reads.get(name)
            if future is None:
                if self._reader is None:
                    self._reader = ThreadPoolExecutor(1, thread_name_prefix="adapter-read")
                future = self._reads[name] = self._reader.submit(read_adapter, self.served[name])
            return future

    def take_read(self, name: str, future: Future[AdapterFile]) -> None:
        """A read of ``name``'s file made elsewhere (for a device's models: model/library): the
        next ``place`` installs it instead of reading it again."""
        with self._lock:
            self._reads.setdefault(name, future)

    def place(self, evict: Collection[str], install: Collection[str]) -> dict[str, str]:
        """Engine thread, at a step boundary: take ``evict`` off the device, then put ``install``
        on it (their files read by ``start_read``, waited for if need be), as the step loop's
        scheduler planned. Returns the adapters that failed, with why (they are left out)."""
        for name in evict:
            self._delete(name)
            self.evicted += 1
            with self._lock:
                self._residency.forget(name)
        failed = {}
        for name in install:
            with self._lock:
                future = self._reads.pop(name, None)
            if future is None:
                future = self.start_read(name)
                with self._lock:
                    self._reads.pop(name, None)
            self._install(name, future)
            if name in self.broken:
                failed[name] = self.broken[name]
            else:
                with self._lock:
                    self._residency.place([name])
        if install or evict:
            log.info(
                "adapters on the device: %s (in: %s; out: %s)",
                ", ".join(self.resident), ", ".join(install) or "none", ", ".join(evict) or "none",
            )  # fmt: skip
        return failed

    @property
    def pending(self) -> bool:
        """Whether a request waits for an install pass."""
        with self._lock:
            return self._residency.waiting

    # ------------------------------------------------------------------ engine thread
    def install_pending(self, in_use: Collection[str], wait: float = 0.0) -> None:
        """At a step boundary: inject the requested adapters whose files are read, after deleting
        the least recently used ones not ``in_use`` by running images to make room. ``wait``:
        seconds to wait for reads in flight first (only when no image would be stalled)."""
        # 1. With nothing else to do, give the reads in flight a moment.
        if wait > 0:
            with self._lock:
                reading = [future for future in self._reads.values() if not future.done()]
            if reading:
                wait_for(reading, timeout=wait)
        # 2. Decide, under the lock; reads that no request wants any more are dropped.
        with self._lock:
            read = {name for name, future in self._reads.items() if future.done()}
            plans = self._residency.plan(read, set(in_use))
            wanted = self._residency.wanted_names()
            self._reads = {n: f for n, f in self._reads.items() if n in wanted or not f.done()}
            files = {name: self._reads.pop(name) for plan in plans for name in plan.install}
        # 3. Change the module tree: out first, then in.
        for plan in plans:
            for name in plan.evict:
                self._delete(name)
                self.evicted += 1
            for name in plan.install:
                self._install(name, files[name])
            log.info(
                "adapters on the device: %s (in: %s; out: %s)",
                ", ".join(self.resident), ", ".join(plan.install), ", ".join(plan.evict) or "none",
            )  # fmt: skip

    def ensure(self, adapters: AdapterSet, in_use: Collection[str]) -> None:
        """Put ``adapters`` on the device now, waiting for their files (engine thread; for callers
        without a step loop in front, and as a safety net). InvalidRequestError when they cannot:
        broken, or every resident adapter is ``in_use``."""
        if self.ready(adapters):
            return
        self.request(adapters)
        self.install_pending(in_use, wait=READ_TIMEOUT_S)
        self.check(adapters)  # one that turned out broken says why
        if self.ready(adapters):
            return
        raise InvalidRequestError(
            f"adapters {', '.join(self._names(adapters))} cannot be put on the device now: the "
            f"{self.max_resident} it holds (SD_MAX_ADAPTERS) are all in use; send them separately"
        )

    def _install(self, name: str, future: Future[AdapterFile]) -> None:
        try:
            reason = self._inject(name, future.result())
        except Exception as error:  # the file changed or vanished since start-up
            reason = f"{self.served[name].name} could not be read ({first_line(error)})"
        if reason is None:
            self.installed += 1
            return
        self._delete(name)
        with self._lock:
            self._residency.forget(name)
        # ``served`` is read from other threads: it never changes after start-up. Clients read no path.
        self.broken[name] = without_folders(reason)
        log.error("adapter %s left out: %s", name, reason)

    def _inject(self, name: str, file: AdapterFile) -> str | None:
        """What ``load_lora_weights`` does with a read file: peft layers in the UNet and text encoder."""
        from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA

        pipe = self._pipeline()
        common = {"network_alphas": file.network_alphas, "adapter_name": name, "metadata": file.metadata,
                  "_pipeline": pipe, "low_cpu_mem_usage": _LOW_CPU_MEM_USAGE_DEFAULT_LORA}  # fmt: skip
        self._active = None  # injecting leaves the new adapter active in peft's layers
        try:
            pipe.load_lora_into_unet(dict(file.state), unet=pipe.unet, **common)
            pipe.load_lora_into_text_encoder(
                dict(file.state), text_encoder=pipe.text_encoder, lora_scale=pipe.lora_scale, **common
            )
        except Exception as error:  # any failure leaves the adapter out, never the server
            return f"{self.served[name].name} does not fit this model ({first_line(error)})"
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            return f"{self.served[name].name} holds no LoRA layer of this model's UNet or text encoder"
        return None

    def _delete(self, name: str) -> None:
        self._active = None
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

    def activate(self, adapters: AdapterSet) -> None:
        """Make ``adapters`` (name, scale pairs, on the device) the active set of the UNet and text
        encoder."""
        if adapters == self._active:
            return
        pipe = self._pipeline()
        layers = pipe.get_list_adapters() if self.installed else {}
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in adapters], adapter_weights=[float(s) for _, s in adapters])
        elif any(layers.values()):
            pipe.disable_lora()
        self._active = adapters

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
