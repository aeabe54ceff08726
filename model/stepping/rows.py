"""Rows of one UNet call, padded to a bucket.

Compiled code and CUDA graphs are specialised on shapes: the UNet's batch is padded (with copies
of its last row, whose outputs are dropped) to the next of a few row counts, so that the graphs
captured at warm-up serve every mix of items. The timestep goes in as a tensor, one per row, so
one graph serves items at different points of their schedules. More rows than the largest bucket
run as several calls of that bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def plan(total: int, buckets: Sequence[int] | None) -> list[tuple[int, int, int]]:
    """(start, stop, padded size) of each call for ``total`` rows; one unpadded call without
    buckets."""
    if not buckets:
        return [(0, total, total)]
    ordered = sorted(buckets)
    largest = ordered[-1]
    calls = []
    for start in range(0, total, largest):
        stop = min(total, start + largest)
        calls.append((start, stop, next(b for b in ordered if b >= stop - start)))
    return calls


def padded(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """``tensor`` with its last row repeated up to ``size`` rows."""
    missing = size - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def run_bucketed(
    forward: Forward,
    buckets: Sequence[int] | None,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: torch.Tensor,
) -> torch.Tensor:
    """``forward(sample, timesteps, embeds)`` over every row, in bucket-sized calls."""
    outputs = []
    for start, stop, size in plan(sample.shape[0], buckets):
        rows = (padded(tensor[start:stop], size) for tensor in (sample, timesteps, embeds))
        outputs.append(forward(*rows)[: stop - start])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def new_graph_step() -> None:
    """A new CUDA-graph generation: the outputs of earlier replays may be overwritten from now."""
    torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]


def unet_forward(unet: Any, cuda_graphs: bool) -> Forward:
    """The UNet as a function of (sample, per-row timesteps, text embeddings)."""

    def forward(sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        if cuda_graphs:
            new_graph_step()
        noise: torch.Tensor = unet(sample, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
        # a captured graph's output buffer is reused by its next replay; schedulers keep outputs
        return noise.clone() if cuda_graphs else noise

    return forward
