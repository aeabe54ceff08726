"""The reference in docs/ against the code it describes: every setting with its variable and
default, every metric family with its type and labels, every error code, every Ray Serve argument,
every command-line option; the paths the docs name exist; the README's quick start runs the
commands CI runs."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from schemas.a1111 import Txt2ImgRequest
from schemas.huggingface import TextToImageParameters, TextToImageRequest
from schemas.openai import ImageGenerationRequest
from schemas.score import InputData, ScoreParameters
from service.cli.main import COMMANDS
from service.hosts.ray_serve import ServeArgs
from service.runtime.metrics import Metrics
from service.settings import Settings
from service.web.errors import ERROR_TABLE

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# A table row whose first cell is one backticked name: | `NAME` | cell | cell ...
ROW = re.compile(r"^\| `([^`|]+)` \|(.*)\|\s*$", re.MULTILINE)


def rows(path: Path, pattern: str) -> dict[str, list[str]]:
    """Rows of every table in ``path`` whose first cell (backticked) matches ``pattern``: name ->
    the other cells; a name documented twice is an error."""
    found: dict[str, list[str]] = {}
    for name, rest in ROW.findall(path.read_text(encoding="utf-8")):
        if re.fullmatch(pattern, name):
            assert name not in found, f"{path.name}: {name} has two rows; keep one"
            found[name] = [cell.strip() for cell in rest.split(" | ")]
    return found


def documented_default(value: Any) -> str:
    """How a default is written at the start of its table cell: `value`, or unset for None."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, dict) and not value:
        return "`{}`"
    return f"`{value}`"


def defaults(model: type[BaseModel], name_of: Any) -> dict[str, str]:
    return {
        name_of(field): documented_default(info.get_default(call_default_factory=True))
        for field, info in model.model_fields.items()
    }


def setting_variable(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else f"SD_{field.upper()}"


def test_every_setting_is_documented_with_its_default_and_nothing_else_is() -> None:
    expected = defaults(Settings, setting_variable)
    documented = rows(DOCS / "settings.md", r"SD_[A-Z0-9_]+|AZUREML_MODEL_DIR|OMP_NUM_THREADS")
    assert sorted(set(expected) - set(documented)) == [], "settings missing from docs/settings.md"
    assert sorted(set(documented) - set(expected)) == [], "docs/settings.md lists settings the code lacks"
    for variable, default in expected.items():
        cell = documented[variable][0]
        assert cell.startswith(default), f"docs/settings.md: {variable}'s default is {default}, not {cell!r}"


def test_every_ray_serve_argument_is_documented_with_its_default() -> None:
    expected = defaults(ServeArgs, str)
    documented = rows(DOCS / "deploy.md", r"[a-z_]+")
    assert set(documented) == set(expected), "docs/deploy.md's Ray Serve args table against ServeArgs"
    for name, default in expected.items():
        cell = documented[name][0]
        assert cell.startswith(default), f"docs/deploy.md: Ray arg {name} defaults to {default}, not {cell!r}"


def metric_families() -> dict[str, tuple[str, set[str]]]:
    """Every family the server registers, as exposed (counters with _total): type and label names."""
    registry = Metrics().registry
    families = {}
    # prometheus_client has no public way to list a collector's label names before it has a series.
    for collector in registry._collector_to_names:  # type: ignore[attr-defined]
        name = collector._name + ("_total" if collector._type == "counter" else "")
        families[name] = (collector._type, set(collector._labelnames))
    return families


def test_every_metric_family_is_documented_with_its_type_and_labels_and_nothing_else_is() -> None:
    expected = metric_families()
    documented = rows(DOCS / "metrics.md", r"sd_[a-z0-9_]+")
    assert sorted(set(expected) - set(documented)) == [], "metric families missing from docs/metrics.md"
    assert sorted(set(documented) - set(expected)) == [], "docs/metrics.md lists metrics the code lacks"
    for name, (kind, labels) in expected.items():
        cells = documented[name]
        assert cells[0] == kind, f"docs/metrics.md: {name} is a {kind}"
        written = set(re.findall(r"`([a-z_]+)`", cells[1]))
        assert written == labels, f"docs/metrics.md: {name}'s labels are {sorted(labels) or 'none'}"


def test_every_error_code_of_the_table_is_documented_with_its_status() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", text, re.MULTILINE)
    documented = {(int(status), code) for status, code in rows}
    expected = {(kind.status, kind.code) for kind in ERROR_TABLE.values()}
    assert sorted(expected - documented) == [], "error codes missing from docs/api.md's error table"
    # Codes answered outside the table (the protocol layer's, routing's) are in the source as strings.
    source = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "service").rglob("*.py"))
    for _, code in documented - expected:
        assert f'"{code}"' in source or code in {"not_found", "method_not_allowed"}, (
            f"docs/api.md documents {code}, which no code answers"
        )


def section(page: str, heading: str) -> str:
    """The text of ``## heading`` in docs/``page``, up to the next ``## ``."""
    text = (DOCS / page).read_text(encoding="utf-8")
    return text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]


# Each request body's fields, and where docs/api.md describes them.
REQUEST_FIELDS = {
    "`/score`: the Azure ML contract": (InputData, ScoreParameters),
    "OpenAI images API": (ImageGenerationRequest,),
    "Other clients": (TextToImageRequest, TextToImageParameters, Txt2ImgRequest),
}


@pytest.mark.parametrize("heading", sorted(REQUEST_FIELDS))
def test_every_request_field_is_described_where_its_route_is(heading: str) -> None:
    described = set(re.findall(r"`([a-z_]+)`", section("api.md", heading)))
    fields = {field for model in REQUEST_FIELDS[heading] for field in model.model_fields}
    assert sorted(fields - described) == [], f"docs/api.md's {heading!r} does not describe these fields"


# Where each command's options are documented; the first page documents no option the command lacks.
OPTION_PAGES = {
    "serve": ("settings.md",),
    "batch": ("batch.md", "deploy.md"),
    "generate": ("api.md",),
    "make-model": ("models.md",),
    "jobs": ("jobs.md",),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_line_option_is_documented_and_no_other(command: str) -> None:
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    options = {o for action in parser._actions for o in action.option_strings if o.startswith("--")}
    options.discard("--help")
    pages = [(DOCS / page).read_text(encoding="utf-8") for page in OPTION_PAGES[command]]
    documented = [set(re.findall(r"`(--[a-z0-9-]+)", page)) for page in pages]
    assert sorted(options - set().union(*documented)) == [], f"{command}'s options missing from docs/"
    if command in ("batch", "generate"):
        page = OPTION_PAGES[command][0]
        assert sorted(documented[0] - options) == [], f"docs/{page} names options {command} lacks"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", doc_files(), ids=lambda path: path.name)
def test_every_path_the_docs_name_exists(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    # Backticked repository paths (globs allowed), files named anywhere (the README's map is a code
    # block), and relative markdown links.
    roots = "(?:benchmarks|deploy|docs|model|schemas|scripts|service|tests)/"
    named = re.findall(rf"`({roots}[\w./*-]*)`", text)
    named += re.findall(rf"(?<![\w/.-])({roots}[\w./-]*\.(?:py|md|json|ya?ml|sh|png))", text)
    linked = [link.split("#")[0] for link in re.findall(r"\]\(([^)#:]+(?:#[^)]*)?)\)", text)]
    missing = [name for name in named if not list(ROOT.glob(name.rstrip("/")))] + [
        link for link in linked if link and not (path.parent / link).exists()
    ]
    assert missing == [], f"{path.relative_to(ROOT)} names paths that do not exist"


@pytest.mark.parametrize("path", doc_files(), ids=lambda path: path.name)
def test_every_anchor_link_finds_its_heading(path: Path) -> None:
    for target, anchor in re.findall(r"\]\(([^)#:]*)#([^)]+)\)", path.read_text(encoding="utf-8")):
        page = (path.parent / target) if target else path
        headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.MULTILINE)
        slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
        assert anchor in slugs, f"{path.name}: link to {target or path.name}#{anchor} finds no heading"


def test_the_quick_start_runs_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(scripts/[\w.-]+)", quick_start, re.MULTILINE)
    assert commands == ["scripts/serve.sh", "scripts/test.sh"], "the quick start's two commands"
    for command in commands:
        assert (ROOT / command).stat().st_mode & 0o111, f"{command} is not executable"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "scripts/test.sh" in ci, ".ci/run runs the README's test command, scripts/test.sh"
    assert "scripts/setup.sh" in (ROOT / "scripts" / "serve.sh").read_text(), "serve.sh sets up .venv first"


def test_the_sampler_table_is_the_servers() -> None:
    """docs/api.md's samplers and schedules table names each A1111 sampler with the scheduler it
    runs, as schemas/samplers.py maps them, and each runs with the diffusers class it says."""
    from model.schedulers import scheduler_options
    from schemas.samplers import SAMPLERS

    rows = re.findall(
        r"^\| `([^`]+)` \| `([^`]+)` \| `([A-Za-z0-9]+Scheduler)`", section("api.md", "Other clients"), re.M
    )
    assert [(name, scheduler) for name, scheduler, _ in rows] == [
        (name, sampler.scheduler) for name, sampler in SAMPLERS.items()
    ]
    for _, scheduler, cls in rows:
        assert scheduler_options(scheduler)[0].__name__ == cls
