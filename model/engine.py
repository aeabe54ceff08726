"""The engine: items are admitted, stepped together and retired; ``generate`` does all three.

It owns the denoising loop (rather than calling StableDiffusionPipeline) so that it controls
batching, per-item seeds and memory; every step keeps diffusers' math. The machinery lives in
``model.stepping``; this module holds the public surface.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Collection, Iterator, Sequence

import numpy as np
import torch

from model.adapters import Adapters
from model.errors import EngineError, EngineFailure, EngineOutOfMemoryError, InvalidRequestError
from model.loading import Components
from model.options import EngineOptions
from model.schedulers import check_scheduler_name, offered_schedulers, scheduler_name, takes_eta
from model.stepping.admission import PromptEncoder, admit_items
from model.stepping.decode import decode, safety, to_results
from model.stepping.images import check_images, is_inpainting_unet
from model.stepping.item import ItemState
from model.stepping.preview import linear_preview, load_tiny_decoder, tiny_preview
from model.stepping.rows import unet_forward
from model.stepping.running import RunningSet
from model.types import MAX_SEED, GenerationItem, GenerationResult, ModelInfo

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """Translate torch's failures into the engine's own exception types."""
    try:
        yield
    except EngineError:
        raise
    except torch.cuda.OutOfMemoryError as error:
        raise EngineOutOfMemoryError(f"device out of memory: {str(error).splitlines()[0]}") from error
    except RuntimeError as error:
        if "out of memory" in str(error).lower():
            raise EngineOutOfMemoryError(f"out of memory: {str(error).splitlines()[0]}") from error
        raise EngineFailure(f"generation failed: {str(error).splitlines()[0]}") from error


class Engine:
    """A loaded model on one device. Not thread-safe: give it one worker.

    Step by step: ``admit`` items, call ``step`` until they are done, ``retire`` them (``cancel``
    drops one at any time). ``generate`` does all three for one batch, apart from the items
    admitted by those calls.
    """

    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        options: EngineOptions | None = None,
    ) -> None:
        self.components = components
        self.device = device
        self.dtype = dtype
        self.options = options or EngineOptions()
        self.accelerator = "none"
        self.accelerator_note = ""
        vae_config = components.vae.config
        self.vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)
        self.native_size = int(components.unet.config.sample_size) * self.vae_scale_factor
        self._prompts = PromptEncoder(device, dtype)
        decoder = self.options.preview_decoder
        self._preview_decoder = load_tiny_decoder(decoder, device, dtype) if decoder else None
        self._handles = itertools.count(1)
        self._running = RunningSet()
        self.adapters = Adapters(components)  # LoRA adapters: model/adapters.py

    # ------------------------------------------------------------------ description
    @property
    def info(self) -> ModelInfo:
        c = self.components
        return ModelInfo(
            name=c.name,
            architecture=c.architecture,
            native_height=self.native_size,
            native_width=self.native_size,
            schedulers=offered_schedulers(),
            default_scheduler=scheduler_name(c.scheduler),
            safety_checker=c.safety_checker is not None,
            device=str(self.device),
            dtype=_DTYPE_NAMES.get(self.dtype, str(self.dtype)),
            random_weights=c.random_weights,
            accelerator=self.accelerator,
            adapters=self.adapters.names,
            inpainting=is_inpainting_unet(c.unet),
        )

    # ------------------------------------------------------------------ validation
    def validate(self, items: Sequence[GenerationItem]) -> None:
        """Reject anything that cannot run as one ``generate`` batch, before any device work."""
        if not items:
            raise InvalidRequestError("empty batch: give at least one item")
        keys = {item.batch_key for item in items}
        if len(keys) > 1:
            raise InvalidRequestError(
                "items of one batch must share steps, height, width and scheduler; got "
                + ", ".join(str(k) for k in sorted(keys))
            )
        for item in items:
            self.validate_item(item)

    def validate_item(self, item: GenerationItem) -> None:
        """Reject an item this model cannot run, before any device work. Requests arrive checked
        against the field definitions of every way in (schemas/fields.py: types, bounds, text);
        what is checked here is what a caller of the engine can still get wrong: a step count, a
        latent grid, a seed, a guidance, a scheduler, adapters or image inputs (an image, a mask, a
        strength) that this model cannot take."""
        if item.num_inference_steps < 1:
            raise InvalidRequestError(
                f"num_inference_steps must be an integer >= 1, got {item.num_inference_steps}"
            )
        for side, value in (("height", item.height), ("width", item.width)):
            if value < 8 or value % 8:  # the VAE's grid
                raise InvalidRequestError(f"{side} must be a positive multiple of 8, got {value}")
        if not math.isfinite(item.guidance_scale):
            raise InvalidRequestError(f"guidance_scale must be finite, got {item.guidance_scale}")
        if not 0 <= item.seed <= MAX_SEED:  # what torch.Generator.manual_seed takes
            raise InvalidRequestError(f"seed must be an integer in [0, {MAX_SEED}], got {item.seed!r}")
        check_scheduler_name(item.scheduler)
        if item.eta and not (
            math.isfinite(item.eta) and takes_eta(self.components.scheduler, item.scheduler)
        ):
            raise InvalidRequestError(
                f"eta must be 0 with scheduler {item.scheduler!r}: only DDIM's step takes an eta"
            )
        layers = self.components.text_encoder.config.num_hidden_layers
        if not 0 <= item.clip_skip < layers:
            raise InvalidRequestError(
                f"clip_skip must be from 0 to {layers - 1} (AUTOMATIC1111's CLIP_stop_at_last_layers: 1 to "
                f"{layers}): this model's text encoder has {layers} layers"
            )
        self.adapters.check(item.adapters)
        check_images(item)

    # ------------------------------------------------------------------ step by step
    def admit(self, item: GenerationItem) -> int:
        """Validate, encode the prompt, draw the item's latents from its seed and make its
        scheduler. Returns its handle, unique for this engine's lifetime."""
        return self.admit_all([item])[0]

    def admit_all(self, items: Sequence[GenerationItem]) -> list[int]:
        """``admit`` for several items with one text-encoder call; all or none are admitted."""
        return self._admit(self._running, items)

    def admit_checked(self, items: Sequence[GenerationItem]) -> list[int]:
        """``admit_all`` for items the caller has checked with ``validate`` already (the step loop's:
        each request's items are checked once, before they queue), so no value is checked twice; only
        their adapters are looked at again, as what may change while an image waits is whether an
        adapter's file still reads (one replaced or broken since is refused here, not at its use)."""
        return self._admit(self._running, items, checked=True)

    def step(self, only: Collection[int] | None = None) -> list[int]:
        """Advance every running item one denoising step (one UNet call per size and adapter set,
        with a timestep per row), or only the handles in ``only`` (the others pause, their latents
        kept). Returns the handles whose last step is now done; they stay until retired. If it
        raises, no item has advanced."""
        return self._step(self._running, only)

    def retire(self, handles: Sequence[int]) -> list[GenerationResult]:
        """Decode finished items in one batch (per size) and run the safety checker; they leave
        the engine. ValueError (before device work) for a handle that is not a finished item;
        if decoding raises, they stay, still finished."""
        results = self._results(self._running.finished(handles))
        for handle in handles:
            self._running.discard(handle)
        return results

    def cancel(self, handle: int) -> None:
        """Drop a running or finished item at once; unknown handles are ignored."""
        self._running.discard(handle)

    def finish(self, handle: int) -> None:
        """End a running item at its current step: it is finished, and ``retire`` decodes the
        latents it has (AUTOMATIC1111's interrupt). Unknown handles are ignored."""
        state = self._running.get(handle)
        if state is not None:
            state.position = state.total_steps

    def preview(self, handle: int) -> np.ndarray:
        """A cheap preview of a running item: through the tiny decoder when one is loaded (full size),
        else its latents mapped linearly to RGB (1/8 of its side)."""
        state = self._running.get(handle)
        if state is None:
            raise ValueError(f"no item with handle {handle}")
        with _engine_errors(), torch.inference_mode():
            if self._preview_decoder is not None:
                return tiny_preview(self._preview_decoder, state.latents)
            return linear_preview(state.latents)

    # ------------------------------------------------------------------ whole batches
    def generate(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        """Generate one image per item; the policy for flagged images (all black) is already applied."""
        self.validate(items)
        return self._results(self._run_alone(items))

    def generate_float(self, items: Sequence[GenerationItem]) -> tuple[torch.Tensor, list[bool | None]]:
        """The same generation before 8-bit conversion: Bx3xHxW in [0,1] on the CPU (for comparisons)."""
        self.validate(items)
        images, flags = self._floats(self._run_alone(items))
        return torch.stack(images), flags

    def warmup(self) -> None:
        """Run the shapes requests will run, at the native size, so that compilation and CUDA-graph
        capture happen before readiness: with buckets, every UNet row bucket (several steps, as
        graphs are recorded on a later call than the first) and every decoder bucket."""
        size = self.native_size
        repeats = 3 if self.options.cuda_graphs else 1

        def items(guided: int, unguided: int, steps: int) -> list[GenerationItem]:
            scales = [7.5] * guided + [1.0] * unguided
            return [
                GenerationItem(
                    "warm-up", seed=i, num_inference_steps=steps, guidance_scale=g, height=size, width=size
                )
                for i, g in enumerate(scales)
            ]

        row_buckets = self.options.unet_row_buckets
        if row_buckets is None:
            self.generate(items(1, 0, 2))
            return
        decoders = self.options.decode_buckets or ()
        decoded = dict.fromkeys(decoders, 0)  # decodes run per decoder bucket
        for rows in row_buckets:
            batch = items(rows // 2, rows % 2, repeats)
            self._results(self._run_alone(batch))
            bucket = next((b for b in decoders if b >= len(batch)), None)
            if bucket is not None:
                decoded[bucket] += 1
        for count in decoders:
            for _ in range(repeats - decoded[count]):
                self._results(self._run_alone(items(0, count, 1)))

    def close(self) -> None:
        self.adapters.close()
        self._running = RunningSet()
        self.components = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ internals
    def _admit(
        self, running: RunningSet, items: Sequence[GenerationItem], checked: bool = False
    ) -> list[int]:
        for item in items:
            if checked:  # its values were checked; its adapters' files may have broken since
                self.adapters.check(item.adapters)
            else:
                self.validate_item(item)
        handles = [next(self._handles) for _ in items]
        if not items:
            return handles
        # their adapters on the device (a step loop asks ``adapters.ready`` first: then a no-op)
        in_use = self._in_use(running) | {name for item in items for name, _ in item.adapters}
        for adapters in dict.fromkeys(item.adapters for item in items):
            self.adapters.ensure(adapters, in_use)
        with _engine_errors(), torch.inference_mode():
            states = admit_items(
                self.components, self._prompts, items, handles, self.vae_scale_factor, self.adapters.activate
            )
        running.add(states)
        return handles

    def install_adapters(self, wait: float = 0.0) -> None:
        """At a step boundary: put the adapters whose files were read (``adapters.request``) on the
        device, the least recently used ones no running image uses out (model/adapters). Never
        raises: an adapter that fails is marked broken there, and its images are refused."""
        try:  # outside inference mode, as load_lora_weights runs: peft makes parameters
            self.adapters.install_pending(self._in_use(self._running), wait)
        except Exception:  # the step loop must go on for the other images
            log.exception("putting LoRA adapters on the device failed")

    def place_adapters(self, evict: Sequence[str], install: Sequence[str]) -> dict[str, str]:
        """At a step boundary, as the step loop's scheduler planned: LoRA adapters off the device,
        then on (model/adapters). Never raises: returns the adapters that failed, with why."""
        try:  # outside inference mode, as load_lora_weights runs: peft makes parameters
            return self.adapters.place(evict, install)
        except Exception as error:  # the step loop must go on for the other images
            log.exception("putting LoRA adapters on the device failed")
            return dict.fromkeys(install, f"it could not be put on the device ({type(error).__name__})")

    def _in_use(self, running: RunningSet) -> set[str]:
        in_use = {name for state in self._running.active for name, _ in state.item.adapters}
        return in_use | {name for state in running.active for name, _ in state.item.adapters}

    def _step(self, running: RunningSet, only: Collection[int] | None = None) -> list[int]:
        forward = unet_forward(self.components.unet, self.options.cuda_graphs)
        with _engine_errors(), torch.inference_mode():
            return running.step(forward, self.options.unet_row_buckets, self.adapters.activate, only)

    def _run_alone(self, items: Sequence[GenerationItem]) -> list[ItemState]:
        """Admit ``items`` to a set of their own and step it until all are done."""
        running = RunningSet()
        handles = self._admit(running, items)
        while running.active:
            self._step(running)
        return running.finished(handles)

    def _results(self, states: list[ItemState]) -> list[GenerationResult]:
        if not states:
            return []
        with _engine_errors(), torch.inference_mode():
            images, flags, order = self._decoded(states)
            results = to_results(images, flags, [states[i].item.seed for i in order])
        by_index = dict(zip(order, results, strict=True))
        return [by_index[index] for index in range(len(states))]

    def _floats(self, states: list[ItemState]) -> tuple[list[torch.Tensor], list[bool | None]]:
        if not states:
            return [], []
        with _engine_errors(), torch.inference_mode():
            images, flags, order = self._decoded(states)
            host = [image for group in images for image in group.float().cpu()]
            host_flags: list[bool | None] = []
            for group, group_flags in zip(images, flags, strict=True):
                host_flags.extend(group_flags.tolist() if group_flags is not None else [None] * len(group))
        by_index = dict(zip(order, zip(host, host_flags, strict=True), strict=True))
        return [by_index[i][0] for i in range(len(states))], [by_index[i][1] for i in range(len(states))]

    def _decoded(
        self, states: list[ItemState]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[int]]:
        """Images and flags of ``states``, one decode per size: the groups and the index of each
        of their images in ``states``."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, state in enumerate(states):
            groups.setdefault(state.size, []).append(index)
        images, flags, order = [], [], []
        for indices in groups.values():
            latents = torch.cat([states[i].latents for i in indices])
            decoded = decode(
                self.components.vae,
                latents,
                self.options.decode_buckets,
                self.options.check_finite,
                self.options.cuda_graphs,
            )
            checked, group_flags = safety(self.components, decoded)
            images.append(checked)
            flags.append(group_flags)
            order.extend(indices)
        return images, flags, order
