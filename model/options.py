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
    tensor cores). ``batch_buckets``: with CUDA graphs, batches are padded up to the next bucket so
    a handful of captured graphs serve every batch size.
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

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise InvalidRequestError(f"unknown accelerator {self.accelerator!r}; use one of {ACCELERATORS}")

    @property
    def compiled(self) -> bool:
        return self.compile or self.cuda_graphs

    def bucket(self, size: int) -> int:
        """The padded batch size that ``size`` items run at: compiled code and CUDA graphs are
        specialised on shapes, so a few buckets bound recompiles and captures."""
        if not self.compiled:
            return size
        return next((b for b in sorted(self.batch_buckets) if b >= size), size)


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
