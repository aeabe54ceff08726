"""The server's life: load and warm up the model, serve, drain, stop.

Readiness (``GET /``) is true only between a finished warm-up and the start of a drain, and while
at least one engine is in rotation. The model loads after the app has started, so that probes get
a prompt 503 while it loads: one engine per device of SD_DEVICES, loaded and warmed up in parallel
threads (each device's work releases the GIL in torch's kernels). Each engine's thread is the one
that steps it afterwards (engines.engine_thread says why it must be one).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from schemas.score import ScoreLimits
from service.images_in import UrlPolicy
from service.runtime.batching.steploop import NO_ENGINE_LEFT, StepLoop
from service.runtime.engines import (
    ServingEngine,
    available_cores,
    cpu_threads_per_engine,
    engine_thread,
    load_serving_engine,
    resolve_devices,
)
from service.runtime.errors import NotReadyError, ShuttingDownError
from service.runtime.jobs import caller_weights, images_per_caller
from service.runtime.library import Library, library_of
from service.runtime.metrics import Metrics
from service.runtime.scoring import Scorer
from service.settings import Settings, SettingsError

log = logging.getLogger(__name__)

# After a drain timeout, how long the abandoned requests have to send their 503s.
ANSWER_GRACE_S = 5


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class Runtime:
    """What serving needs once the model is loaded."""

    engine: ServingEngine  # the first engine: model info and validation
    step_loop: StepLoop
    scorer: Scorer
    encode_pool: ThreadPoolExecutor
    engines: Sequence[ServingEngine] = ()  # one per device (SD_DEVICES), engine label order
    library: Library | None = None  # the models served by name (None: the one model only)

    def __post_init__(self) -> None:
        if not self.engines:
            self.engines = (self.engine,)


class Lifecycle:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        engine: ServingEngine | Sequence[ServingEngine] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.phase = Phase.LOADING
        self.failure = ""
        self.runtime: Runtime | None = None
        self._given_engines = (
            None if engine is None else list(engine) if isinstance(engine, Sequence) else [engine]
        )
        self._start_task: asyncio.Task[None] | None = None
        self._active = 0
        self._stopped: Runtime | None = None  # kept after stop() while its engine still runs
        self._idle = asyncio.Event()
        self._idle.set()

    # ----------------------------------------------------------------- start
    def begin(self) -> None:
        """Start loading in the background; the app answers meanwhile."""
        if self.settings.drain_timeout_s < self.settings.request_timeout_s:
            log.warning(
                "SD_DRAIN_TIMEOUT_S (%g s) is below SD_REQUEST_TIMEOUT_S (%g s): a shutdown may answer 503 "
                "to requests it accepted; raise it to at least the request deadline",
                self.settings.drain_timeout_s, self.settings.request_timeout_s,
            )  # fmt: skip
        self._start_task = asyncio.get_running_loop().create_task(self._start(), name="model-start")

    async def wait_started(self) -> None:
        """Until loading and warm-up have finished (check ``phase`` for how).

        Raises what ended the start-up task, should anything but a load failure (which sets
        ``phase`` to FAILED) end it, so that a host never waits for a start that is over.
        """
        if self._start_task is not None:
            await asyncio.shield(self._start_task)

    async def _start(self) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        threads: list[ThreadPoolExecutor] = []  # one per engine, in engine order
        try:
            # 1. Load (unless the caller gave engines) and warm up, off the event loop, every
            #    device at once, each engine in the thread that will step it.
            engines = self._given_engines or await self._load(threads)
            threads += [engine_thread(index) for index in range(len(threads), len(engines))]
            self._warn_if_random(engines[0])
            self._warn_if_unchecked(engines[0])
            pairs = zip(engines, threads, strict=True)
            await asyncio.gather(*(loop.run_in_executor(thread, engine.warmup) for engine, thread in pairs))
        except asyncio.CancelledError:
            _release(threads)  # stopped while loading
            raise
        except Exception as error:
            self.phase, self.failure = Phase.FAILED, f"the model could not be loaded: {error}"
            log.error("%s; check SD_MODEL (or --model)", self.failure)
            _release(threads)
            return
        # 2. The serving pieces (which own the threads from now on); a failure here must not
        #    leave readiness "loading" forever.
        try:
            self.runtime = self._assemble(engines, threads)
        except Exception:
            self.phase, self.failure = Phase.FAILED, "the server could not start serving the loaded model"
            log.exception(self.failure)
            _release(threads)
            return
        seconds = time.monotonic() - started
        self.metrics.model_load_seconds.set(seconds)
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
            log.info(
                "ready: %s loaded and warmed up in %.1f s on %s", engines[0].info.name, seconds,
                ", ".join(engine.info.device for engine in self.runtime.engines),
            )  # fmt: skip

    async def _load(self, threads: list[ThreadPoolExecutor]) -> list[ServingEngine]:
        """One engine per device, each loaded in its own new thread (appended to ``threads``), in
        parallel; any failure fails the start."""
        loop = asyncio.get_running_loop()
        devices = await asyncio.to_thread(resolve_devices, self.settings)
        counts = cpu_threads_per_engine(self.settings, devices, available_cores())
        threads += [engine_thread(index, count) for index, count in enumerate(counts)]
        shown = ", ".join("torch's default" if count is None else str(count) for count in counts)
        log.info("torch CPU threads per engine: %s (SD_CPU_THREADS)", shown)
        # In parallel: the model's loader reads one device's weights at a time (diffusers builds
        # models under process-wide contexts; model/loading says why) and moves them in parallel.
        loads = [
            loop.run_in_executor(thread, load_serving_engine, self.settings, device)
            for device, thread in zip(devices, threads, strict=True)
        ]
        results = list(await asyncio.gather(*loads, return_exceptions=True))
        engines = [result for result in results if not isinstance(result, BaseException)]
        failed = [
            (device, r) for device, r in zip(devices, results, strict=True) if isinstance(r, BaseException)
        ]
        if failed:
            for engine in engines:
                engine.close()
            # One line says it (the start's failure, logged by the caller), unless the devices
            # failed for different reasons: then each device's own.
            if len({str(error) for _, error in failed}) > 1:
                for device, error in failed:
                    log.error("the engine on %s did not load: %s", device or "the default device", error)
            raise failed[0][1]
        return engines

    def _assemble(self, engines: list[ServingEngine], threads: list[ThreadPoolExecutor]) -> Runtime:
        settings = self.settings
        limits = ScoreLimits(settings.max_prompts, settings.max_prompt_chars, settings.max_steps)
        encode_pool = ThreadPoolExecutor(settings.encode_workers, thread_name_prefix="encode")
        if settings.batching == "request":
            log.warning(
                "SD_BATCHING=request is no longer a mode: images are batched step by step on every "
                "device (and SD_MAX_BATCH_WAIT_MS is not used); remove the setting"
            )
        step_loop = StepLoop(
            engines,
            max_batch_size=settings.max_batch_size,
            max_queue_items=settings.max_queue_items,
            metrics=self.metrics,
            max_failures=settings.engine_max_failures,
            threads=threads,
            max_images_per_caller=images_per_caller(settings),
            weights=caller_weights(settings),
            max_groups=settings.max_groups_per_step,
        )
        step_loop.start()
        library = library_of(settings, engines[0].info.name)
        scorer = Scorer(engines[0], step_loop, limits, encode_pool, _image_urls(settings), library)
        return Runtime(engines[0], step_loop, scorer, encode_pool, engines, library)

    @staticmethod
    def _warn_if_random(engine: ServingEngine) -> None:
        if engine.info.random_weights:
            banner = "!" * 78
            log.warning(
                "%s\n  model %s has RANDOM WEIGHTS: every image it makes is noise.\n"
                "  Set SD_MODEL (or --model) to a Stable Diffusion folder to serve real images.\n%s",
                banner, engine.info.name, banner,
            )  # fmt: skip

    @staticmethod
    def _warn_if_unchecked(engine: ServingEngine) -> None:
        if not engine.info.safety_checker:
            banner = "!" * 78
            log.warning(
                "%s\n  model %s has NO SAFETY CHECKER: its images go out unchecked "
                "(nsfw_content_detected is null).\n"
                "  Set SD_SAFETY_CHECKER to a folder with safety_checker/ and feature_extractor/ "
                "to check them.\n%s",
                banner, engine.info.name, banner,
            )  # fmt: skip

    # ----------------------------------------------------------------- serve
    def require_ready(self) -> Runtime:
        """The runtime, or the 503 that says why there is none."""
        if self.phase is Phase.DRAINING:
            raise ShuttingDownError("the server is shutting down; send the request to another instance")
        if self.phase is Phase.FAILED:
            raise NotReadyError(self.failure)
        if self.runtime is None or self.phase is not Phase.READY:
            raise NotReadyError("the model is still loading or warming up; retry in a few seconds")
        if not self.runtime.step_loop.serving:
            raise NotReadyError(NO_ENGINE_LEFT)
        return self.runtime

    @property
    def is_ready(self) -> bool:
        """Whether requests are served now (what ``require_ready`` checks, without the error)."""
        try:
            self.require_ready()
        except (NotReadyError, ShuttingDownError):
            return False
        return True

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Runtime]:
        """Hold one request open: the drain waits for every such request to finish."""
        runtime = self.require_ready()
        self._active += 1
        self._idle.clear()
        try:
            yield runtime
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    # ----------------------------------------------------------------- stop
    async def drain(self) -> None:
        """Turn readiness off, then wait (up to SD_DRAIN_TIMEOUT_S) for requests in flight.

        When the time runs out, the requests still in flight are answered 503 shutting_down
        (their images are abandoned) before this returns, so none is cut off without an answer.
        """
        self.phase = Phase.DRAINING
        log.info("draining: %d request(s) in flight", self._active)
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout_s)
            log.info("drained")
            return
        except asyncio.TimeoutError:
            log.warning(
                "drain timeout (%.0f s, SD_DRAIN_TIMEOUT_S) with %d request(s) in flight: answering them 503",
                self.settings.drain_timeout_s,
                self._active,
            )
        if self.runtime is not None:
            self.runtime.step_loop.abandon(
                ShuttingDownError(
                    "the server is shutting down and ran out of time for this request; retry it"
                )
            )
        # Let the answers go out (each request only has to encode its error).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), ANSWER_GRACE_S)

    @property
    def engine_busy(self) -> bool:
        """True while the engine still runs work that nobody waits for any more."""
        runtime = self.runtime or self._stopped
        return runtime is not None and runtime.step_loop.busy

    async def stop(self) -> None:
        """Release everything; queued images still waiting fail with 503."""
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            await asyncio.gather(self._start_task, return_exceptions=True)
        runtime, self.runtime = self.runtime, None
        if runtime is None:
            return
        await runtime.step_loop.close()
        runtime.encode_pool.shutdown(wait=False, cancel_futures=True)
        if runtime.step_loop.busy:
            # The engine thread still runs an abandoned batch; releasing the model under it would
            # only make it fail noisily. The process is about to exit (see hosts/server.py).
            self._stopped = runtime
            log.info("the engine is still running an abandoned batch; not waiting for it")
            return
        for engine in runtime.engines:
            engine.close()


def _image_urls(settings: Settings) -> UrlPolicy:
    """The hosts whose image URLs requests may name (none unless SD_FETCH_IMAGE_URLS says)."""
    try:
        return UrlPolicy.parse(settings.fetch_image_urls)
    except ValueError as error:
        raise SettingsError(f"SD_FETCH_IMAGE_URLS: {error}") from None


def _release(threads: Sequence[ThreadPoolExecutor]) -> None:
    """Let engine threads that nothing will use again end (the work they run, if any, finishes)."""
    for thread in threads:
        thread.shutdown(wait=False, cancel_futures=True)
