"""The project's layout rules, checked on the source: folder sizes, the import direction between
layers, no import cycles, a batch job without the web stack, one reader of the environment."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every module ``path`` imports when it runs, lazy imports in functions included (imports
    under ``if TYPE_CHECKING:`` never run, so they are left out). ``from package import module``
    counts as importing the module (of ``modules``), not the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
               for child in node.body for n in ast.walk(child)}  # fmt: skip
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(node.module)
    return found


def project_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in source_files()}
    return {
        name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()
    }


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
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target] if target in path else [node, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


# (importer prefix, what it must never import): the layers, lowest first.
FORBIDDEN = [
    ("schemas", ("model", "service")),
    ("model", ("schemas", "service")),
    ("service.settings", ("service.web", "service.hosts", "service.cli", "service.runtime")),
    ("service.logs", ("service.web", "service.hosts", "service.cli", "service.runtime")),
    ("service.storage", ("service.web", "service.hosts", "service.cli", "service.runtime", "service.batch")),
    ("service.runtime", ("service.web", "service.hosts", "service.cli", "service.batch", *WEB_STACK)),
    ("service.batch", ("service.web", "service.hosts", *WEB_STACK)),
    ("service.web", ("service.hosts", "service.cli", "service.batch")),
    ("service.hosts", ("service.cli",)),
]


@pytest.mark.parametrize(("importer", "forbidden"), FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_imports_run_one_way_between_the_layers(importer: str, forbidden: tuple[str, ...]) -> None:
    wrong = []
    for path in source_files():
        name = module_name(path)
        if name != importer and not name.startswith(importer + "."):
            continue
        for target in imports_of(path):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(sorted(set(wrong)))


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
