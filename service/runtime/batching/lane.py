"""One engine's step loop (a lane): it asks the scheduler (scheduler.py) for a plan at each step
boundary, carries it out in its engine's own thread (drop, admit, step until there is something to
hand back, retire), hands the output back to the scheduler, and resolves the futures it is told to.

The lane decides nothing of who runs: it owns the engine's thread, the previews and steps it
reports to jobs (jobs.py), the metrics, and the log lines of what the scheduler decided.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from model.types import GenerationResult
from service.runtime.batching.residency import adapter_manager
from service.runtime.batching.scheduler import NO_ENGINE_LEFT, Image, Output, Plan, Scheduler, State
from service.runtime.engines import FollowableEngine, ServingEngine, engine_thread
from service.runtime.metrics import Metrics

log = logging.getLogger(__name__)


def fail(images: Sequence[Image], error: BaseException) -> None:
    for image in images:
        if not image.future.done():
            image.future.set_exception(error)


class Lane:
    def __init__(
        self,
        index: int,
        engine: ServingEngine,
        scheduler: Scheduler,
        *,
        metrics: Metrics,
        wake: Callable[[], None],
        thread: ThreadPoolExecutor | None = None,
    ) -> None:
        """``wake``: tells the sleeping lanes that images were put back in the queue."""
        self.index = index
        self.engine = engine
        self._scheduler = scheduler
        self._slot = scheduler.engines[index]
        self._metrics = metrics.for_engine(index, getattr(engine.info, "adapters", ()))
        self._server_metrics = metrics
        self._wake = wake
        self.arrival = asyncio.Event()  # set when images arrive while this lane sleeps
        self.asleep = False  # waiting for images
        # Set on the event loop when the scheduler has something for this engine (an image could
        # join, one left or was cancelled): the engine thread reads only this between steps, never
        # the scheduler's state, and ends its iteration to ask for a new plan.
        self.attention = threading.Event()
        # The engine's one thread (the one it was loaded and warmed up in, when given; the lane
        # owns it from now on): every engine call of an iteration runs there.
        self._engine_thread = thread or engine_thread(index)
        self._worker: asyncio.Task[None] | None = None
        self.in_engine = False
        self._followable = isinstance(engine, FollowableEngine)
        self._default_model = getattr(engine, "default", None) or engine.info.name
        if hasattr(engine, "loaders"):  # a library's models: their loads and evictions as metrics
            engine.events = self._model_event  # type: ignore[attr-defined]
            metrics.model_event(index, "resident", self._default_model, 0.0, engine.resident_bytes())  # type: ignore[attr-defined]
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def serving(self) -> bool:
        return self._slot.serving

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.create_task(self._work(), name=f"step-loop-{self.index}")
        self._worker.add_done_callback(self._ended)

    def _ended(self, worker: asyncio.Task[None]) -> None:
        """A lane whose loop raised serves no more: say so loudly (its images would only time out)."""
        if not worker.cancelled() and worker.exception() is not None:
            log.error("engine %d: its step loop stopped", self.index, exc_info=worker.exception())

    # ----------------------------------------------------------------- the loop
    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self._slot.serving:
            # 1. Nothing running or to drop: sleep until an image is ready for this engine.
            if not self._slot.running and not self._slot.leaving:
                await self._wait_for_work()
            # 2. The plan, carried out in the engine thread: leave, admit, step, retire.
            self.attention.clear()
            plan = self._scheduler.schedule(self.index)
            self._start_reads(plan.adapters.read)
            self._start_loads(plan.models.read)
            if not (plan.admit or self._slot.running or plan.leave or plan.adapters or plan.models):
                await self._wait_for_arrival()  # another lane took what had arrived
                continue
            self._took(plan.admit)
            self.in_engine = True
            iteration = loop.run_in_executor(self._engine_thread, self._iterate, plan)
            started = time.monotonic()
            try:
                output = await asyncio.shield(iteration)
            except asyncio.CancelledError:
                # Abandoned, but the engine thread still runs it: busy until it returns, so that a
                # stop does not release the model under it (and the host exits without joining it).
                iteration.add_done_callback(self._iteration_over)
                raise
            self.in_engine = False
            self._server_metrics.engine_batch_seconds.observe(time.monotonic() - started)
            # 3. Hand out what it did.
            self._apply(output)

    async def _wait_for_work(self) -> None:
        while not self._scheduler.has_work(self.index):
            await self._wait_for_arrival()

    async def _wait_for_arrival(self) -> None:
        """Sleep until the step loop pokes (images, a read done, images put back): what looked like
        work was not this engine's, and asking again at once would spin."""
        self.asleep = True
        try:
            self.arrival.clear()
            await self.arrival.wait()
        finally:
            self.asleep = False

    def _start_reads(self, names: list[str]) -> None:
        """On the event loop: the plan's adapter files start reading in the background; each one
        read is a command back to the scheduler (and a wake-up)."""
        manager = adapter_manager(self.engine)
        if not names or manager is None or self._loop is None:
            return
        loop = self._loop
        for name in names:
            future = manager.start_read(name)

            def done(_: object, name: str = name) -> None:
                loop.call_soon_threadsafe(self._read_done, name)

            future.add_done_callback(done)

    def _start_loads(self, names: list[str]) -> None:
        """On the event loop: the plan's models start loading in the background (a library's,
        model/library/models.py); each load that ends is a command back to the scheduler."""
        if not names or self._loop is None:
            return
        loop = self._loop
        for name in names:

            def done(_: object, name: str = name) -> None:
                loop.call_soon_threadsafe(self._loaded, name)

            self.engine.start_load(name).add_done_callback(done)  # type: ignore[attr-defined]

    def _loaded(self, name: str) -> None:
        self._scheduler.model_loaded(self.index, name)
        self._wake()

    def _read_done(self, name: str) -> None:
        self._scheduler.adapter_read(self.index, name)
        self._wake()

    def _model_event(self, kind: str, model: str, value: float) -> None:
        """In the engine thread (ModelSet.place): a model came on or left the device."""
        self._server_metrics.model_event(self.index, kind, model, value, self.engine.resident_bytes())  # type: ignore[attr-defined]

    def _took(self, images: list[Image]) -> None:
        self._metrics.running_images.set(self._slot.held)
        if images:
            self._server_metrics.queue_depth.set(self._scheduler.waiting)
            now = time.monotonic()
            for image in images:
                self._server_metrics.queue_wait.observe(now - image.arrived)

    def _iteration_over(self, _: object) -> None:
        self.in_engine = False

    def _admit(self, images: list[Image], output: Output) -> None:
        """In the engine thread: the plan's newcomers admitted together (one text-encoder call, one
        VAE encoder pass per size for images in), or, when that fails (the engine admits all or
        none), each alone, so that only the one it cannot take is refused."""
        # Checked once already, before they queued (Scorer.generate): the engine need not again.
        admit_all = getattr(self.engine, "admit_checked", None) or getattr(self.engine, "admit_all", None)
        if admit_all is not None and len(images) > 1:
            try:
                handles = admit_all([image.item for image in images])
            except Exception:
                pass
            else:
                output.admitted.extend(zip(images, handles, strict=True))
                return
        for image in images:
            try:
                handle = (
                    admit_all([image.item])[0] if admit_all is not None else self.engine.admit(image.item)
                )
            except Exception as error:  # this item only: the engine cannot take it
                output.refused.append((image, error))
            else:
                output.admitted.append((image, handle))

    def _iterate(self, plan: Plan) -> Output:
        """In the engine thread: cancel, admit, then step until there is something to hand back.

        The engine steps on without a round trip through the event loop for as long as nothing
        finished, nothing left and no waiting image could join (the event loop may be busy with
        HTTP and PNGs; the engine must not wait for it between steps). Never raises for engine
        errors: a failed step ends the iteration, the steps before it stand.
        """
        engine, output = self.engine, Output()
        for handle in plan.leave:
            engine.cancel(handle)
        if plan.models.evict or plan.models.install:  # models first: adapters belong to one
            output.model_failures = engine.place(  # type: ignore[attr-defined]
                plan.models.evict, plan.models.install
            )
        if plan.adapters.evict or plan.adapters.install:  # at this step boundary, before admission
            output.adapter_failures = engine.place_adapters(  # type: ignore[attr-defined]
                plan.adapters.evict, plan.adapters.install
            )
        self._admit(plan.admit, output)
        if plan.finish and self._followable:  # interrupted: they end with what they have, first
            for handle in plan.finish:
                engine.finish(handle)  # type: ignore[attr-defined]
            output.results = self._retire(plan.finish)
            return output
        held = [*plan.running, *output.admitted]
        self._preview(plan, held, [], 0, output)
        only = None
        if plan.step is not None:  # the others pause this iteration (fairness.select)
            chosen = {id(image) for image in plan.step}
            held = [(image, handle) for image, handle in held if id(image) in chosen]
            only = {handle for _, handle in held}
        while held:
            started = time.perf_counter()
            try:
                finished = engine.step() if only is None else engine.step(only)  # type: ignore[call-arg]
            except Exception as error:  # nothing advanced in this step: the scheduler decides who leaves
                output.step_error = error
                break
            output.steps.append((len(held), time.perf_counter() - started))
            if self._loop is not None:  # progress as it happens, not at the end of the iteration
                self._loop.call_soon_threadsafe(self._scheduler.stepped, [image for image, _ in held])
            self._preview(plan, held, finished, len(output.steps), output)
            if output.first_step_done is None:
                output.first_step_done = time.monotonic()
            if finished:
                output.results = self._retire(finished)
                break
            if self._should_hand_back(held):
                break
        return output

    def _should_hand_back(self, held: list[tuple[Image, int]]) -> bool:
        """In the engine thread, between steps: whether the event loop has something to do. A
        future is done as soon as its request gives up, before the scheduler hears of it (its
        callback waits for the event loop, which may not run while steps are this fast)."""
        return self.attention.is_set() or any(image.future.done() for image, _ in held)

    def _preview(
        self, plan: Plan, held: list[tuple[Image, int]], finished: list[int], stepped: int, output: Output
    ) -> None:
        """In the engine thread, after the iteration's ``stepped``-th step (0: before the first):
        the previews the plan asked for now, handed to the event loop, their time in the output
        (the caller's share pays for it); a failed preview costs the image nothing."""
        if not self._followable or not plan.preview or self._loop is None:
            return
        for image, handle in held:
            order = plan.preview.get(image)
            job = image.job
            if order is None or job is None or handle in finished:
                continue
            if not order.due(stepped, image.item.steps_run):
                continue
            started = time.perf_counter()
            try:
                pixels = self.engine.preview(handle)  # type: ignore[attr-defined]
            except Exception:
                log.warning("engine %d: a preview failed; the image goes on", self.index, exc_info=True)
                continue
            output.previews.append((image, time.perf_counter() - started))
            self._loop.call_soon_threadsafe(job.preview, image.index, order.steps + stepped, pixels)

    def _retire(self, handles: list[int]) -> list[tuple[int, GenerationResult | Exception]]:
        """Decode the finished images together; on failure one by one, so each gets its own outcome
        (a handle whose decode failed stays in the engine: the scheduler drops it next plan)."""
        try:
            return list(zip(handles, self.engine.retire(handles), strict=True))
        except Exception as error:
            if len(handles) == 1:
                return [(handles[0], error)]
        outcomes: list[tuple[int, GenerationResult | Exception]] = []
        for handle in handles:
            try:
                outcomes += zip([handle], self.engine.retire([handle]), strict=True)
            except Exception as error:
                outcomes.append((handle, error))
        return outcomes

    def _apply(self, output: Output) -> None:
        """On the event loop: what the scheduler makes of the iteration, then metrics, futures and
        log lines."""
        metrics = self._metrics
        stepped = [*self._slot.running.values(), *(image for image, _ in output.admitted)]
        update = self._scheduler.update_from_output(self.index, output)
        # 1. The steps that happened: step metrics, first-step times.
        metrics.admitted_per_step.observe(len(output.admitted))
        adapter_sets = [image.item.adapters for image in stepped]
        for images, seconds in output.steps:
            metrics.step_seconds.observe(seconds)
            metrics.adapter_step(adapter_sets, seconds)
            metrics.batch_size.observe(images)
        if output.first_step_done is not None and output.step_error is None:
            for image in stepped:
                if image.first_step and image.state in (State.RUNNING, State.FINISHED):
                    image.first_step = False
                    metrics.first_step_wait.observe(output.first_step_done - image.arrived)
        # 2. What the scheduler decided about a failed step.
        if update.counted_failure:
            metrics.engine_failures.inc()
        if update.out_of_memory_at:
            log.warning(
                "engine %d: out of memory at %d images: %d go back to the queue",
                self.index, update.out_of_memory_at, len(update.requeued),
            )  # fmt: skip
        if update.isolated:
            log.warning(
                "engine %d: a step of %d images failed (%s); running each alone",
                self.index, update.isolated, type(output.step_error).__name__,
            )  # fmt: skip
        if update.taken_out:
            self._report_taken_out(output.step_error)
        if update.requeued:
            self._wake()
        # 3. Futures.
        for image, result in update.finished:
            metrics.images_generated.inc()
            model = image.item.model or self._default_model
            self._server_metrics.model_images.labels(str(self.index), model).inc()
            metrics.adapter_image(image.item.adapters)
            if result.nsfw_content_detected:
                self._server_metrics.images_flagged.inc()
            if not image.future.done():
                image.future.set_result(result)
        for image, error in update.failed:
            fail([image], error)
        metrics.running_images.set(len(self._slot.running))
        self._server_metrics.queue_depth.set(self._scheduler.waiting)

    def _report_taken_out(self, error: BaseException | None) -> None:
        self._server_metrics.engines_serving.set(len(self._scheduler.serving))
        log.error(
            "%s\n  ENGINE %d (%s) TAKEN OUT OF ROTATION after %d failed steps in a row (last: %s: %s);\n"
            "  the other engines keep serving. Restart the server to bring its device back.\n%s",
            "!" * 78, self.index, self.engine.info.device, self._slot.failures, type(error).__name__,
            str(error)[:200], "!" * 78,
        )  # fmt: skip
        if not self._scheduler.serving:
            log.error("no engine is left in rotation: %s", NO_ENGINE_LEFT)

    # ----------------------------------------------------------------- stop
    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._engine_thread.shutdown(wait=False, cancel_futures=True)
