"""Load a diffusers folder one component at a time, so that every failure names its component and
file, and each network picks the weight variant its folder holds.

Why not ``StableDiffusionPipeline.from_pretrained``: its errors name the model's root (a missing
``unet/`` reads "no file named config.json found in directory ROOT"), or nothing at all ("Cannot
load  because ..."), and it asks for one variant across every component, so a folder holding only
``*.fp16.safetensors`` fails unless told. Here each component is loaded by the class its
model_index.json names, after checks that a user can act on.
"""

from __future__ import annotations

import importlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import torch

from model.errors import ModelLoadError

# The networks (weights of their own) and the files diffusers and transformers write for them.
NETWORKS = ("unet", "vae", "text_encoder", "safety_checker")
OPTIONAL = ("safety_checker", "feature_extractor")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor")
_WEIGHTS = re.compile(
    r"(?P<stem>diffusion_pytorch_model|model)(?:-\d+-of-\d+)?(?:\.(?P<variant>[A-Za-z0-9_-]+))?"
    r"\.(?P<format>safetensors|bin)"
)
_LIBRARIES = ("diffusers", "transformers")
_REDOWNLOAD = "copy or download it again"


def read_json(path: Path, label: str) -> Any:
    """A config file's JSON; ModelLoadError, led by ``label`` (what the user knows it as), when it
    cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelLoadError(f"{label}: {path} cannot be read as JSON ({error}); {_REDOWNLOAD}") from None


def read_index(folder: Path) -> dict[str, tuple[str, str] | None]:
    """model_index.json: component -> (library, class), None for one listed as [null, null]."""
    path = folder / "model_index.json"
    data = read_json(path, "model_index.json")
    index: dict[str, tuple[str, str] | None] = {}
    for name in COMPONENTS:
        entry = data.get(name) if isinstance(data, dict) else None
        if isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry):
            index[name] = (entry[0], entry[1])
        elif name in OPTIONAL and (entry is None or entry == [None, None]):
            index[name] = None
        else:
            raise ModelLoadError(
                f"{path} does not name the {name} component as [library, class]; this is not a "
                f"Stable Diffusion pipeline folder, or its model_index.json is damaged ({_REDOWNLOAD})"
            )
    return index


def weight_variants(part: Path) -> dict[str | None, list[Path]]:
    """The weight files in a component folder, by variant (None: the plain files)."""
    found: dict[str | None, list[Path]] = {}
    for file in sorted(part.iterdir()):
        match = _WEIGHTS.fullmatch(file.name)
        if match and file.is_file():
            found.setdefault(match.group("variant"), []).append(file)
    return found


def choose_variant(part: Path, name: str, requested: str | None) -> tuple[str | None, list[Path]]:
    """The variant to load for one network and its files: SD_MODEL_VARIANT when set, else the plain
    files, else the only variant there is."""
    variants = weight_variants(part)
    listed = ", ".join(sorted(v or "plain" for v in variants)) or "none"
    if requested is not None:
        if requested not in variants:
            raise ModelLoadError(
                f"{name}: {part} holds no {requested!r} weights (it has: {listed}); set SD_MODEL_VARIANT "
                "to one of those, or unset it"
            )
        return requested, variants[requested]
    if None in variants:
        return None, variants[None]
    if len(variants) == 1:
        variant = next(iter(variants))
        return variant, variants[variant]
    if not variants:
        raise ModelLoadError(
            f"{name}: {part} holds no weights (expected diffusion_pytorch_model.safetensors or "
            f"model.safetensors, or .bin); {_REDOWNLOAD}"
        )
    raise ModelLoadError(
        f"{name}: {part} holds several weight variants ({listed}); set SD_MODEL_VARIANT to one"
    )


def check_weights(name: str, files: list[Path]) -> None:
    """Empty and truncated files, found before a library reports them without a file name."""
    for file in files:
        size = file.stat().st_size
        if size == 0:
            raise ModelLoadError(f"{name}: {file} is empty (0 bytes); {_REDOWNLOAD}")
        if file.suffix == ".safetensors":
            _check_safetensors(name, file, size)


def _check_safetensors(name: str, file: Path, size: int) -> None:
    """The header (an 8-byte length, then JSON) must be whole, and so must the data it describes."""
    with file.open("rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = handle.read(length) if 0 <= length <= size else b""
    try:
        if len(header) != length or length <= 0:
            raise ValueError("its header is cut off")
        entries = json.loads(header)
        end = max(
            (entry["data_offsets"][1] for key, entry in entries.items() if key != "__metadata__"), default=0
        )
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise ModelLoadError(
            f"{name}: {file} is not a whole safetensors file ({error}); {_REDOWNLOAD}"
        ) from None
    if 8 + length + end > size:
        raise ModelLoadError(
            f"{name}: {file} is truncated ({size} bytes; its header describes {8 + length + end}); "
            + _REDOWNLOAD
        )


def check_component(folder: Path, name: str, requested: str | None) -> str | None:
    """One listed component's folder, checked before it loads; the variant its weights are in."""
    part = folder / name
    advice = (
        f"; restore it, or set {name} to [null, null] in model_index.json to go without it"
        if name in OPTIONAL
        else f"; {_REDOWNLOAD}"
    )
    if not part.is_dir():
        raise ModelLoadError(
            f"{name}: {folder}/model_index.json lists it, but there is no folder {part}{advice}"
        )
    if not any(part.iterdir()):
        raise ModelLoadError(f"{name}: the folder {part} is empty{advice}")
    if name not in NETWORKS:
        return None
    if not (part / "config.json").is_file():
        raise ModelLoadError(f"{name}: {part} has no config.json{advice}")
    variant, files = choose_variant(part, name, requested)
    check_weights(name, files)
    return variant


def load_folder(folder: Path, dtype: torch.dtype, requested_variant: str | None) -> dict[str, Any]:
    """Every component of the diffusers folder ``folder``, on the CPU in ``dtype``.

    Steps: 1) model_index.json, 2) every listed component's folder and files, 3) each loaded by
    its class, its failure named after it.
    """
    # 1) what the pipeline is made of
    index = read_index(folder)
    # 2) all checks before anything loads (seconds on a full model): the first problem, named
    variants = {
        name: check_component(folder, name, requested_variant) for name, entry in index.items() if entry
    }
    # 3) the components
    parts: dict[str, Any] = {name: None for name in COMPONENTS}
    for name, entry in index.items():
        if entry is not None:
            parts[name] = _load_one(folder, name, entry, dtype, variants[name])
    return parts


def _load_one(
    folder: Path, name: str, entry: tuple[str, str], dtype: torch.dtype, variant: str | None
) -> Any:
    library, class_name = entry
    component_class = getattr(_library(library), class_name, None)
    if component_class is None or not hasattr(component_class, "from_pretrained"):
        raise ModelLoadError(
            f"{name}: {folder}/model_index.json names {library}.{class_name}, which this version of "
            f"{library} does not have; use a diffusers Stable Diffusion folder (or upgrade {library})"
        )
    part = folder / name
    try:
        if name in NETWORKS:
            loaded = component_class.from_pretrained(part, dtype=dtype, variant=variant)
            return loaded.eval()
        return component_class.from_pretrained(part)
    except Exception as error:  # the libraries raise many types; every one means "this part is bad"
        raise ModelLoadError(f"{name}: {part} could not be loaded: {describe(error)}") from error


def _library(name: str) -> Any:
    """The module a model_index.json entry names: diffusers, transformers, or a diffusers pipeline
    module (the safety checker's "stable_diffusion"); None for anything else."""
    if name in _LIBRARIES:
        return importlib.import_module(name)
    if name.isidentifier():
        try:
            return importlib.import_module(f"diffusers.pipelines.{name}")
        except ImportError:
            return None
    return None


def describe(error: Exception) -> str:
    """A library's error as one line that says what to do (and never the keyword we do not expose)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if "expected shape" in text or "size mismatch" in text or "shape in current model" in text:
        # diffusers: "Cannot load  because KEY expected shape torch.Size([..]), but got torch.Size([..])"
        shapes = re.search(
            r"(\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got torch\.Size\((\[[^\]]*\])\)", text
        )
        detail = f" ({shapes[1]}: config.json says {shapes[2]}, the weights {shapes[3]})" if shapes else ""
        return (
            f"its weights do not fit its config.json{detail}; the config and the weights come from "
            "different models: take both from the same source"
        )
    text = text.split(" If you want to instead overwrite")[0]
    return text if len(text) <= 300 else text[:297] + "..."
