"""What a step costs, learned from the steps an engine ran: the scheduler's price list.

A step is one UNet call per group (one image size and one set of LoRA adapters) over that group's
rows (two per guided image). Its time is modelled as ``per_group * groups + per_row * weighted
rows``, a row weighted by its pixels over 512x512: the per-group part is the call's fixed price
(kernel launches, an adapter set's activation: 8 adapter sets made a step 2.6x slower than one),
the per-row part what batching does not amortise. The two prices are a least-squares fit of the
measured steps, forgetting old ones; until the steps seen tell the two apart, all of the time is
put on the rows (what a CPU does, and the cautious guess for fairness).

Only ratios matter to the scheduler (whether a step costs more than twice another), so the unit is
whatever the lane measures with: seconds. No clock here: the lane passes the durations in.
"""

from __future__ import annotations

from collections.abc import Mapping

from model.types import AdapterSet, GenerationItem, rows_of

__all__ = ["Group", "StepCost", "group_of", "rows_of"]

# One UNet call's rows share these: (height, width, adapters).
Group = tuple[int, int, AdapterSet]
REFERENCE_PIXELS = 512 * 512


def group_of(item: GenerationItem) -> Group:
    return (item.height, item.width, item.adapters)


def weighted_rows(groups: Mapping[Group, int]) -> float:
    return sum(rows * height * width / REFERENCE_PIXELS for (height, width, _), rows in groups.items())


class StepCost:
    """A running fit of step time to (groups, weighted rows)."""

    def __init__(self, *, forget: float = 0.98, group_prior: float = 0.1) -> None:
        # Decayed sums of the normal equations over features x = (groups, weighted rows); the
        # prior, added when solving and never decayed, is a ridge on the per-group price: where the
        # steps seen cannot tell the two prices apart (every step one group), all of it is per row.
        self._forget = forget
        self._group_prior = group_prior
        self._sxx = [[0.0, 0.0], [0.0, 0.0]]
        self._sxy = [0.0, 0.0]
        self.per_group, self.per_row = 0.0, 1.0
        self.observed = 0

    def estimate(self, groups: Mapping[Group, int]) -> float:
        """The expected time of a step over ``groups`` (rows per group)."""
        live = {group: rows for group, rows in groups.items() if rows > 0}
        return self.per_group * len(live) + self.per_row * weighted_rows(live)

    def of_item(self, item: GenerationItem) -> float:
        """One step of ``item`` alone."""
        return self.estimate({group_of(item): rows_of(item)})

    def observe(self, groups: Mapping[Group, int], seconds: float) -> None:
        """A step over ``groups`` took ``seconds``."""
        if seconds <= 0 or not groups:
            return
        x = (float(len(groups)), weighted_rows(groups))
        for i in range(2):
            self._sxy[i] = self._forget * self._sxy[i] + x[i] * seconds
            for j in range(2):
                self._sxx[i][j] = self._forget * self._sxx[i][j] + x[i] * x[j]
        self.observed += 1
        self._solve()

    def _solve(self) -> None:
        """Both prices from the normal equations, neither below zero (a negative price would make
        more rows look cheaper)."""
        (a, b), (c, d) = self._sxx
        a += self._group_prior
        det = a * d - b * c
        if abs(det) > 1e-12:
            per_group = (d * self._sxy[0] - b * self._sxy[1]) / det
            per_row = (a * self._sxy[1] - c * self._sxy[0]) / det
            if per_group >= 0 and per_row > 0:
                self.per_group, self.per_row = per_group, per_row
                return
        # Out of range: all of it per row (the cautious guess).
        if d > 0 and self._sxy[1] > 0:
            self.per_group, self.per_row = 0.0, self._sxy[1] / d
