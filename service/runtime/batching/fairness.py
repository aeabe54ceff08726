"""A fair share per caller, as plain data: who is admitted next and who steps in the next step.

Callers are API keys (a digest; "" for everyone on a server without keys). Each caller has a FIFO
queue of waiting images and a *pass* (stride scheduling, a discrete virtual time): every step an
image takes charges its caller the step's cost of that image, divided by the caller's weight, and
the caller with the lowest pass goes first. A caller that comes back after being idle starts at
the lowest pass of the active callers, so idling banks no credit, and a caller that floods the
queue pays for every step it gets: a newcomer's single image is picked before the flood's next.

What a step may hold when several callers have images on an engine (``select``) is generalised
processor sharing over step time: with ``n`` callers (by weight), a light caller whose images all
step must see its step cost at most ``n`` times what its images alone would cost, so the step's
cost is capped at the least of those bounds; a heavy caller gets the rest of the cap, its other
images pausing (they keep their latents on the engine). A step's cost comes from ``StepCost``
(cost.py), fitted to measured step times: on a device where rows are almost free (a GPU at small
sizes) the cap admits most of the set; where each row costs as much as the last (a CPU) it keeps
a light caller's image close to its speed alone. Nothing here has a clock, thread or event loop.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from model.types import GenerationItem
from service.runtime.batching.cost import Group, StepCost, group_of, rows_of


class Queued(Protocol):
    """What fairness reads of an image (scheduler.Image has it)."""

    @property
    def caller(self) -> str: ...

    @property
    def item(self) -> object: ...


@dataclass
class Caller:
    name: str
    weight: float = 1.0
    pass_: float = 0.0  # the virtual time this caller has used, over its weight
    waiting: deque[object] = field(default_factory=deque)


class FairQueue:
    """Every waiting image, one FIFO per caller; the order in which they should be admitted."""

    def __init__(self, weights: Mapping[str, float] | None = None, default_weight: float = 1.0) -> None:
        self._weights = dict(weights or {})
        self._default_weight = default_weight
        self._callers: dict[str, Caller] = {}
        self._arrival = itertools.count()
        self._order: dict[str, int] = {}  # a caller's first arrival while active: ties go to the oldest

    # ----------------------------------------------------------------- contents
    def __len__(self) -> int:
        return sum(len(caller.waiting) for caller in self._callers.values())

    def __iter__(self) -> Iterator[object]:
        """Every waiting image, caller by caller (for abandoning, counting)."""
        return (image for caller in list(self._callers.values()) for image in list(caller.waiting))

    def waiting_of(self, name: str) -> int:
        caller = self._callers.get(name)
        return len(caller.waiting) if caller else 0

    def caller(self, name: str) -> Caller:
        """``name``'s record, created at the current virtual time (an idle caller banks nothing)."""
        found = self._callers.get(name)
        if found is None:
            found = Caller(name, self._weights.get(name, self._default_weight), self.now())
            self._callers[name] = found
            self._order[name] = next(self._arrival)
        return found

    def now(self) -> float:
        """The virtual time: the lowest pass among callers that have images waiting or running."""
        passes = [caller.pass_ for caller in self._callers.values()]
        return min(passes, default=0.0)

    def add(self, images: Iterable[Queued], *, front: bool = False) -> None:
        """Queue images behind their caller's waiting ones (``front``: ahead of them, in order)."""
        batch = list(images)
        for image in reversed(batch) if front else batch:
            waiting = self.caller(image.caller).waiting
            if front:
                waiting.appendleft(image)
            else:
                waiting.append(image)

    def remove(self, image: Queued) -> bool:
        caller = self._callers.get(image.caller)
        if caller is None or image not in caller.waiting:
            return False
        caller.waiting.remove(image)
        return True

    def clear(self) -> list[object]:
        images = list(self)
        for caller in self._callers.values():
            caller.waiting.clear()
        return images

    def forget_idle(self, busy: Callable[[str], bool]) -> None:
        """Drop the callers with nothing waiting and nothing ``busy`` (running): one that comes back
        starts at the virtual time then, not at its old pass."""
        for name in [name for name, caller in self._callers.items() if not caller.waiting and not busy(name)]:
            del self._callers[name]
            self._order.pop(name, None)

    # ----------------------------------------------------------------- the policy
    def charge(self, name: str, cost: float) -> None:
        """``name``'s images took ``cost`` of a step."""
        caller = self.caller(name)
        caller.pass_ += cost / caller.weight

    def fair_order(self, cost: StepCost) -> list[object]:
        """Every waiting image in the order admission should take them: repeatedly the head of the
        caller with the lowest pass (ties: the caller with fewer images waiting), each image taken
        counting as its whole cost alone (``cost``), as it will be charged step by step."""
        heap = [
            (caller.pass_, len(caller.waiting), self._order[name], name)
            for name, caller in self._callers.items()
            if caller.waiting
        ]
        heapq.heapify(heap)
        position = dict.fromkeys(self._callers, 0)
        order: list[object] = []
        while heap:
            pass_, size, arrival, name = heapq.heappop(heap)
            caller = self._callers[name]
            image = caller.waiting[position[name]]
            order.append(image)
            position[name] += 1
            if position[name] < len(caller.waiting):
                item: GenerationItem = image.item  # type: ignore[attr-defined]
                spent = cost.of_item(item) * item.steps_run / caller.weight
                heapq.heappush(heap, (pass_ + spent, size, arrival, name))
        return order

    def owed(self, present: set[str]) -> Callable[[str], bool]:
        """Whether a caller is owed service beside ``present`` ones: its pass is at most theirs (a
        newcomer, or one behind its weighted share), so it may join a full engine."""
        lowest = min(
            (self._callers[name].pass_ for name in present if name in self._callers), default=float("inf")
        )
        return lambda name: self.caller(name).pass_ <= lowest

    def step_set(
        self, held: Sequence[Queued], cost: StepCost, *, max_images: int, max_groups: int
    ) -> list[object] | None:
        """Who of ``held`` (an engine's images) steps next: None (everyone) while one caller has
        images there within the room and the groups, else ``select``'s choice."""
        items: list[GenerationItem] = [image.item for image in held]  # type: ignore[misc]
        callers, groups = {image.caller for image in held}, {group_of(item) for item in items}
        if len(callers) <= 1 and len(groups) <= max_groups and len(held) <= max_images:
            return None
        return select(
            [
                Candidate(image, image.caller, group_of(item), rows_of(item))
                for image, item in zip(held, items, strict=True)
            ],
            passes=self.passes(),
            weights=lambda name: self.caller(name).weight,
            cost=cost,
            max_images=max_images,
            max_groups=max_groups,
        )

    def charge_steps(self, stepped: Sequence[Queued], cost: StepCost, seconds: Sequence[float]) -> None:
        """Steps of ``stepped`` took ``seconds`` each: the prices learn them, and each caller pays its
        rows' part of each step's price."""
        if not stepped or not seconds:
            return
        items: list[GenerationItem] = [image.item for image in stepped]  # type: ignore[misc]
        groups: dict[Group, int] = {}
        for item in items:
            groups[group_of(item)] = groups.get(group_of(item), 0) + rows_of(item)
        for each in seconds:
            cost.observe(groups, each)
        price = cost.estimate(groups) * len(seconds) / sum(groups.values())
        for image, item in zip(stepped, items, strict=True):
            self.charge(image.caller, price * rows_of(item))

    def passes(self) -> dict[str, float]:
        return {name: caller.pass_ for name, caller in self._callers.items()}


@dataclass(frozen=True)
class Candidate:
    """An image an engine holds, as step selection sees it."""

    key: object  # the caller's handle on it (scheduler.Image)
    caller: str
    group: Group
    rows: int


def select(
    held: Sequence[Candidate],
    *,
    passes: Mapping[str, float],
    weights: Callable[[str], float],
    cost: StepCost,
    max_images: int,
    max_groups: int,
) -> list[object]:
    """The images of the next step, from those an engine holds (in admission order).

    1. Callers in order of pass (the one owed most first; ties: the one with fewer images);
       within a caller, its oldest images.
    2. The cost cap: with one caller, everything within the rows and groups; with several, the
       least over callers of ``cost(its rows alone) * total weight / its weight`` (a light caller's
       step costs at most its share's worth), never less than one image's step.
    3. Taken round robin over callers, one image at a time, while the cap, ``max_images`` and
       ``max_groups`` hold; an image that would open a new group past ``max_groups`` waits (its
       caller, not charged, is first next time), one that joins an open group is preferred.
    The first image is always taken, so no caller starves and a step always runs.
    """
    by_caller: dict[str, list[Candidate]] = {}
    for candidate in held:
        by_caller.setdefault(candidate.caller, []).append(candidate)
    callers = sorted(by_caller, key=lambda name: (passes.get(name, 0.0), len(by_caller[name])))
    # 2. The cap.
    if len(callers) == 1:
        cap = float("inf")
    else:
        total_weight = sum(weights(name) for name in callers)
        bounds = []
        for name in callers:
            alone: dict[Group, int] = {}
            for candidate in by_caller[name]:
                alone[candidate.group] = alone.get(candidate.group, 0) + candidate.rows
            bounds.append(cost.estimate(alone) * total_weight / weights(name))
        cap = min(bounds)
    # 3. Round robin.
    chosen: list[Candidate] = []
    groups: dict[Group, int] = {}
    pending = {name: list(by_caller[name]) for name in callers}
    progress = True
    while progress:
        progress = False
        for name in callers:
            queue = pending[name]
            pick = _next(queue, groups, max_groups)
            if pick is None:
                continue
            trial = dict(groups)
            trial[pick.group] = trial.get(pick.group, 0) + pick.rows
            if chosen and (len(chosen) >= max_images or cost.estimate(trial) > cap * (1 + 1e-9)):
                continue
            queue.remove(pick)
            chosen.append(pick)
            groups = trial
            progress = True
    order = {id(candidate): index for index, candidate in enumerate(held)}
    return [candidate.key for candidate in sorted(chosen, key=lambda each: order[id(each)])]


def _next(queue: list[Candidate], groups: Mapping[Group, int], max_groups: int) -> Candidate | None:
    """A caller's next image for the step: its oldest that joins an open group, else its oldest
    when a group may still open."""
    for candidate in queue:
        if candidate.group in groups:
            return candidate
    if queue and len(groups) < max_groups:
        return queue[0]
    return None
