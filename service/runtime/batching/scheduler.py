"""The step loop's policy: which images an engine admits, cancels, requeues or fails at a step
boundary, decided by one synchronous object (no asyncio, threads or clock), as vLLM's v1
``Scheduler.schedule()`` / ``update_from_output()``.

Each image's state is one ``State`` held here. The lanes (lane.py) ask for a ``Plan`` before each
iteration, carry it out in their engine's thread, and hand the ``Output`` back; the ``Update`` says
which futures to resolve. The scheduler is the queue's one owner: a cancelled image leaves the
queue at once, or its engine at that engine's next plan.

The rules (steploop.py's docstring tells them as a user sees them):
- a fair share per caller (fairness.py): each caller's images are FIFO, and callers take turns
  by the step time they have used (weighted per key); among the images that are ready
  (``ready``), one that is not ready (its adapter or model still loading, say) stays waiting
  without holding up the images behind it, unless its model must replace one in use (residency.drains);
- an engine admits while it has room (``max_batch_size``, less after running out of memory), and
  a caller with nothing on it beyond that, up to ``max_batch_size`` more, so a newcomer never
  waits for a flood's images to finish; while another engine holds nothing, a busy one leaves new
  images to it and an empty one takes its share;
- what steps: every image an engine holds while one caller has images there; with several, a
  step costs at most what a light caller's share allows (fairness.select, with the prices of
  cost.py learned from the engine's measured steps) and opens at most ``max_groups`` UNet calls,
  the images left out pausing with their latents (they lose nothing);
- out of memory in a step: the most recently admitted half goes back to the front of the queue
  and the room shrinks to what is left, growing back by one per image finished; one image that
  does not fit alone fails;
- any other failed step: each of its images runs again alone (a suspect), so only the culprit
  fails; ``max_failures`` such steps in a row take the engine out of rotation: its images fail,
  the suspects it made run in company again elsewhere, and with no engine left the queue fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from model.errors import EngineOutOfMemoryError
from model.types import GenerationItem
from service.runtime.batching import records
from service.runtime.batching.fairness import FairQueue
from service.runtime.batching.oom import after_failure
from service.runtime.batching.records import DONE, EngineSlot, Image, Output, Plan, State, Update
from service.runtime.batching.residency import Placement, drains
from service.runtime.errors import NotReadyError
from service.runtime.jobs import POLLED_PREVIEW_INTERVAL_S

__all__ = ["DONE", "NO_ENGINE_LEFT", "EngineSlot", "Image", "Output", "Plan", "Ready", "Scheduler", "State"]
__all__ += ["Update"]

NO_ENGINE_LEFT = "every engine of this server failed and was taken out of rotation; restart the server"

# Whether an image may be admitted on an engine now: (engine index, item) -> ready. Called on the
# event loop only (the engine threads read nothing of the scheduler's): a cheap read.
Ready = Callable[[int, GenerationItem], bool]


def always_ready(engine: int, item: GenerationItem) -> bool:
    return True


class Scheduler:
    def __init__(
        self,
        engines: int,
        *,
        max_batch_size: int,
        max_failures: int = 3,
        ready: Ready = always_ready,
        weights: Mapping[str, float] | None = None,
        max_groups: int = 4,
        adapter_caps: Sequence[int | Placement | None] = (),
        models: Sequence[Placement] = (),
    ) -> None:
        """``weights``: callers' shares (1 for any not named); ``max_groups``: UNet calls per step
        (distinct sizes and adapter sets) at most, beyond the first image's; ``adapter_caps``: the
        LoRA adapters each engine's device holds at once (None: it places none; a Placement: its own,
        for a library's adapters on each model); ``models``: each engine's models of a library."""
        caps = [p if isinstance(p, Placement) else Placement(p) for p in adapter_caps]
        caps += [Placement(None) for _ in range(engines - len(caps))]
        size = max_batch_size
        self.engines = [EngineSlot(i, size, size, placement=p) for i, p in enumerate(caps)]
        for slot, placement in zip(self.engines, models, strict=False):
            slot.models = placement
        self._max_batch_size = max_batch_size
        self._max_failures = max_failures
        self._max_groups = max_groups
        self._ready = ready
        self._queue = FairQueue(weights)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def serving(self) -> list[EngineSlot]:
        return [slot for slot in self.engines if slot.serving]

    def add(self, images: Sequence[Image]) -> None:
        """Queue ``images`` behind their caller's waiting ones (the caller checked the queue's room)."""
        for image in images:
            image.state = State.WAITING
        self._queue.add(images)

    def held_by(self, caller: str) -> int:
        """``caller``'s images waiting or on an engine (its share of the queue's room)."""
        held = [image for slot in self.engines for image in [*slot.running.values(), *slot.admitting]]
        return sum(image.caller == caller for image in held) + self._queue.waiting_of(caller)

    def has_work(self, engine: int) -> bool:
        """Whether ``engine`` has something to do: a waiting image ready for it, or adapters to place."""
        slot = self.engines[engine]
        waiting = self._waiting()
        if any(self._fits(slot, image) for image in waiting):
            return True
        items = [image.item for image in waiting]
        return slot.models.work(items, self._elsewhere(slot, "models")) or slot.placement.work(
            items, self._elsewhere(slot)
        )

    def _fits(self, slot: EngineSlot, image: Image) -> bool:
        """Whether ``image`` may be admitted on ``slot`` now: ready, its model and adapters on the device."""
        item = image.item
        return self._ready(slot.index, item) and slot.models.ready(item) and slot.placement.ready(item)

    def _elsewhere(self, slot: EngineSlot, kind: str = "placement") -> Callable[[tuple[str, ...]], bool]:
        """Affinity: another serving engine with room holds or reads these adapters (or model)."""
        others = [o for o in self.engines if o is not slot and o.serving and o.held < o.room]
        return lambda names: any(getattr(other, kind).holds(names) for other in others)

    def adapter_read(self, engine: int, name: str) -> None:
        """An adapter's file was read for ``engine`` (the lane's reader reports it)."""
        self.engines[engine].placement.read_done(name)

    def model_loaded(self, engine: int, name: str) -> None:
        """A model's load for ``engine`` ended, well or not (the lane's loader reports it)."""
        self.engines[engine].models.read_done(name)

    def _waiting(self) -> list[Image]:
        return list(self._queue)  # type: ignore[arg-type]

    def cancel(self, image: Image) -> None:
        """``image``'s caller gave up: it leaves the queue now, or its engine at the next plan."""
        if image.state is State.WAITING:
            self._queue.remove(image)
            self._forget_idle()
        elif image.state is State.RUNNING and image.engine is not None and image.handle is not None:
            slot = self.engines[image.engine]
            slot.running.pop(image.handle, None)
            slot.leaving.append(image.handle)
        elif image.state is not State.ADMITTING:  # done already
            return
        image.state = State.CANCELLED  # an admitting one leaves once its handle is known

    def abandon(self) -> list[Image]:
        """Every waiting and held image, failed now (the caller fails their futures); held ones
        leave their engines at the next plan."""
        images: list[Image] = self._queue.clear()  # type: ignore[assignment]
        for slot in self.engines:
            images += slot.admitting  # their handles are dropped in update_from_output
            for handle, image in slot.running.items():
                slot.leaving.append(handle)
                images.append(image)
            slot.running = {}
        for image in images:
            image.state = State.FAILED
        return images

    # ----------------------------------------------------------------- one engine's iteration
    def schedule(self, engine: int) -> Plan:
        """What ``engine`` does at its step boundary: the handles to drop, the images to admit."""
        slot = self.engines[engine]
        leave, slot.leaving = slot.leaving, []
        on = [image.item for image in slot.running.values()]
        order: list[Image] = self._queue.fair_order(slot.cost)  # type: ignore[assignment]
        waiting = [image.item for image in order]
        models = slot.models.plan(waiting, slot.models.in_use(on), self._elsewhere(slot, "models"))
        here = [item for item in waiting if slot.models.ready(item)]  # adapters go where their model is
        changes = slot.placement.plan(here, slot.placement.in_use(on), self._elsewhere(slot))
        admit = self._take(slot, order)
        for image in admit:
            image.state, image.engine = State.ADMITTING, engine
        slot.admitting = admit
        finish, slot.ending = slot.ending, []
        ended = {slot.running[handle] for handle in finish if handle in slot.running}
        held = [image for image in [*slot.running.values(), *admit] if image not in ended]
        step = self._select(slot, held)
        slot.stepping = held if step is None else step
        running = [(image, handle) for handle, image in slot.running.items() if image not in ended]
        return Plan(leave, admit, step, running, finish, records.previews_of(slot.stepping), changes, models)

    # ----------------------------------------------------------------- commands on running images
    def finish(self, images: Sequence[Image]) -> None:
        """Interrupt (A1111's interrupt and skip): ``images`` on an engine end at its next plan
        with the latents they have; waiting ones are the caller's to cancel or leave."""
        for image in images:
            if image.state is State.RUNNING and image.engine is not None and image.handle is not None:
                slot = self.engines[image.engine]
                if image.handle not in slot.ending:
                    slot.ending.append(image.handle)
            elif image.state is State.ADMITTING:
                image.ending = True  # its handle joins ``ending`` once it is known

    def ask_preview(self, images: Sequence[Image], now: float) -> None:
        """Someone polls a request's progress (records.ask_preview says when that previews)."""
        records.ask_preview(images, now, POLLED_PREVIEW_INTERVAL_S)

    def stepped(self, images: Sequence[Image]) -> None:
        """An engine reports a step of ``images`` (as it happens: progress is visible mid-iteration)."""
        for image in images:
            image.steps += image.on_engine

    def _select(self, slot: EngineSlot, held: list[Image]) -> list[Image] | None:
        """Who steps in ``slot``'s iteration (fairness.select; None: everyone)."""
        chosen = self._queue.step_set(held, slot.cost, max_images=slot.room, max_groups=self._max_groups)
        return chosen  # type: ignore[return-value]

    def _take(self, slot: EngineSlot, order: list[Image]) -> list[Image]:
        """Waiting images for ``slot``, oldest ready first, within its room and its share; a
        suspect runs alone."""
        if not slot.serving or any(image.suspect_on is not None for image in slot.running.values()):
            return []
        # In fair ``order``; one that is not ready stays first in line for when it is, and holds nobody up.
        ready: list[Image] = []
        elsewhere = self._elsewhere(slot, "models")
        for image in order:  # behind an image whose model must replace one in use, the engine drains
            if drains(slot.models, image.item, elsewhere):
                break
            ready += [image] if self._fits(slot, image) else []
        # The empty engines that could run them take new images (not those lacking their adapters).
        idle = [o for o in self.engines if o is not slot and o.serving and not o.held]
        empty = sum(1 for other in idle if any(self._fits(other, image) for image in ready))
        if empty and slot.running:
            return []
        share = math.ceil(len(ready) / (empty + 1))
        admit: list[Image] = []
        present = {image.caller for image in slot.running.values()}
        owed = self._queue.owed(present)
        for image in ready:
            held = len(slot.running) + len(admit)
            if len(admit) >= share:
                break
            if held >= slot.room and not (
                owed(image.caller) and image.caller not in present and held < slot.room + self._max_batch_size
            ):  # full, but a caller owed its share with nothing here gets in (the step decides who runs)
                continue
            if image.suspect_on is not None and (slot.running or admit):
                break
            self._queue.remove(image)
            admit.append(image)
            present.add(image.caller)
            if image.suspect_on is not None:
                break
        return admit

    def wants_plan(self, engine: int) -> bool:
        """Whether ``engine`` should end its iteration at its next step boundary for a new plan:
        a handle is to leave, an image it admits was cancelled, or a waiting image could join
        (one within its room, or a caller's first beyond it). Asked on the event loop after each
        command; the lane passes the answer to its engine thread."""
        slot = self.engines[engine]
        if slot.leaving or slot.ending or slot.placement.news or slot.models.news or not slot.serving:
            return True
        if any(image.preview_asked or image.ending for image in [*slot.running.values(), *slot.admitting]):
            return True
        if any(image.state is not State.ADMITTING for image in slot.admitting):
            return True
        if slot.held < slot.room:
            return self.has_work(engine)
        if slot.held >= slot.room + self._max_batch_size:
            return False
        present = {image.caller for image in [*slot.running.values(), *slot.admitting]}
        owed = self._queue.owed(present)
        return any(
            owed(image.caller) and image.caller not in present and self._fits(slot, image)
            for image in self._waiting()
        )

    def update_from_output(self, engine: int, output: Output) -> Update:
        """Apply what ``engine``'s iteration did; say what to resolve."""
        slot, update = self.engines[engine], Update()
        # 1. Admissions: the engine holds these now; one cancelled meanwhile leaves at the next plan.
        for image, handle in output.admitted:
            image.handle = handle
            if image.state is State.ADMITTING:
                image.state = State.RUNNING
                slot.running[handle] = image
                if image.ending:
                    slot.ending.append(handle)
            else:
                slot.leaving.append(handle)
        for image, error in output.refused:
            if image.state is State.ADMITTING:
                image.state = State.FAILED
                update.failed.append((image, error))
        slot.admitting = []
        if output.steps:
            slot.failures = 0
            self._charge(slot, output.steps)
        for image, seconds in output.previews:  # a preview is engine time too: its caller's
            self._queue.charge(image.caller, seconds)
        if output.adapter_failures:
            self._placing_failed(slot.placement, output.adapter_failures, update)
        if output.model_failures:
            self._placing_failed(slot.models, output.model_failures, update)
        # 2. A failed step (its images as they were): shrink, isolate or take out.
        if output.step_error is not None:
            self._recover(slot, output.step_error, update)
            return update
        # 3. Finished images out (a cancelled one left ``running`` already).
        for handle, result in output.results:
            if handle not in slot.running:
                continue
            image = slot.running.pop(handle)
            if isinstance(result, Exception):  # its decode failed: it leaves the engine too
                slot.leaving.append(handle)
                image.state = State.FAILED
                update.failed.append((image, result))
                continue
            slot.room = min(slot.room + 1, slot.max_batch_size)
            image.state = State.FINISHED
            update.finished.append((image, result))
        self._forget_idle()
        return update

    def _charge(self, slot: EngineSlot, steps: list[tuple[int, float]]) -> None:
        """The steps' times teach the prices; each caller pays its rows' part of each step."""
        stepped = [i for i in slot.stepping if i.state in (State.RUNNING, State.FINISHED, State.CANCELLED)]
        self._queue.charge_steps(stepped, slot.cost, [seconds for _, seconds in steps])

    def _placing_failed(self, placement: Placement, failures: dict[str, str], update: Update) -> None:
        """Adapters (or models) that could not be put on the device: the waiting images that need
        them fail with why (the engine refuses admitted adapters the same way)."""
        for name, reason in failures.items():
            placement.failed(name, reason)
        for image in self._waiting():
            if (error := placement.refusal_error(image.item)) is not None:
                self._queue.remove(image)
                image.state = State.FAILED
                update.failed.append((image, error))
        placement.settle()

    def _forget_idle(self) -> None:
        busy = {i.caller for slot in self.engines for i in [*slot.running.values(), *slot.admitting]}
        self._queue.forget_idle(busy.__contains__)

    def _recover(self, slot: EngineSlot, error: Exception, update: Update) -> None:
        """After a failed step (the engine state unchanged): the rule of oom.py, unless the engine
        has failed too often in a row."""
        if not isinstance(error, EngineOutOfMemoryError):
            slot.failures += 1
            update.counted_failure = True
            if slot.failures >= self._max_failures:
                self._take_out(slot, list(slot.running.values()), error, update)
                return
        stepped = [image for image in slot.stepping if image.state is State.RUNNING]
        verdict = after_failure(stepped or list(slot.running.values()), error)  # in admission order
        self._fail(slot, verdict.fail, error, update)
        if verdict.later:  # out of memory: the room shrinks to what goes on
            slot.room = len(verdict.keep)
            update.out_of_memory_at = len(verdict.keep) + len(verdict.later)
        for image in verdict.alone:
            image.suspect_on = slot.index
        update.isolated = len(verdict.alone)
        self._requeue(slot, [*verdict.later, *verdict.alone], update)

    def _fail(self, slot: EngineSlot, images: list[Image], error: BaseException, update: Update) -> None:
        for image in images:
            self._leave(slot, image)
            image.state = State.FAILED
            update.failed.append((image, error))

    def _requeue(self, slot: EngineSlot, images: list[Image], update: Update) -> None:
        """Back to the front of the queue, in order; they restart from step 0."""
        for image in images:
            self._leave(slot, image)
            image.state, image.first_step, image.steps, image.ending = State.WAITING, True, 0, False
        self._queue.add(images, front=True)
        update.requeued += images

    @staticmethod
    def _leave(slot: EngineSlot, image: Image) -> None:
        if image.handle is not None:
            slot.running.pop(image.handle, None)
            slot.leaving.append(image.handle)
        image.handle = image.engine = None

    def _take_out(self, slot: EngineSlot, running: list[Image], error: Exception, update: Update) -> None:
        """The device failed: its images fail; the suspects it made were not to blame (its device
        was), so they run in company again; with no engine left, the queue fails."""
        slot.serving = False
        update.taken_out = True
        self._fail(slot, running, error, update)
        for image in self._waiting():
            if image.suspect_on == slot.index:
                image.suspect_on = None
        if not self.serving:
            waiting = self._waiting()
            self._queue.clear()
            for image in waiting:
                image.state = State.FAILED
                update.failed.append((image, NotReadyError(NO_ENGINE_LEFT)))
