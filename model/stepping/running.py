"""The running set: every admitted item, advanced together one denoising step at a time.

A step is all or nothing. The UNet calls (one per size and adapter set, every item's rows in
it) run first; then
each item's scheduler steps. Only when every item has its next latents are they committed: if
anything raises (out of memory, a kernel error), every scheduler and generator is put back as
it was, so no item has advanced and the caller may drop some items and step again.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import torch

from model.stepping.admission import Activate
from model.stepping.item import ItemState
from model.stepping.rows import Forward, run_bucketed

# The rows of one UNet call: items of one size and one adapter set.
GroupKey = tuple[tuple[int, int], tuple[tuple[str, float], ...]]


class RunningSet:
    """Items admitted and not yet retired, by handle, in admission order."""

    def __init__(self) -> None:
        self._states: dict[int, ItemState] = {}
        # per group: the handles whose embeddings were last concatenated, and that concatenation
        self._embeds: dict[GroupKey, tuple[tuple[int, ...], torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._states)

    def add(self, states: Iterable[ItemState]) -> None:
        for state in states:
            self._states[state.handle] = state

    def discard(self, handle: int) -> None:
        self._states.pop(handle, None)

    def get(self, handle: int) -> ItemState | None:
        return self._states.get(handle)

    @property
    def active(self) -> list[ItemState]:
        """The items the next step advances (admitted, steps left)."""
        return [state for state in self._states.values() if not state.finished]

    @property
    def rows(self) -> int:
        return sum(state.rows for state in self.active)

    def finished(self, handles: Sequence[int]) -> list[ItemState]:
        """The states of ``handles``, which must all be finished and distinct."""
        if len(set(handles)) != len(handles):
            raise ValueError(f"a handle appears twice in {list(handles)}")
        states = []
        for handle in handles:
            state = self._states.get(handle)
            if state is None:
                raise ValueError(f"no item with handle {handle}: never admitted, retired or cancelled")
            if not state.finished:
                raise ValueError(
                    f"item {handle} is at step {state.position} of {state.total_steps}; retire it when done"
                )
            states.append(state)
        return states

    def step(
        self,
        forward: Forward,
        row_buckets: Sequence[int] | None,
        activate: Activate | None = None,
        only: Collection[int] | None = None,
    ) -> list[int]:
        """Advance every active item one step (or those of ``only``: the others pause, unchanged);
        returns the handles that finished now. Each group of one size and one adapter set is one
        UNet call, after ``activate`` of its set."""
        active = self.active if only is None else [state for state in self.active if state.handle in only]
        if not active:
            return []
        checkpoints = [state.checkpoint() for state in active]
        try:
            noise: dict[int, torch.Tensor] = {}
            groups = _by_group(active)
            self._embeds = {key: cached for key, cached in self._embeds.items() if key in groups}
            for key, group in groups.items():
                if activate is not None:
                    activate(key[1])
                noise.update(self._predict(forward, row_buckets, key, group))
            latents = [state.next_latents(noise[state.handle]) for state in active]
        except BaseException:
            for checkpoint in checkpoints:
                checkpoint.restore()
            raise
        for state, new in zip(active, latents, strict=True):
            state.latents = new
            state.position += 1
        return [state.handle for state in active if state.finished]

    def _predict(
        self,
        forward: Forward,
        row_buckets: Sequence[int] | None,
        key: GroupKey,
        group: list[ItemState],
    ) -> dict[int, torch.Tensor]:
        """One UNet pass over every row of ``group`` (one size, one adapter set): each item's noise."""
        sample = torch.cat([state.model_input() for state in group])
        timesteps = torch.tensor(
            [state.unet_timesteps[state.position] for state in group for _ in range(state.rows)],
            dtype=torch.float32,
        ).to(sample.device)
        predicted = run_bucketed(forward, row_buckets, sample, timesteps, self._group_embeds(key, group))
        noise = {}
        row = 0
        for state in group:
            noise[state.handle] = state.noise(predicted[row : row + state.rows])
            row += state.rows
        return noise

    def _group_embeds(self, key: GroupKey, group: list[ItemState]) -> torch.Tensor:
        """The text embeddings of the group's rows, concatenated once per change of membership."""
        handles = tuple(state.handle for state in group)
        cached = self._embeds.get(key)
        if cached is None or cached[0] != handles:
            cached = (handles, torch.cat([state.embeds for state in group]))
            self._embeds[key] = cached
        return cached[1]


def _by_group(states: list[ItemState]) -> dict[GroupKey, list[ItemState]]:
    groups: dict[GroupKey, list[ItemState]] = {}
    for state in states:
        groups.setdefault((state.size, state.item.adapters), []).append(state)
    return groups
