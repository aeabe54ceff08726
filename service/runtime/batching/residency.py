"""What is on each engine's device, as scheduler state: LoRA adapters, and the models of a library.

The scheduler (scheduler.py) asks ``Placement.plan`` at every plan what the engine should start
reading (in the background: tensors from disk), what to evict and what to install at this step
boundary, and carries the answers in its ``Plan``; the lane starts the reads and the engine thread
does the installs, and what happened comes back as commands (``read_done``) and outputs
(``failed``). The least-recently-used policy itself is model/adapters/policy.py's: at most the
engine's cap at once, never an adapter a held image uses nor one an older waiting image is owed.

No polling and no side-effecting predicates: ``ready`` only reads, and a request lives exactly as
long as a waiting image asks for it at each plan.

Models are placed the same way as adapters, one name per image (``model_needs``): read = loaded in
the background (model/library/models.py), installed = swapped in at a step boundary.

With several engines, an adapter in demand is read where it is already resident or being read
(affinity: ``elsewhere``); another engine reads it too only while that one is full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from model.adapters.policy import Names, Residency, names_of
from model.errors import InvalidRequestError, ModelLoadError
from model.types import GenerationItem
from service.runtime.engines import ServingEngine

Elsewhere = Callable[[Names], bool]  # whether another engine with room holds or reads these names


def needs(item: GenerationItem) -> Names:
    return names_of(name for name, _ in item.adapters)


def model_needs(default: str) -> Callable[[GenerationItem], Names]:
    """An image's model as a placement's names (None: the default one)."""
    return lambda item: (item.model or default,)


@dataclass
class Changes:
    """One plan's residency work: reads to start, then (at the step boundary) out, then in."""

    read: list[str] = field(default_factory=list)
    evict: list[str] = field(default_factory=list)
    install: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.read or self.evict or self.install)


class Placement:
    """One engine's device: its resident adapters (None: the engine has no adapters to place) and
    the reads in flight or done."""

    def __init__(
        self,
        cap: int | None,
        needs: Callable[[GenerationItem], Names] = needs,
        what: str = "adapter",
        resident: Iterable[str] = (),
    ) -> None:
        """``needs``: an image's names to place; ``what``: what they are, for refusals;
        ``resident``: those on the device already."""
        self.residency = Residency(cap) if cap else None
        self.needs = needs
        self.what = what
        self.keep: frozenset[str] = frozenset()  # never evicted (the default model, with adapters)
        if self.residency is not None:
            self.residency.place(resident)
        self.reading: set[str] = set()  # reads in flight
        self.read: set[str] = set()  # read, not yet on the device
        self.news = False  # a read finished since the last plan
        self.broken: dict[str, str] = {}  # adapters that failed to install, with why

    @property
    def resident(self) -> frozenset[str]:
        return frozenset(self.residency.resident) if self.residency is not None else frozenset()

    def in_use(self, running: Iterable[GenerationItem]) -> set[str]:
        """What must stay on the device: the names of the ``running`` images, and ``keep``."""
        return {name for item in running for name in self.needs(item)} | self.keep

    def holds(self, names: Names) -> bool:
        """Whether ``names`` are on this device or on their way (being read, or read)."""
        return all(name in self.resident or name in self.reading or name in self.read for name in names)

    def ready(self, item: GenerationItem) -> bool:
        """Whether ``item`` may be admitted here now: its adapters are on the device (an engine
        without adapters, or an unknown name, is the engine's to refuse at admission)."""
        if self.residency is None:
            return True
        names = self.needs(item)
        return not names or self.ready_names(names)

    def work(self, waiting: Iterable[GenerationItem], elsewhere: Callable[[Names], bool]) -> bool:
        """Whether a plan would change something: a read to start, one just done, or one read
        that a waiting image needs on the device (an idle engine installs it at once)."""
        if self.residency is None:
            return False
        if self.news:
            return True
        for names in dict.fromkeys(self.needs(item) for item in waiting):
            if not names or any(name in self.broken for name in names):
                continue
            arrived = [name in self.read or name in self.resident for name in names]
            if (all(arrived) and not self.ready_names(names)) or (
                not self.holds(names) and not elsewhere(names)
            ):
                return True
        return False

    def ready_names(self, names: Names) -> bool:
        return all(name in self.resident for name in names)

    def plan(
        self, waiting: Iterable[GenerationItem], pinned: set[str], elsewhere: Callable[[Names], bool]
    ) -> Changes:
        """This plan's residency work, for the waiting images in the order they will be admitted
        (the oldest request is served first) and the adapters of the images the engine holds
        (``pinned``: never evicted). ``elsewhere(names)``: another engine with room holds or reads
        them, so this one leaves them be."""
        changes = Changes()
        self.news = False
        if self.residency is None:
            return changes
        # 1. Each waiting image's set is a request for this plan; what is missing starts reading.
        for names in dict.fromkeys(self.needs(item) for item in waiting):
            if (
                not names
                or any(name in self.broken for name in names)
                or (not self.holds(names) and elsewhere(names))
            ):
                continue
            for name in self.residency.want(names):
                if name not in self.reading and name not in self.read:
                    self.reading.add(name)
                    changes.read.append(name)
            self.residency.to_back(names)  # requests in this plan's order: the oldest first
        # 2. What is read goes on the device, least recently used adapters out (policy.py).
        for order in self.residency.plan(self.read, pinned):
            changes.evict += order.evict
            changes.install += order.install
            self.read -= set(order.install)
        return changes

    # ------------------------------------------------------------------ what happened
    def read_done(self, name: str) -> None:
        """A read finished (well or not: the install says which)."""
        self.reading.discard(name)
        self.read.add(name)
        self.news = True

    def failed(self, name: str, reason: str) -> None:
        """``name`` could not be put on the device: off the residency, its images refused."""
        if self.residency is not None:
            self.residency.forget(name)
        self.read.discard(name)
        self.broken[name] = reason

    def refusal(self, item: GenerationItem) -> str | None:
        """Why ``item`` cannot run here (an adapter or its model failed to install), or None."""
        for name in self.needs(item):
            if name in self.broken:
                return f"{self.what} {name} could not be loaded: {self.broken[name]}" + (
                    "; fix its files or choose another model (GET /v1/models)" if self.what == "model" else ""
                )
        return None

    def refusal_error(self, item: GenerationItem) -> Exception | None:
        """``refusal`` as the error its image fails with: a request's adapter that does not load is
        the caller's to change (422); a model that does not load is the server's (503)."""
        refusal = self.refusal(item)
        if refusal is None:
            return None
        return InvalidRequestError(refusal) if self.what == "adapter" else ModelLoadError(refusal)

    def settle(self) -> None:
        """After the waiting images were refused: a model that failed to load is tried again by the
        next request that names it (its files may be mended meanwhile); a broken adapter stays
        broken, as the engine's own check refuses it at admission too."""
        if self.what == "model":
            self.broken.clear()


def drains(models: Placement, item: GenerationItem, elsewhere: Elsewhere) -> bool:
    """Whether a waiting ``item`` whose model is not on this device makes the engine drain: the
    device holds all the models it may, so its model comes in only in place of one, once that one
    is idle. Then the images behind it wait too, instead of keeping the resident models in use
    forever (with one model per device and requests alternating, each would starve the other):
    first come, first served across models. Not when another engine with room holds or loads the
    model (``elsewhere``)."""
    if models.residency is None or models.ready(item) or elsewhere(models.needs(item)):
        return False
    return len(models.resident) >= models.residency.cap


# ------------------------------------------------------------------ the placements of an engine
def adapter_manager(engine: ServingEngine) -> Any:
    """The engine's LoRA adapters (model/adapters), or None for an engine without any (fakes)."""
    return getattr(engine, "adapters", None)


def adapter_cap(engine: ServingEngine) -> int | None:
    """How many LoRA adapters the engine's device holds at once; None when it serves none."""
    manager = adapter_manager(engine)
    return manager.max_resident if manager is not None and manager.names else None


def model_placement(engine: ServingEngine) -> Placement:
    """Where the scheduler keeps the engine's models: a library's (model/library/models.py: at
    most its cap on the device, the default one there first), else none to place."""
    loaders, default = getattr(engine, "loaders", None), getattr(engine, "default", None)
    if not isinstance(loaders, dict) or not isinstance(default, str):
        return Placement(None)
    resident = getattr(engine, "resident", ())
    placement = Placement(getattr(engine, "cap", 1), model_needs(default), "model", resident)
    return placement


def adapter_placement(engine: ServingEngine) -> int | Placement | None:
    """Where the scheduler keeps the engine's LoRA adapters: their cap (None: it serves none), or
    for a library's models, each adapter on one model (model/library/adapters.py)."""
    cap, manager, default = adapter_cap(engine), adapter_manager(engine), getattr(engine, "default", "")
    if cap is None or not hasattr(manager, "placed_name"):
        return cap

    def needs(item: GenerationItem) -> tuple[str, ...]:
        return names_of(manager.placed_name(item.model or default, name) for name, _ in item.adapters)

    return Placement(cap, needs)
