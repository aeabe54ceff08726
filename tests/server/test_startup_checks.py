"""What `sd-endpoint serve` refuses or warns about before it loads anything: the client's SD_API_KEY
set on the server, keys no header can carry, settings that are not finite, hosts that cannot be
listened on; unknown SD_* variables and a server without keys beyond loopback are named in the log."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.helpers.ports import free_port
from tests.helpers.processes import REPO, SERVE, clean_env

SECRET = "do-not-print-4242"


def serve(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(SERVE, env=clean_env(**env), cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SD_API_KEY": SECRET}, "SD_API_KEYS"),
        ({"SD_API_KEY": SECRET, "SD_API_KEYS": "other-key"}, "SD_API_KEYS"),
        ({"SD_API_KEYS": f"ok-key,{SECRET}é"}, "SD_API_KEYS"),
        ({"SD_API_KEYS": f"{SECRET}\x01"}, "SD_API_KEYS"),
        ({"SD_API_KEYS": "ключ-" + SECRET}, "SD_API_KEYS"),
        ({"SD_KEEP_ALIVE_TIMEOUT_S": "inf"}, "SD_KEEP_ALIVE_TIMEOUT_S"),
        ({"SD_KEEP_ALIVE_TIMEOUT_S": "1e308"}, "SD_KEEP_ALIVE_TIMEOUT_S"),
        ({"SD_REQUEST_TIMEOUT_S": "nan"}, "SD_REQUEST_TIMEOUT_S"),
        ({"SD_SEND_TIMEOUT_S": "-inf"}, "SD_SEND_TIMEOUT_S"),
        ({"SD_HEADER_TIMEOUT_S": "Infinity"}, "SD_HEADER_TIMEOUT_S"),
        ({"SD_MAX_HEADER_COUNT": "0"}, "SD_MAX_HEADER_COUNT"),
        ({"SD_HOST": "999.1.1.1"}, "SD_HOST"),
        ({"SD_HOST": "1.2.3"}, "SD_HOST"),
        ({"SD_HOST": "::g"}, "SD_HOST"),
        ({"SD_HOST": "bad host"}, "SD_HOST"),
        ({"SD_HOST": "no-such-host.invalid"}, "SD_HOST"),
        ({"SD_HOST": "192.0.2.1"}, "SD_HOST"),  # an address this machine does not have
        ({"SD_ALLOWED_HOSTS": "a b, c"}, "SD_ALLOWED_HOSTS"),
    ],
    ids=lambda value: (
        next(iter(value)) + "=" + repr(value[next(iter(value))])[:20] if isinstance(value, dict) else value
    ),
)
def test_a_bad_setting_is_one_line_and_exit_2_before_any_model_work(
    env: dict[str, str], variable: str
) -> None:
    done = serve(SD_MODEL="random:tiny", **env)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()  # one line: no traceback, no uvicorn report
    assert line.startswith("sd-endpoint serve: error: ") and variable in line, line
    assert SECRET not in line  # a key's value never reaches the output
    assert "loading model" not in done.stdout + done.stderr


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    port = free_port()
    first = subprocess.Popen(
        SERVE, env=clean_env(SD_MODEL="random:tiny", SD_PORT=str(port)), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Started server process" not in (line := first.stderr.readline() if first.stderr else ""):
            assert time.monotonic() < deadline and line, "the first server did not start"
        done = serve(SD_MODEL="random:tiny", SD_PORT=str(port))
    finally:
        first.terminate()
        first.wait(60)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "SD_PORT" in line and str(port) in line


def log_lines_until(env: dict[str, str], marker: str) -> list[str]:
    """The server's log lines up to the first holding ``marker``; then the server is stopped."""
    process = subprocess.Popen(
        SERVE, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any(marker in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, lines
            lines.append(process.stdout.readline() if process.stdout else "")
    finally:
        process.terminate()
        process.wait(60)
    return lines


def test_unknown_variables_and_a_server_open_beyond_loopback_without_keys_are_named_in_the_log() -> None:
    env = clean_env(
        SD_MODEL="random:tiny", SD_HOST="0.0.0.0", SD_PORT=str(free_port()),
        SD_API_KEYZ=SECRET, SD_MAXCONNECTIONS="5", SD_BATCH_PARAMS="{}",
    )  # fmt: skip
    lines = log_lines_until(env, "NO API KEYS")
    [unknown] = [line for line in lines if "unknown SD_* variables" in line]
    assert "WARNING" in unknown and "SD_API_KEYZ" in unknown and "SD_MAXCONNECTIONS" in unknown
    assert "SD_BATCH_PARAMS" not in unknown  # read by the batch entry script, not a typo
    [loud] = [line for line in lines if "NO API KEYS" in line]
    assert "WARNING" in loud and "0.0.0.0" in loud and "SD_API_KEYS" in loud
    assert SECRET not in "".join(lines)


def test_an_allowed_host_with_a_port_which_never_matches_is_named_at_start_up() -> None:
    env = clean_env(SD_MODEL="random:tiny", SD_PORT=str(free_port()), SD_ALLOWED_HOSTS="10.0.0.1:8080,::1")
    lines = log_lines_until(env, "Started server process")  # the start-up warnings come before
    [warning] = [line for line in lines if "SD_ALLOWED_HOSTS" in line]
    assert "WARNING" in warning and "'10.0.0.1:8080'" in warning and "list '10.0.0.1'" in warning
    assert "'::1'" not in warning


def test_a_loopback_server_without_keys_or_stray_variables_warns_of_neither() -> None:
    env = clean_env(SD_MODEL="random:tiny", SD_PORT=str(free_port()))
    lines = log_lines_until(env, "Started server process")
    assert not any("NO API KEYS" in line or "unknown SD_*" in line for line in lines), lines


def test_every_settings_variable_is_known_aliases_included(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each field's own variable (SD_MODEL_CONFIG sets model_config_dir) is never called a typo;
    the name a field would have without its alias is."""
    from service.settings import Settings, check_server_environment

    for name in (
        "SD_MODEL_CONFIG",
        "SD_CPU_THREADS",
        "SD_MODEL_VARIANT",
        "SD_ALLOWED_HOSTS",
        "SD_PREVIEW_DECODER",
    ):
        monkeypatch.setenv(name, "x")
    assert "model_config_dir" in Settings.model_fields
    assert check_server_environment() == []
    monkeypatch.setenv("SD_MODEL_CONFIG_DIR", "x")
    [warning] = check_server_environment()
    assert "SD_MODEL_CONFIG_DIR" in warning and "SD_MODEL_CONFIG," not in warning


def test_an_old_deployment_setting_sd_batching_request_starts_with_one_warning() -> None:
    """The request-level batcher is gone; a deployment that still sets SD_BATCHING=request (and
    SD_MAX_BATCH_WAIT_MS) starts on the step loop and is told once to drop the setting."""
    env = clean_env(
        SD_MODEL="random:tiny", SD_PORT=str(free_port()), SD_BATCHING="request", SD_MAX_BATCH_WAIT_MS="50"
    )
    lines = log_lines_until(env, "SD_BATCHING=request")  # logged as the step loop is built
    [warning] = [line for line in lines if "SD_BATCHING=request" in line]
    assert "WARNING" in warning and "remove the setting" in warning
    assert not any("unknown SD_*" in line for line in lines), lines
