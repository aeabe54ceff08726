"""The project's layout rules, checked on the source: folder sizes, the import direction between
layers, no import cycles, a batch job without the web stack, one reader of the environment."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import tomllib
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "schemas", "service")
WEB_STACK = ("fastapi", "starlette", "uvicorn")
MAX_MODULES_PER_FOLDER = 10
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def project_graph() -> grimp.ImportGraph:
    """Every import of the project's modules, lazy imports in functions included; imports under
    ``if TYPE_CHECKING:`` never run, so they are left out (as in the layer contracts)."""
    return grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True, cache_dir=None)


def test_no_folder_holds_more_than_ten_modules_nor_any_module_more_than_400_lines() -> None:
    folders: dict[Path, int] = {}
    for path in source_files():
        if path.name != "__init__.py":
            folders[path.parent] = folders.get(path.parent, 0) + 1
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"
    crowded = {str(f.relative_to(ROOT)): n for f, n in folders.items() if n > MAX_MODULES_PER_FOLDER}
    assert not crowded, f"folders with more than {MAX_MODULES_PER_FOLDER} modules: {crowded}"


def test_there_is_no_import_cycle() -> None:
    graph = project_graph()
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                pytest.fail("import cycle: " + " -> ".join((module, *back)))


def test_imports_run_one_way_between_the_layers() -> None:
    """The layer rules are import-linter contracts in pyproject.toml ([tool.importlinter]); they
    count indirect imports too, so a layer cannot reach a forbidden one through a third."""
    broken = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert broken == 0, "an import crosses a layer the wrong way: the contract printed above says which"


def test_every_layer_is_under_a_contract() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    assert set(config["root_packages"]) == set(PACKAGES)
    sources = {s for contract in config["contracts"] for s in contract["source_modules"]}
    service = {
        f"service.{m.stem}"
        for m in (ROOT / "service").iterdir()
        if m.suffix == ".py" or (m / "__init__.py").exists()
    }
    # The command line is the top layer: nothing is above it to forbid.
    loose = {"model", "schemas", *service} - sources - {"service.cli", "service.__init__"}
    assert not loose, f"layers no import-linter contract constrains: {sorted(loose)}"


def _imported_modules(argv: list[str], cwd: Path) -> set[str]:
    """The modules a command imports, from ``python -X importtime``."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("SD_")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert names, "python -X importtime printed nothing"
    return names


def test_batch_help_and_a_batch_job_never_import_the_web_stack(tmp_path: Path) -> None:
    help_imports = _imported_modules(["-m", "service.cli.main", "batch", "--help"], ROOT)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a red cat\n")
    (tmp_path / "in" / "b.csv").write_text("prompt\na red cat\n")
    job = ["-m", "service.cli.main", "batch", "--input", str(tmp_path / "in"), "--output",
           str(tmp_path / "out"), "--model", "random:tiny", "--steps", "1"]  # fmt: skip
    job_imports = _imported_modules(job, ROOT)
    assert "service.batch.runner" in job_imports and "torch" in job_imports  # it really ran
    for imported in (help_imports, job_imports):
        web = sorted(m for m in imported if m.split(".")[0] in WEB_STACK)
        assert not web, f"the batch command imported the web stack: {web[:5]}"


# Who reads the environment besides Settings (pydantic-settings, in service/settings.py), and why;
# service/settings.py's docstring names each of them.
ENVIRONMENT_READERS = {
    "service.cli.client": "SD_API_KEY: the generate client is not the server and has no Settings",
    "service.batch.ray_job": "storage credentials forwarded to Ray actors",
    "model.optimizations.torch_compile": "sets the compile caches' variables for torch (writes them)",
    "deploy.azureml.batch_score": "AZUREML_BI_OUTPUT_PATH and SD_BATCH_PARAMS, Azure's job contract",
}


def test_only_the_documented_modules_touch_the_environment() -> None:
    readers = set()
    for path in [*source_files(), ROOT / "deploy" / "azureml" / "batch_score.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"):  # fmt: skip
                readers.add(module_name(path))
    assert readers == set(ENVIRONMENT_READERS)
    documented = (ROOT / "service" / "settings.py").read_text(encoding="utf-8")
    for reader in ENVIRONMENT_READERS:
        assert reader.replace(".", "/") + ".py" in documented, f"settings.py does not name {reader}"


def test_the_wire_seed_bound_is_the_engine_s() -> None:
    from model.types import MAX_SEED as ENGINE_MAX_SEED
    from schemas.score import MAX_SEED as WIRE_MAX_SEED
    from service.runtime.items import MAX_SEED

    assert WIRE_MAX_SEED == ENGINE_MAX_SEED == MAX_SEED


def test_at_most_twelve_test_files_sit_directly_in_tests() -> None:
    direct = sorted(p.name for p in (ROOT / "tests").glob("*.py") if p.name.startswith("test_"))
    assert len(direct) <= 12, direct
