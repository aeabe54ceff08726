"""One admitted item: its latents, its own scheduler and generator, its prompt embeddings.

Every step keeps what StableDiffusionPipeline does for this item alone: its scheduler scales the
latents, the UNet predicts the noise of its rows ([negative, prompt] with guidance, [prompt]
without), guidance combines them, and its scheduler steps.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from model.stepping.images import Inpainting
from model.types import GenerationItem, rows_of

_STEP_PARAMETERS: dict[type, frozenset[str]] = {}


def step_parameters(scheduler: Any) -> frozenset[str]:
    """The keyword arguments a scheduler's step() accepts (cached per class)."""
    cls = type(scheduler)
    if cls not in _STEP_PARAMETERS:
        _STEP_PARAMETERS[cls] = frozenset(inspect.signature(cls.step).parameters)
    return _STEP_PARAMETERS[cls]


def step_kwargs(scheduler: Any, generator: torch.Generator, eta: float = 0.0) -> dict[str, Any]:
    """What the pipeline passes to step(): the generator (ancestral samplers draw noise each
    step) and the item's eta, where the scheduler takes them."""
    params = step_parameters(scheduler)
    kwargs: dict[str, Any] = {}
    if "generator" in params:
        kwargs["generator"] = generator
    if "eta" in params:
        kwargs["eta"] = eta
    return kwargs


@dataclass(eq=False)
class ItemState:
    """An item between admission and retirement. ``position`` counts the steps done."""

    handle: int
    item: GenerationItem
    scheduler: Any
    generator: torch.Generator
    latents: torch.Tensor  # 1 x C x h x w
    embeds: torch.Tensor  # rows x L x D: [negative, prompt] when guided, [prompt] when not
    unet_timesteps: list[float]  # each step's timestep on the host, for the per-row tensor
    step_kwargs: dict[str, Any]
    position: int = 0
    # where in ``scheduler.timesteps`` the item's first step is: an image in with a strength below
    # 1 skips the start of its schedule (``unet_timesteps`` holds only the steps it runs)
    start: int = 0
    inpainting: Inpainting | None = None

    @property
    def guided(self) -> bool:
        return self.item.guidance_scale > 1

    @property
    def rows(self) -> int:
        """UNet rows this item takes: two with guidance (negative and prompt), one without."""
        return rows_of(self.item)

    @property
    def total_steps(self) -> int:
        return len(self.unet_timesteps)

    @property
    def finished(self) -> bool:
        return self.position >= self.total_steps

    @property
    def size(self) -> tuple[int, int]:
        return (self.item.height, self.item.width)

    @property
    def timestep(self) -> Any:
        return self.scheduler.timesteps[self.start + self.position]

    def model_input(self) -> torch.Tensor:
        """This step's UNet input rows, scaled by the item's scheduler (an inpainting UNet's mask
        and masked-image channels after them)."""
        scaled: torch.Tensor = self.scheduler.scale_model_input(self.latents, self.timestep)
        if self.inpainting is not None:
            scaled = self.inpainting.unet_input(scaled)
        return torch.cat([scaled, scaled]) if self.guided else scaled

    def noise(self, predicted: torch.Tensor) -> torch.Tensor:
        """The item's UNet output rows -> its noise prediction, guided as the pipeline does."""
        if not self.guided:
            return predicted
        uncond, cond = predicted.chunk(2)
        return uncond + self.item.guidance_scale * (cond - uncond)

    def next_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """The scheduler's step from the current latents (an inpainted item's kept region put
        back after it); the caller commits the result."""
        out = self.scheduler.step(noise, self.timestep, self.latents, **self.step_kwargs, return_dict=False)
        latents: torch.Tensor = out[0]
        if self.inpainting is None:
            return latents
        following = self.start + self.position + 1
        timesteps = self.scheduler.timesteps
        upcoming = timesteps[following : following + 1] if following < len(timesteps) else None
        return self.inpainting.blend(latents, self.scheduler, upcoming)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self)


class Checkpoint:
    """What a step may change in an item's scheduler and generator, to put back if the step fails.

    Schedulers keep their per-run state in plain attributes: counters, lists of past outputs
    (replaced or appended to, never changed in place) and latent-sized tensors (PNDM's Runge-Kutta
    accumulator is added to in place, so those are copied). Tables such as sigmas are shared.
    """

    def __init__(self, state: ItemState) -> None:
        self.state = state
        shape = state.latents.shape
        self.attributes = {name: _saved(value, shape) for name, value in vars(state.scheduler).items()}
        self.generator = state.generator.get_state() if "generator" in state.step_kwargs else None

    def restore(self) -> None:
        attributes = vars(self.state.scheduler)
        attributes.clear()
        attributes.update(
            {name: _saved(value, self.state.latents.shape) for name, value in self.attributes.items()}
        )
        if self.generator is not None:
            self.state.generator.set_state(self.generator)


def _saved(value: Any, latent_shape: torch.Size) -> Any:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, torch.Tensor) and value.shape == latent_shape:
        return value.clone()
    return value
