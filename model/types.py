"""Plain frozen dataclasses that go in and out of the engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_SCHEDULER = "default"
MAX_SEED = 2**63 - 1
# The random-weight architectures (model/architectures.py builds them); named here so that light
# callers (the make-model command line) can list them without importing torch.
ARCHITECTURES = ("tiny", "tiny-inpaint", "sd-v1-4", "sd-2-base")
# LoRA adapters of one image: (name, scale) pairs sorted by name; the wire schemas repeat the bounds.
AdapterSet = tuple[tuple[str, float], ...]
MAX_ADAPTER_SCALE = 2.0
MAX_ADAPTERS_PER_ITEM = 4


def adapter_set(scales: Mapping[str, float] | Sequence[tuple[str, float]] | None) -> AdapterSet:
    """The canonical form of a request's adapters: (name, scale) pairs sorted by name."""
    pairs = scales.items() if isinstance(scales, Mapping) else (scales or ())
    return tuple(sorted((str(name), float(scale)) for name, scale in pairs))


@dataclass(frozen=True, order=True)
class BatchKey:
    """What every item of one engine batch must share."""

    num_inference_steps: int
    height: int
    width: int
    scheduler: str


@dataclass(frozen=True)
class GenerationItem:
    """One image to generate. ``seed`` fully determines the initial noise of this item."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    scheduler: str = DEFAULT_SCHEDULER
    adapters: AdapterSet = ()  # LoRA adapters and their scales (``adapter_set``)
    # DDIM's eta (0: deterministic; 1: as much fresh noise as DDPM); only schedulers whose step()
    # takes one accept another value. Ancestral and SDE samplers draw their own noise regardless.
    eta: float = 0.0
    # Text-encoder layers skipped, as diffusers' ``clip_skip`` (0: the last layer's output, 1: the
    # one before it, ...; AUTOMATIC1111's CLIP_stop_at_last_layers is this plus one).
    clip_skip: int = 0
    # Image to image and inpainting (diffusers' StableDiffusionImg2ImgPipeline and
    # StableDiffusionInpaintPipeline): ``init_image`` HxWx3 uint8 RGB and ``mask`` HxW uint8 (255:
    # repaint, 0: keep; binarised at 128), both at the item's size. ``strength`` is the share of the
    # schedule that runs: the item starts that far from the end, from its image noised to there.
    # Arrays are neither hashable nor comparable with ==: items compare and hash without them.
    init_image: np.ndarray | None = field(default=None, repr=False, compare=False, hash=False)
    mask: np.ndarray | None = field(default=None, repr=False, compare=False, hash=False)
    strength: float = 1.0
    # The model of a server's library (model/library) that draws it; None: the server's default.
    model: str | None = None

    @property
    def steps_run(self) -> int:
        """The denoising steps this item runs: all, or an image in's share of them (diffusers'
        get_timesteps: ``int(steps * strength)``)."""
        if self.init_image is None:
            return self.num_inference_steps
        return min(int(self.num_inference_steps * self.strength), self.num_inference_steps)

    @property
    def batch_key(self) -> BatchKey:
        return BatchKey(self.num_inference_steps, self.height, self.width, self.scheduler)


def rows_of(item: GenerationItem) -> int:
    """UNet rows an item takes while it runs: two with guidance (scale > 1), one without."""
    return 2 if item.guidance_scale > 1 else 1


@dataclass(frozen=True)
class GenerationResult:
    """One generated image.

    ``image`` is HxWx3 uint8 RGB. ``nsfw_content_detected`` is None when no safety checker ran;
    when True the image is all zeros already (the policy is applied by the engine).
    """

    image: np.ndarray = field(repr=False)
    nsfw_content_detected: bool | None
    seed: int


@dataclass(frozen=True)
class ModelInfo:
    """What a client may want to know about the loaded model."""

    name: str
    architecture: str
    native_height: int
    native_width: int
    schedulers: tuple[str, ...]
    default_scheduler: str
    safety_checker: bool
    device: str
    dtype: str
    random_weights: bool
    accelerator: str = "none"
    adapters: tuple[str, ...] = ()
    # A UNet with 9 input channels (latents, mask, masked-image latents): an inpainting model
    inpainting: bool = False
