"""The model library (SD_MODELS), checked at start-up without loading a single weight.

Why: a server of several models must know before it is ready which ones it can serve, what each
is (architecture, inpainting, native size, bytes to move) and which are broken, in one line each.
Loading every model to find out takes minutes and all the memory; configs, listings, sizes and
safetensors headers take milliseconds and show what the loader would stop at (model/loading, whose
functions decide here too). Never a tensor is read: a file with damaged data but a whole header
passes here and fails when it loads. A ``.ckpt`` (a pickle: nothing to read without unpickling
it) is accepted by its suffix.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

from model.errors import ModelLoadError

# Every model here inpaints: a 4-channel one by blending its latents with the kept image's
# (model/stepping/images.py), a 9-channel one as diffusers' inpainting pipeline does, and the
# latter runs text to image as an inpainting with nothing kept.
CAPABILITIES = ("text-to-image", "image-to-image", "inpainting")
INPAINTING_CHANNELS = 9
# What a request and an A1111 title ("name [hash]") can carry as is: no spaces, slashes, brackets,
# colons or percent signs. Hub ids ("org/name") and random specs keep their own form.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_DEFAULT_SIZE = 512  # SD 1.x and 2.x base: what a .ckpt without configs most likely is
_RANDOM = "random:"


@dataclass(frozen=True)
class ModelEntry:
    """One servable model: what requests call it, what the loader takes, and what it is."""

    name: str
    spec: str
    architecture: str
    inpainting: bool
    native_height: int
    native_width: int
    bytes: int
    config: str | None = None  # a diffusers folder whose configs describe a single file
    variant: str | None = None

    @property
    def capabilities(self) -> tuple[str, ...]:
        return CAPABILITIES

    @property
    def kind(self) -> str:
        """What the model was made for: a 9-channel UNet was trained to inpaint."""
        return "inpainting" if self.inpainting else "text-to-image"


class LibraryProblem(NamedTuple):
    """An entry left out of the library, and why, as one line to log."""

    entry: str
    reason: str


class _Shape:
    """A tensor as a safetensors header describes it: what ``recognise`` and ``unet_channels`` look
    at (``shape`` and ``dim()``), without the data."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = tuple(shape)

    def dim(self) -> int:
        return len(self.shape)


def entry_name(path_or_spec: str) -> str:
    """What requests call a model: a folder's name, a checkpoint file's name without its last
    suffix (``model.fp16.safetensors`` -> ``model.fp16``: the variant stays in the name, so that it
    and ``model.safetensors`` beside it are two models), a random spec or a hub id as written."""
    from model.loading.single_file import SUFFIXES

    spec = path_or_spec.strip()
    if spec.startswith(_RANDOM):
        return spec
    path = Path(os.path.expanduser(spec))
    if not path.exists() and _hub_id(spec):
        return spec
    return path.stem if path.suffix in SUFFIXES and not path.is_dir() else path.name


def inspect_entry(
    spec: str, name: str | None = None, *, config: str | None = None, variant: str | None = None
) -> ModelEntry:
    """The entry ``spec`` is, checked as the loader would check it but without its weights.

    Raises ModelLoadError with one line that names the entry, says why it cannot serve, and what
    to do.
    """
    label = name or entry_name(spec)
    try:
        return _inspect(spec.strip(), name, config, variant)
    except ModelLoadError as error:
        raise ModelLoadError(f"{label}: {_one_line(error)}") from None


def scan_library(
    models: str, *, config: str | None = None, variant: str | None = None
) -> tuple[list[ModelEntry], list[LibraryProblem]]:
    """The servable entries of SD_MODELS and the problems of the others; never raises.

    ``models`` is a library folder (its entries sorted by name; hidden entries and files that are
    no checkpoint are passed over in silence), or a comma list of specs, each ``spec`` or
    ``name=spec``, kept in order. A folder that is itself one model (model_index.json in it, or
    Azure ML's layout) is a library of that one model. Two entries of one name: the second is a
    problem, even when the first is broken, so that fixing one never changes what a name serves.
    """
    items = _directory_items(Path(os.path.expanduser(models.strip())), config)
    if items is None:
        items = [(*_split(item), config) for item in models.split(",") if item.strip()]
    entries: list[ModelEntry] = []
    problems: list[LibraryProblem] = []
    seen: dict[str, str] = {}
    for name, spec, entry_config in items:
        label = name or spec
        try:
            label = name or entry_name(spec)
            if label in seen:
                raise ModelLoadError(
                    f"{spec} is called {label!r} like {seen[label]}, listed before it; rename one, or list "
                    "them in SD_MODELS as name=spec with names of their own"
                )
            seen[label] = spec
            entries.append(_inspect(spec, label, entry_config, variant))
        except ModelLoadError as error:
            problems.append(LibraryProblem(label, _one_line(error)))
        except OSError as error:  # a file that vanished or cannot be read while it was looked at
            problems.append(LibraryProblem(label, f"{spec} cannot be read ({error}); check it"))
    return entries, problems


def resolve_folder(spec: str) -> Path:
    """The diffusers folder (model_index.json's) of a folder spec, an Azure ML model folder or a
    hub id in the local Hugging Face cache (never downloaded: a start-up check must not fetch GBs)."""
    from model.loading import find_diffusers_folder

    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return find_diffusers_folder(path)
    if not _hub_id(spec):
        raise ModelLoadError(
            f"{spec!r} is neither an existing folder or checkpoint file (looked for {path.absolute()}), "
            "a hub id (org/name) nor random:<arch>; check the path"
        )
    from huggingface_hub import snapshot_download

    try:
        return find_diffusers_folder(Path(snapshot_download(spec, local_files_only=True)))
    except ModelLoadError:
        raise
    except Exception as error:  # the hub client raises many types; all mean "not cached here"
        raise ModelLoadError(
            f"{spec!r} is no folder here, and as a Hugging Face Hub id it is not in the local cache "
            f"({type(error).__name__}); download it first (hf download {spec}), or give a "
            "local folder"
        ) from None


def network_files(folder: Path, variant: str | None) -> dict[str, tuple[str | None, list[Path]]]:
    """The variant and weight files the loader would read for each network the folder lists,
    checked as it checks them (present, not empty, whole safetensors headers), no tensor read."""
    from model.loading.folders import NETWORKS, check_component, choose_variant, read_index

    index = read_index(folder)
    chosen = {name: check_component(folder, name, variant) for name, entry in index.items() if entry}
    return {
        name: choose_variant(folder / name, name, chosen[name])
        for name in NETWORKS
        if index.get(name) is not None
    }


# ---------------------------------------------------------------------------------------- inspecting
def _inspect(spec: str, name: str | None, config: str | None, variant: str | None) -> ModelEntry:
    name = name or entry_name(spec)
    if not (_NAME.fullmatch(name) or (name == spec and (spec.startswith(_RANDOM) or _hub_id(spec)))):
        raise ModelLoadError(
            f"{name!r} cannot name a model in URLs and A1111 titles (letters, digits, '.', '_', '+' and "
            "'-' only, at most 128); rename it, or list it in SD_MODELS as name=spec"
        )
    if spec.startswith(_RANDOM):
        return _random(spec, name)
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return _single_file(path.absolute(), name, config)
    folder = resolve_folder(spec)
    shown = str(path.absolute()) if path.is_dir() else spec
    return _folder(folder, shown, name, variant)


def _random(spec: str, name: str) -> ModelEntry:
    """A random model's description comes from its architecture's configs; nothing is built."""
    from model.architectures import CONFIGS
    from model.loading import parse_random_spec

    arch, _ = parse_random_spec(spec)
    unet = CONFIGS[arch].unet
    size = int(unet["sample_size"]) * _scale_factor(CONFIGS[arch].vae)
    return ModelEntry(name, spec, arch, int(unet["in_channels"]) == INPAINTING_CHANNELS, size, size, 0)


def _folder(folder: Path, spec: str, name: str, variant: str | None) -> ModelEntry:
    from model.export import RANDOM_MARKER

    files = network_files(folder, variant)
    unet = _config(folder / "unet")
    marker = folder / RANDOM_MARKER
    if marker.is_file():  # written by make-model: "random:<arch>:<seed>", as load_components reads it
        architecture = marker.read_text(encoding="utf-8").strip().split(":")[1]
    else:
        architecture = architecture_of(unet)
    channels, height, width = _unet_fields(unet, folder)
    chosen = {found for found, _ in files.values()}
    return ModelEntry(
        name=name,
        spec=spec,
        architecture=architecture,
        inpainting=channels == INPAINTING_CHANNELS,
        native_height=height,
        native_width=width,
        bytes=sum(file.stat().st_size for _, paths in files.values() for file in paths),
        variant=variant if variant is not None else (chosen.pop() if len(chosen) == 1 else None),
    )


def _single_file(path: Path, name: str, config: str | None) -> ModelEntry:
    """A checkpoint file: its header says what it is; its configs (SD_MODEL_CONFIG, else a diffusers
    folder of the same name beside it) describe what it does not. Named as the loader names it: the
    published architecture its tensors match, else the configs' (else "unknown": a .ckpt unread)."""
    from model.loading.folders import check_weights
    from model.loading.single_file import SUFFIXES, recognise, unet_channels

    if path.suffix not in SUFFIXES:
        raise ModelLoadError(
            f"{path} is a file but not a checkpoint; give a .safetensors or .ckpt file, or the folder "
            "that holds model_index.json"
        )
    check_weights("checkpoint", [path])  # empty, or a safetensors header cut off or describing more
    configs = resolve_folder(config) if config else _beside(path)
    unet = _config(configs / "unet") if configs else None
    channels, height, width = 4, _DEFAULT_SIZE, _DEFAULT_SIZE
    architecture = "unknown" if path.suffix == ".ckpt" else None
    if unet is not None and configs is not None:
        channels, height, width = _unet_fields(unet, configs)
        architecture = architecture_of(unet)
    if path.suffix == ".safetensors":
        tensors = {
            key: _Shape(entry["shape"]) for key, entry in _header(path).items() if key != "__metadata__"
        }
        recognised, channels = recognise(tensors), unet_channels(tensors)
        if recognised and unet is None:
            from model.architectures import CONFIGS

            arch = CONFIGS[recognised]
            height = width = int(arch.unet["sample_size"]) * _scale_factor(arch.vae)
        architecture = recognised or architecture
    if architecture is None:
        raise ModelLoadError(
            f"{path}: its architecture is not one of the published SD 1.x or 2.x ones; put the diffusers "
            f"configs of the model it was made from beside it in {path.with_suffix('')}/, or set "
            "SD_MODEL_CONFIG"
        )
    return ModelEntry(
        name=name,
        spec=str(path),
        architecture=architecture,
        inpainting=channels == INPAINTING_CHANNELS,
        native_height=height,
        native_width=width,
        bytes=path.stat().st_size,
        config=str(configs) if configs else None,
    )


def architecture_of(unet_config: dict[str, Any]) -> str:
    """The loader's name for a UNet config (``_architecture_of``), from its config.json alone."""
    from model.loading import _architecture_of

    try:
        fields = SimpleNamespace(
            cross_attention_dim=unet_config["cross_attention_dim"],
            block_out_channels=list(unet_config["block_out_channels"]),
        )
        return _architecture_of(fields)
    except (KeyError, TypeError, IndexError) as error:
        raise ModelLoadError(
            f"unet: its config.json lacks or mangles {error}; copy or download it again"
        ) from None


# ---------------------------------------------------------------------------------------- the pieces
def _directory_items(root: Path, config: str | None) -> list[tuple[str | None, str, str | None]] | None:
    """A library folder's entries as (name, spec, config), sorted; None when ``root`` is no library
    folder (not a folder, or a folder that is one model)."""
    from model.loading import AZUREML_MODEL_SUBDIR
    from model.loading.single_file import SUFFIXES

    if not root.is_dir() or any(
        (root / sub / "model_index.json").is_file() for sub in (".", AZUREML_MODEL_SUBDIR)
    ):
        return None
    children = [child for child in root.iterdir() if not child.name.startswith(".")]
    files = {child.stem for child in children if child.suffix in SUFFIXES and child.is_file()}
    found = []
    for child in children:
        if child.is_dir() and child.name in files:
            continue  # the configs of the checkpoint of its name (mymodel/ beside mymodel.safetensors)
        if child.is_dir() or child.suffix in SUFFIXES:
            found.append((entry_name(str(child)), child.name, str(child)))
    return [(None, spec, config) for _, _, spec in sorted(found)]


def _split(item: str) -> tuple[str | None, str]:
    """``name=spec`` -> (name, spec); a spec alone -> (None, spec). Only a plain name before the
    first '=' names: a path with '=' in it stays a path."""
    name, equals, spec = item.strip().partition("=")
    if equals and name.strip() and not any(mark in name for mark in "/\\:"):
        return name.strip(), spec.strip()
    return None, item.strip()


def _beside(path: Path) -> Path | None:
    """``mymodel/`` beside ``mymodel.safetensors`` when it is a diffusers folder (its configs)."""
    folder = path.with_suffix("")
    return folder if (folder / "model_index.json").is_file() else None


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (check_weights has found it whole): names, dtypes, shapes."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    if not isinstance(header, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("shape"), list)
        for key, entry in header.items()
        if key != "__metadata__"
    ):
        raise ModelLoadError(f"{path} is not a whole safetensors file (its header lists no shapes)")
    return header


def _config(part: Path) -> dict[str, Any]:
    from model.loading.folders import read_json

    path = part / "config.json"
    data = read_json(path, part.name)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{part.name}: {path} is not a JSON object; copy or download it again")
    return data


def _unet_fields(unet: dict[str, Any], folder: Path) -> tuple[int, int, int]:
    """(in_channels, native height, native width) from a UNet config and its folder's VAE."""
    channels, size = unet.get("in_channels", 4), unet.get("sample_size", 64)
    sizes = size if isinstance(size, list) and len(size) == 2 else [size, size]
    if not isinstance(channels, int) or not all(isinstance(v, int) and v > 0 for v in sizes):
        raise ModelLoadError(
            f"unet: {folder}/unet/config.json has in_channels {channels!r} and sample_size {size!r}, "
            "which are no numbers; copy or download it again"
        )
    scale = _vae_scale(folder)
    return channels, sizes[0] * scale, sizes[1] * scale


def _vae_scale(folder: Path) -> int:
    """The VAE's downscaling, as diffusers' pipelines compute it; 8 (SD's) without a VAE config."""
    if not (folder / "vae" / "config.json").is_file():
        return 8
    return _scale_factor(_config(folder / "vae"))


def _scale_factor(vae: dict[str, Any]) -> int:
    blocks = vae.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list | tuple) and blocks else 8


def _hub_id(spec: str) -> bool:
    from model.loading import _looks_like_hub_id

    return _looks_like_hub_id(spec)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__
