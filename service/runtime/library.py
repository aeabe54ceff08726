"""The models this server serves, by name: the default one (SD_MODEL) and a library's (SD_MODELS,
checked at start-up from headers and configs by model/library/catalog.py, without loading any).

Every route resolves the model a request names here (``resolve``): its canonical name goes on the
request's items (``GenerationItem.model``), and the engine of each device (model/library/models.py)
draws it with that model, loading it first if it is not on the device. Names a client may send for
the default model besides its own: SD_SERVED_MODEL_NAMES (clients that always send "dall-e-3").
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from model.library import LibraryProblem, ModelEntry, scan_library
from model.types import ModelInfo
from service.runtime.errors import ModelNotFoundError
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Library:
    """``default``: the default model's name; ``entries``: the library's models by name (the default
    one is not among them unless SD_MODELS lists it too); ``aliases``: other names of the default."""

    default: str
    entries: dict[str, ModelEntry] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    problems: tuple[LibraryProblem, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every model a request may name, the default first (aliases apart)."""
        return (self.default, *(name for name in self.entries if name != self.default))

    @property
    def several(self) -> bool:
        return any(name != self.default for name in self.entries)

    def resolve(self, name: str | None, where: str = "model") -> str | None:
        """The canonical name of the model ``name`` asks for, None for the default one (no name, the
        default's own name or an alias). ModelNotFoundError names ``where`` and the models there are."""
        if name is None or name == "" or name == self.default or name in self.aliases:
            return None
        if name in self.entries:
            return name
        for stem in _title_stems(name):  # A1111 titles: "name [hash]" or "name.safetensors [hash]"
            if stem != name and (stem == self.default or stem in self.aliases or stem in self.entries):
                return self.resolve(stem, where)
        shown = ", ".join(repr(each) for each in [*self.aliases, *self.names][:8])
        more = ", ..." if len(self.names) + len(self.aliases) > 8 else ""
        raise ModelNotFoundError(
            f"{where}: no model {name[:100]!r} here; this server serves {shown}{more} (GET /v1/models)",
            param=where,
        )

    def info(self, name: str | None, default: ModelInfo) -> ModelInfo:
        """What a request for ``name`` draws with (its native size, whether it inpaints), from the
        catalog: the model need not be loaded. ``default``: the default model's, loaded."""
        entry = self.entries.get(name) if name is not None else None
        if entry is None:
            return default
        return dataclasses.replace(
            default,
            name=entry.name,
            architecture=entry.architecture,
            native_height=entry.native_height,
            native_width=entry.native_width,
            inpainting=entry.inpainting,
        )


def _title_stems(name: str) -> tuple[str, str]:
    """The names an A1111 checkpoint title may stand for, as clients echo them: "model [0123456789]"
    is "model"; "model.safetensors [0123456789]" is "model.safetensors", then "model"."""
    text = name.split(" [", 1)[0].strip()
    bare = text
    for suffix in (".safetensors", ".ckpt"):
        if bare.endswith(suffix):
            bare = bare[: -len(suffix)]
    return text, bare


def _same_place(spec: str, other: str) -> bool:
    """Whether two specs name the same files (a folder given by two paths, say)."""
    if spec == other:
        return True
    try:
        return Path(spec).exists() and Path(spec).resolve() == Path(other).resolve()
    except OSError:
        return False


def default_entry(settings: Settings) -> ModelEntry | None:
    """The library model that is the default one: none when SD_MODEL (or Azure ML's model folder)
    names it; else SD_MODELS' first model (by name, for a folder) rather than the embedded random
    one."""
    if settings.model or settings.azureml_model_dir or not settings.models:
        return None
    entries, _ = _scan(settings.models, settings.model_config_dir, settings.model_variant)
    return entries[0] if entries else None


def with_default(settings: Settings) -> Settings:
    """The settings with the default model made explicit (``default_entry``'s spec as SD_MODEL)."""
    entry = default_entry(settings)
    if entry is None:
        return settings
    update = {"model": entry.spec, "model_config_dir": entry.config, "model_variant": entry.variant}
    return settings.model_copy(update=update)


def library_of(settings: Settings, default: str) -> Library:
    """The library the settings name (SD_MODELS), for a server whose default model is ``default``
    (its loaded name); each bad entry is named in one log line and left out."""
    aliases = tuple(n for n in settings.served_model_name_list if n != default)
    if not settings.models:
        return Library(default, aliases=aliases)
    entries, problems = _scan(settings.models, settings.model_config_dir, settings.model_variant)
    served = {entry.name: entry for entry in entries if entry.name not in aliases}
    served.pop(default, None)  # SD_MODELS lists the default model too: it is that one
    for name, entry in list(served.items()):  # ... or the same weights under its own name
        if _same_place(entry.spec, settings.model_spec):
            del served[name]
            aliases = (*aliases, name)
    described = ", ".join(
        f"{e.name} ({e.architecture}{', inpainting' * e.inpainting})" for e in served.values()
    )
    lines = [(logging.ERROR, f"model library: {p.entry} left out: {p.reason}") for p in problems]
    _announce(
        (*lines, (logging.INFO, f"model library: {len(served)} beside the default: {described or 'none'}"))
    )
    return Library(default, served, aliases, tuple(problems))


@lru_cache(maxsize=8)
def _announce(lines: tuple[tuple[int, str], ...]) -> None:
    """The library's log lines, once per process (every device's engine reads the library)."""
    for level, line in lines:
        log.log(level, line)


@lru_cache(maxsize=4)
def _scan(
    models: str, config: Path | str | None, variant: str | None
) -> tuple[list[ModelEntry], list[LibraryProblem]]:
    """Scanned once per process (every device's engine asks)."""
    return scan_library(models, config=str(config) if config else None, variant=variant)
