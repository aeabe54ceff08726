"""Engine options: devices, precision and the GPU optimisations that keep the math unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.errors import InvalidRequestError

DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
ACCELERATORS = ("none", "deepspeed")


@dataclass(frozen=True)
class EngineOptions:
    """How to run the model. Defaults suit a CPU; ``for_device`` picks GPU defaults.

    ``channels_last`` and ``fuse_qkv``: None means on for CUDA, off elsewhere (they only pay on
    tensor cores). Buckets: compiled code and CUDA graphs are specialised on shapes, so with
    ``pad_to_buckets`` (None: whenever compiled) each UNet call is padded to the next of
    ``row_buckets`` rows (None: 1 and twice each of ``batch_buckets``, as a guided image takes
    two rows) and each decode to the next of ``batch_buckets`` images; warm-up captures them all.
    """

    channels_last: bool | None = None
    fuse_qkv: bool | None = None
    compile: bool = False
    compile_mode: str = "default"
    cuda_graphs: bool = False
    accelerator: str = "none"
    compile_cache_dir: str | None = None
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)
    check_finite: bool = True
    row_buckets: tuple[int, ...] | None = None
    pad_to_buckets: bool | None = None
    preview_decoder: str | None = None  # an AutoencoderTiny folder for previews; None: linear

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise InvalidRequestError(f"unknown accelerator {self.accelerator!r}; use one of {ACCELERATORS}")
        for name in ("batch_buckets", "row_buckets"):
            buckets = getattr(self, name)
            if buckets is not None and (
                not buckets
                or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in buckets)
            ):
                raise InvalidRequestError(f"{name} must be positive integers, got {buckets!r}")

    @property
    def compiled(self) -> bool:
        return self.compile or self.cuda_graphs

    @property
    def padded(self) -> bool:
        return self.compiled if self.pad_to_buckets is None else self.pad_to_buckets

    @property
    def unet_row_buckets(self) -> tuple[int, ...] | None:
        """The row counts UNet calls are padded to; None when calls are not padded."""
        if not self.padded:
            return None
        rows = self.row_buckets or (1, *(2 * b for b in self.batch_buckets))
        return tuple(sorted(set(rows)))

    @property
    def decode_buckets(self) -> tuple[int, ...] | None:
        """The image counts VAE decodes are padded to; None when decodes are not padded."""
        return tuple(sorted(set(self.batch_buckets))) if self.padded else None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and fp32 on CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; use one of auto, fp32, fp16, bf16")
    return DTYPES[dtype]
