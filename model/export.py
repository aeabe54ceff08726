"""Write a random-weight model as a diffusers folder (safetensors), loadable like a real one."""

from __future__ import annotations

import json
from pathlib import Path

from model.architectures import build_components
from model.errors import ModelLoadError

# A marker file: loaders report such folders as random weights (images are noise).
RANDOM_MARKER = "RANDOM_WEIGHTS"


def save_random_model(arch: str, out: str | Path, seed: int = 0) -> Path:
    """Steps: 1) refuse to overwrite a model, 2) build the components, 3) save the pipeline, 4) mark it."""
    from diffusers import StableDiffusionPipeline

    folder = Path(out)
    # 1) never clobber an existing model
    if (folder / "model_index.json").exists():
        raise ModelLoadError(f"{folder} already holds a model (model_index.json); choose an empty folder")
    # 2) the same weights as the in-process `random:<arch>:<seed>`
    parts = build_components(arch, seed)
    # 3) the published layout; 2-base, like the real one, ships without a checker
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=parts["safety_checker"] is not None)
    pipe.save_pretrained(folder, safe_serialization=True)
    _name_processor_as_published(folder / "model_index.json")
    # 4) so that whoever serves it is told its images are noise
    (folder / RANDOM_MARKER).write_text(f"random:{arch}:{seed}\n")
    return folder


def _name_processor_as_published(index: Path) -> None:
    """Recent transformers save the PIL fallback class name; published models say CLIPImageProcessor,
    which every transformers version can load."""
    data = json.loads(index.read_text())
    if data.get("feature_extractor", [None])[0] == "transformers":
        data["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index.write_text(json.dumps(data, indent=2) + "\n")
