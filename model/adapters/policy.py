"""Which LoRA adapters live on the device: at most ``cap`` at once, the least recently used out,
never one that a running image uses nor one an older waiting image is owed.

Pure bookkeeping (no threads, no torch, no clock): the manager (manager.py) asks it, under its lock,
what to read, what to evict and what to inject, and does the work. A waiting image's adapter set
is a request: ``want`` records it (the names to start reading), ``ready`` answers whether the set is
resident (and, when it is, consumes the request: the image is admitted now). At each install pass
(``plan``, at a step boundary), requests are served oldest first; a request not asked about since
the previous pass is dropped (its image left, or no longer waits here), so a cancelled image never
holds adapters on the device.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass

Names = tuple[str, ...]  # one image's adapter names, sorted


def names_of(names: Iterable[str]) -> Names:
    return tuple(sorted(set(names)))


@dataclass(frozen=True)
class Plan:
    """What serves one request: adapters to take off the device first, then those to inject."""

    names: Names
    evict: tuple[str, ...]
    install: tuple[str, ...]


class Residency:
    """Resident adapters in order of use (least recent first) and the requests waiting for some."""

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"at least one adapter must fit on the device, got a cap of {cap}")
        self.cap = cap
        self._resident: OrderedDict[str, None] = OrderedDict()
        self._wanted: OrderedDict[Names, bool] = OrderedDict()  # request -> asked since the last pass

    @property
    def resident(self) -> Names:
        """Resident adapters, least recently used first."""
        return tuple(self._resident)

    @property
    def waiting(self) -> bool:
        """Whether a request waits for an install pass."""
        return bool(self._wanted)

    def wanted_names(self) -> set[str]:
        return {name for names in self._wanted for name in names}

    def ready(self, names: Names) -> bool:
        """Whether every one of ``names`` is resident; if so they count as used now and their
        request is served, else the request (if any) stays fresh for the next pass."""
        if all(name in self._resident for name in names):
            self.touch(names)
            self._wanted.pop(names, None)
            return True
        if names in self._wanted:
            self._wanted[names] = True
        return False

    def want(self, names: Names) -> list[str]:
        """Record (or refresh) a request for ``names``: the ones not resident, to be read."""
        self._wanted[names] = True
        return [name for name in names if name not in self._resident]

    def to_back(self, names: Names) -> None:
        """Put the request for ``names`` behind the others (a caller that asks for its requests in
        the order it serves them, each plan, keeps them in that order)."""
        if names in self._wanted:
            self._wanted.move_to_end(names)

    def touch(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self._resident:
                self._resident.move_to_end(name)

    def place(self, names: Iterable[str]) -> None:
        """``names`` are on the device now (put there by a plan made elsewhere: the step loop's)."""
        for name in names:
            self._resident[name] = None
            self._resident.move_to_end(name)

    def forget(self, name: str) -> None:
        """``name`` is not on the device after all (its injection failed)."""
        self._resident.pop(name, None)

    def plan(self, read: Collection[str], pinned: Collection[str]) -> list[Plan]:
        """One install pass: the plans that serve the waiting requests whose missing adapters are
        all ``read``, oldest request first, evicting only least recently used adapters that are
        neither ``pinned`` (in use by running images) nor part of an older waiting request. The
        residency is updated as if every plan succeeds (``forget`` what did not)."""
        # 1. Requests nobody asked about since the last pass are dropped.
        self._wanted = OrderedDict((names, False) for names, asked in self._wanted.items() if asked)
        protected = set(pinned)
        plans = []
        for names in self._wanted:
            missing = tuple(name for name in names if name not in self._resident)
            # 2. Its adapters stay, whatever a younger request needs.
            protected.update(names)
            if not missing or not all(name in read for name in missing):
                continue
            # 3. Room for the missing ones: least recently used first out.
            short = len(self._resident) + len(missing) - self.cap
            victims = tuple(name for name in self._resident if name not in protected)[: max(short, 0)]
            if len(victims) < short:
                continue  # what is resident is in use: it waits for those images to finish
            for name in victims:
                del self._resident[name]
            for name in missing:
                self._resident[name] = None
            plans.append(Plan(names, victims, missing))
        return plans
