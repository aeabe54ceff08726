"""The Dockerfile and .dockerignore, checked without a Docker engine.

Static checks read the Dockerfile the way `docker build` does (continuations joined, comments dropped);
the image's CMD and HEALTHCHECK commands are then run for real on this machine, with the image's ENV,
against a real server process on the random:tiny model.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from service.cli.main import build_parser
from tests.helpers.deploy import settings_env_names, settings_under
from tests.helpers.ports import free_port

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comment lines dropped and backslash continuations joined, as Docker does."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        keyword, _, value = (pending + line).strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation: remove the trailing backslash"
    return instructions


INSTRUCTIONS = parse_dockerfile((ROOT / "Dockerfile").read_text())


def all_of(keyword: str) -> list[str]:
    return [i.value for i in INSTRUCTIONS if i.keyword == keyword]


def index_of(keyword: str, pattern: str) -> int:
    """Position of the first `keyword` instruction whose value matches `pattern`."""
    for position, instruction in enumerate(INSTRUCTIONS):
        if instruction.keyword == keyword and re.search(pattern, instruction.value):
            return position
    raise AssertionError(f"the Dockerfile has no {keyword} matching {pattern!r}")


def image_env() -> dict[str, str]:
    """The ENV the image sets (KEY=value pairs, several per instruction)."""
    env: dict[str, str] = {}
    for value in all_of("ENV"):
        for pair in shlex.split(value):
            key, sep, val = pair.partition("=")
            assert sep, f"write ENV as KEY=value pairs, not {value!r}"
            env[key] = val
    return env


def exec_form(instruction_value: str) -> list[str]:
    form = json.loads(instruction_value)
    assert isinstance(form, list) and all(isinstance(part, str) for part in form), (
        f"use the exec (JSON list) form, so that signals reach the server: {instruction_value!r}"
    )
    return form


def healthcheck_command() -> list[str]:
    [value] = all_of("HEALTHCHECK")
    _, _, command = value.partition("CMD ")
    assert command, f"HEALTHCHECK needs a CMD: {value!r}"
    return exec_form(command.strip())


def run_healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, with this interpreter standing in for the image's `python`."""
    command = healthcheck_command()
    assert command[0] == "python", f"the healthcheck must use the image's python (curl is absent): {command}"
    return subprocess.run(
        [sys.executable, *command[1:]], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


# -- static checks ------------------------------------------------------------------------------------


def test_base_image_is_a_cuda_runtime_pinned_by_tag_with_a_torch_the_project_accepts() -> None:
    [base] = all_of("FROM")
    repository, _, tag = base.split()[0].partition(":")
    assert tag and tag != "latest", f"pin the base image by tag, not {base!r}"
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-cuda(\d+)\.\d+-cudnn\d+-runtime", tag)
    assert repository == "pytorch/pytorch" and match, f"expected a pytorch CUDA runtime tag, got {base!r}"
    torch_pin = next(dep for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("torch"))
    assert Version(match[1]) in SpecifierSet(torch_pin.removeprefix("torch")), (
        f"the base image's torch {match[1]} does not satisfy pyproject's {torch_pin!r}: pip would replace it"
    )


def test_runs_as_a_numeric_non_root_user() -> None:
    users = all_of("USER")
    assert users, "add a USER: the server must not run as root"
    user = users[-1].split(":")[0]
    # Kubernetes' runAsNonRoot can only verify a numeric user.
    assert user.isdigit() and int(user) != 0, f"USER must be a numeric non-zero uid, not {users[-1]!r}"


def test_dependencies_are_installed_in_a_layer_before_the_code() -> None:
    copy_pyproject = index_of("COPY", r"^pyproject\.toml\s")
    install_deps = index_of("RUN", r"pip install .*-r ")
    install_code = index_of("RUN", r"pip install .*--no-deps")
    copies_of_code = [
        position
        for position, i in enumerate(INSTRUCTIONS)
        if i.keyword == "COPY" and re.match(r"(model|schemas|service|\.)\b", i.value)
    ]
    assert copies_of_code, "the Dockerfile never copies the code"
    assert copy_pyproject < install_deps < min(copies_of_code), (
        "copy pyproject.toml and install the dependencies before copying the code, "
        "so that code edits reuse the dependency layer"
    )
    assert max(copies_of_code) < install_code, "install the code itself (--no-deps) after copying it"


def test_every_package_is_copied_and_the_context_keeps_out_weights_and_environments() -> None:
    packages = {
        pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {i.value.split()[0].rstrip("/") for i in INSTRUCTIONS if i.keyword == "COPY"}
    # README.md is read by the build backend (pyproject's `readme`).
    needed = packages | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    assert needed <= copied, f"the image misses {sorted(needed - copied)}"

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]

    def ignored(path: str) -> bool:
        # Docker's rule: the last matching pattern wins; a pattern also matches everything below a match.
        result = False
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        for pattern in patterns:
            negate = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/").removeprefix("**/")
            if any(fnmatch.fnmatchcase(prefix, bare) or fnmatch.fnmatchcase(prefix.split("/")[-1], bare)
                   for prefix in prefixes):  # fmt: skip
                result = not negate
        return result

    for path in [*sorted(needed), "service/cli/main.py", "model/types.py"]:
        assert not ignored(path), f".dockerignore leaves {path} out of the build context; the image needs it"
    for path in [".venv/bin/python", ".git/HEAD", "models/sd/unet/model.safetensors", "tests/test_x.py"]:
        assert ignored(path), f".dockerignore must keep {path} out of the build context"


def test_image_env_names_are_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = image_env()
    unknown = {name for name in env if name.startswith("SD_")} - settings_env_names()
    assert not unknown, f"the Dockerfile sets {sorted(unknown)}, which Settings does not read (a typo?)"
    settings_under(env, monkeypatch)  # and the values validate


def test_model_and_caches_live_on_volumes_not_in_the_image() -> None:
    env = image_env()
    volumes = [PurePosixPath(path) for value in all_of("VOLUME") for path in exec_form(value)]

    def on_volume(path: str) -> bool:
        return any(PurePosixPath(path).is_relative_to(volume) for volume in volumes)

    for name in ["SD_MODEL", "SD_COMPILE_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "HF_HOME"]:
        assert name in env and on_volume(env[name]), (
            f"{name} must point into a VOLUME {volumes}: {env.get(name)}"
        )
    model_volume = next(v for v in volumes if PurePosixPath(env["SD_MODEL"]).is_relative_to(v))
    destinations = [i.value.split()[-1] for i in INSTRUCTIONS if i.keyword in {"COPY", "ADD"}]
    baked = [d for d in destinations if PurePosixPath(d).is_relative_to(model_volume)]
    assert not baked, f"the model must be mounted, never copied into the image: {baked}"


def test_cmd_serves_on_all_interfaces_at_the_exposed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    [cmd] = [exec_form(value) for value in all_of("CMD")]
    scripts = PYPROJECT["project"]["scripts"]
    assert cmd[0] in scripts, f"CMD runs {cmd[0]!r}, not a console script of the project {sorted(scripts)}"
    args = build_parser(cmd[1]).parse_args(cmd[1:])
    assert args.command == "serve", f"CMD must start the server, not {cmd[1:]}"
    assert args.host == "0.0.0.0", "CMD must bind all interfaces, or nothing outside the container reaches it"
    settings = settings_under(image_env(), monkeypatch)
    port = getattr(args, "port", None) or settings.port
    assert all_of("EXPOSE") == [str(port)], f"EXPOSE {all_of('EXPOSE')} differs from the server's port {port}"


# -- the HEALTHCHECK and CMD, run -----------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []  # noqa: RUF012 - shared on purpose: the test reads what the handler saw

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b"Healthy" if type(self).status == 200 else b"not ready")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def recorder() -> Iterator[tuple[int, type[_Recorder]]]:
    handler = type("Handler", (_Recorder,), {"paths": [], "status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def test_healthcheck_asks_root_on_the_configured_port_and_fails_while_not_ready(
    recorder: tuple[int, type[_Recorder]],
) -> None:
    port, handler = recorder
    assert run_healthcheck({"SD_PORT": str(port)}).returncode == 0
    assert handler.paths == ["/"], (
        f"the healthcheck must ask GET / (ready once the model is): {handler.paths}"
    )
    handler.status = 503
    assert run_healthcheck({"SD_PORT": str(port)}).returncode != 0, "a 503 from / must mean unhealthy"


def test_healthcheck_fails_when_nothing_listens() -> None:
    assert run_healthcheck({"SD_PORT": str(free_port())}).returncode != 0


@pytest.mark.slow
def test_cmd_starts_a_server_that_the_healthcheck_finds_healthy(tmp_path: Path) -> None:
    # 1. The image's CMD with the image's ENV; paths that only exist in the image point into tmp_path.
    [cmd] = [exec_form(value) for value in all_of("CMD")]
    executable = shutil.which(cmd[0], path=str(BIN)) or shutil.which(cmd[0])
    assert executable, f"{cmd[0]} is not installed: run `pip install -e . --no-deps`"
    port = free_port()
    env = {
        **os.environ,
        **image_env(),
        "SD_MODEL": "random:tiny",
        "SD_PORT": str(port),
        "SD_COMPILE_CACHE_DIR": str(tmp_path / "compile"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile" / "inductor"),
        "TRITON_CACHE_DIR": str(tmp_path / "compile" / "triton"),
        "HF_HOME": str(tmp_path / "huggingface"),
        "SD_DRAIN_TIMEOUT_S": "1",
    }
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([executable, *cmd[1:]], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # 2. Wait (bounded) for the healthcheck to pass, as Docker would during --start-period.
        deadline = time.monotonic() + 300
        while (result := run_healthcheck({"SD_PORT": str(port)})).returncode != 0:
            output = (tmp_path / "server.log").read_text()[-3000:]
            assert server.poll() is None, f"the server exited:\n{output}"
            assert time.monotonic() < deadline, f"the server never became healthy:\n{output}"
            time.sleep(0.5)
        # 3. What the healthcheck saw is the real server, ready to score.
        response = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert (response.status_code, response.text) == (200, "Healthy"), result
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
