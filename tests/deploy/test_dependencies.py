"""The package's runtime dependencies are what its code imports: a library only tests use is a dev
extra, so that the image and the wheel carry nothing the server never loads."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "schemas", "service")
# Needed at run time without an import of ours: what diffusers (and Starlette) load on their own.
THROUGH_DIFFUSERS = {
    "python-multipart": "Starlette's request.form(): OpenAI's edits form (service/web/clients/edits.py)",
    "peft": "diffusers' LoRA loaders (model/adapters.py)",
    "accelerate": "diffusers' low-memory loading",
    "huggingface-hub": "diffusers' and transformers' model downloads",
    "scipy": "diffusers' LMSDiscreteScheduler (model/schedulers.py)",
    "torchsde": "diffusers' DPMSolverSDEScheduler (model/schedulers.py)",
}


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def project() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return dict(tomllib.load(handle)["project"])


def imported_names() -> set[str]:
    """Top-level names the package's code imports (or reads package data of, as files("x") does, or
    finds without importing it, as find_spec("x") does)."""
    found: set[str] = set()
    pattern = re.compile(
        r"^\s*(?:from|import)\s+([A-Za-z_]\w*)|(?:files|find_spec)\(\"([A-Za-z_]\w*)\"\)", re.MULTILINE
    )
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for match in pattern.finditer(path.read_text(encoding="utf-8")):
                found.add(match.group(1) or match.group(2))
    return found


def test_every_runtime_dependency_is_imported_by_the_package() -> None:
    modules_of: dict[str, set[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            modules_of.setdefault(distribution.lower().replace("_", "-"), set()).add(module)
    used = imported_names()
    dependencies = [requirement_name(r) for r in project()["dependencies"]]  # type: ignore[attr-defined]
    unused = [
        name
        for name in dependencies
        if name not in THROUGH_DIFFUSERS and not (modules_of.get(name, {name.replace("-", "_")}) & used)
    ]
    assert not unused, f"runtime dependencies the package never imports (move them to dev): {unused}"


def test_libraries_only_tests_use_are_dev_extras() -> None:
    dependencies = {requirement_name(r) for r in project()["dependencies"]}  # type: ignore[attr-defined]
    dev = {requirement_name(r) for r in project()["optional-dependencies"]["dev"]}  # type: ignore[index]
    assert "pandas" not in dependencies and "pandas" in dev
    assert "tenacity" in dependencies  # the package's own retries
