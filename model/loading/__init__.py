"""Turn a model spec string into pipeline components.

Specs: ``random:<arch>[:<seed>]``, a local diffusers folder, an Azure ML model folder (the
diffusers folder lies below it), or a Hugging Face Hub id.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.architectures import build_components
from model.errors import ModelLoadError
from model.export import RANDOM_MARKER
from model.loading.folders import load_folder
from model.loading.single_file import SUFFIXES as SINGLE_FILE_SUFFIXES
from model.loading.single_file import load_single_file
from model.types import ARCHITECTURES

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
# Where Azure ML's model catalog puts the diffusers folder inside a registered model.
AZUREML_MODEL_SUBDIR = Path("mlflow_model_folder") / "artifacts" / "INPUT_model_path"
_SEARCH_DEPTH = 4
# Held while components are read or built. diffusers and transformers build models inside
# process-wide contexts (accelerate's init_empty_weights patches nn.Module for every thread, torch's
# default dtype, torch.nn.init, the global generator for random weights): a second load running in
# another thread meanwhile builds meta tensors ("Unsupported device type 'meta'") or takes the other
# load's dtype. Reading is serialised; moving to the devices, the slow part, stays parallel.
READING = threading.RLock()


@dataclass
class Components:
    """The pieces of a Stable Diffusion pipeline, plus what we know about where they came from."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    safety_checker: Any | None
    feature_extractor: Any | None
    name: str
    architecture: str
    random_weights: bool

    def to(self, device: torch.device | str) -> Components:
        """Move every network (not the tokenizer, scheduler or processor) to ``device``."""
        for module in (self.unet, self.vae, self.text_encoder, self.safety_checker):
            if module is not None:
                module.to(device)
        return self

    def modules(self) -> dict[str, Any]:
        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": self.scheduler,
            "safety_checker": self.safety_checker,
            "feature_extractor": self.feature_extractor,
        }


def parse_random_spec(spec: str) -> tuple[str, int]:
    """``random:tiny`` -> ("tiny", 0); ``random:sd-v1-4:7`` -> ("sd-v1-4", 7)."""
    arch, _, seed_text = spec[len(RANDOM_PREFIX) :].partition(":")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"unknown random model {spec!r}; use random:{{{','.join(ARCHITECTURES)}}}[:seed]"
        )
    try:
        seed = int(seed_text) if seed_text else 0
    except ValueError:
        raise ModelLoadError(f"bad seed in {spec!r}: expected random:<arch>:<integer>") from None
    return arch, seed


def find_diffusers_folder(path: Path) -> Path:
    """The folder holding model_index.json: ``path`` itself, Azure's catalog layout, or the only one below."""
    if (path / "model_index.json").is_file():
        return path
    if (path / AZUREML_MODEL_SUBDIR / "model_index.json").is_file():
        return path / AZUREML_MODEL_SUBDIR
    found = sorted(
        index.parent
        for index in path.rglob("model_index.json")
        if len(index.relative_to(path).parts) <= _SEARCH_DEPTH + 1
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelLoadError(
            f"no diffusers model in {path}: expected model_index.json there or below it "
            f"(Azure ML catalog models keep it in {AZUREML_MODEL_SUBDIR})"
        )
    raise ModelLoadError(f"several diffusers models below {path}: {', '.join(map(str, found))}; name one")


def _architecture_of(unet_config: Any) -> str:
    cross = unet_config.cross_attention_dim
    if unet_config.block_out_channels[0] == 320:
        return "sd-2-base" if cross == 1024 else "sd-v1-4" if cross == 768 else f"sd-unet-{cross}"
    return "custom"


def _from_folder(folder: Path, dtype: torch.dtype, name: str, variant: str | None) -> Components:
    parts = load_folder(folder, dtype, variant)
    return Components(
        **parts, name=name, architecture=_architecture_of(parts["unet"].config), random_weights=False
    )


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def load_components(
    spec: str, dtype: torch.dtype, variant: str | None = None, config: str | None = None
) -> Components:
    """Resolve ``spec`` and load its components on the CPU in ``dtype``; ``variant`` picks the
    weight files (``fp16``: ``*.fp16.safetensors``) where a folder holds several; ``config`` (a
    diffusers folder or cached hub id) describes a single checkpoint file of another architecture.

    Steps: 1) random architectures, 2) local folders (plain or Azure ML layout), 3) hub ids.
    One read at a time in the process (READING says why).
    """
    with READING:
        return _load_components(spec, dtype, variant, config)


def _load_components(spec: str, dtype: torch.dtype, variant: str | None, config: str | None) -> Components:
    # 1) built in process, no files at all
    if spec.startswith(RANDOM_PREFIX):
        arch, seed = parse_random_spec(spec)
        parts = build_components(arch, seed)
        for key in ("unet", "vae", "text_encoder", "safety_checker"):
            if parts[key] is not None and dtype != torch.float32:
                parts[key] = parts[key].to(dtype)
        return Components(**parts, name=spec, architecture=arch, random_weights=True)
    # 2) a folder on disk
    path = Path(os.path.expanduser(spec))
    if path.exists():
        if not path.is_dir():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(
                    f"model path {path} is a file but not a checkpoint; give a .safetensors or .ckpt file, "
                    "or the folder that holds model_index.json"
                )
            parts, architecture = load_single_file(path, dtype, config)
            return Components(**parts, name=str(path), architecture=architecture, random_weights=False)
        folder = find_diffusers_folder(path)
        components = _from_folder(folder, dtype, str(path), variant)
        marker = folder / RANDOM_MARKER
        if marker.is_file():  # written by make-model: "random:<arch>:<seed>"
            components.random_weights = True
            components.architecture = marker.read_text().strip().split(":")[1]
        return components
    # 3) the Hugging Face Hub (its cache first: offline, a cached id resolves without a network)
    if not _looks_like_hub_id(spec):
        raise ModelLoadError(
            f"model {spec!r} is neither an existing folder (looked for {path.absolute()}), a hub id "
            "(org/name) nor random:<arch>; check the path"
        )
    try:
        folder = Path(_download(spec, variant))
    except Exception as error:  # the hub client raises many types; all mean "not available here"
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise ModelLoadError(
            f"model {spec!r} is no folder here (looked for {path.absolute()}), and as a Hugging Face Hub id "
            f"it is neither in the local cache nor downloadable ({reason}). Fix the path, or, without a "
            "network, set SD_MODEL (or --model) to a local diffusers folder, e.g. one written by "
            "`sd-endpoint make-model`"
        ) from None
    return _from_folder(folder, dtype, spec, variant)


def _download(spec: str, variant: str | None) -> str:
    """The hub id's folder in the Hugging Face cache, fetched if it is not there yet."""
    from diffusers import StableDiffusionPipeline

    return str(StableDiffusionPipeline.download(spec, variant=variant))


def load_safety_checker(folder: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """A checker configured apart from the model: a folder with safety_checker/ + feature_extractor/."""
    with READING:
        return _load_safety_checker(folder, dtype)


def _load_safety_checker(folder: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    root = Path(folder)
    if not (root / "safety_checker").is_dir():
        root = find_diffusers_folder(root) if root.is_dir() else root
    if not (root / "safety_checker").is_dir() or not (root / "feature_extractor").is_dir():
        raise ModelLoadError(
            f"safety checker folder {folder} must contain safety_checker/ and feature_extractor/"
        )
    checker = StableDiffusionSafetyChecker.from_pretrained(root / "safety_checker", dtype=dtype)
    extractor = CLIPImageProcessor.from_pretrained(root / "feature_extractor")
    return checker.eval(), extractor
