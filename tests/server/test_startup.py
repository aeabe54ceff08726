"""Starting `sd-endpoint serve` (and a batch job) as an operator sees it: an address it cannot listen
on fails at once, before any model loads, in one line; a broken weight folder is one line naming the
file; the server's own banners read as lines in the text log while what clients send stays escaped."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.logs import RequestContextFilter, TextFormatter
from tests.helpers.processes import REPO, SERVE, clean_env, start_server, stop_server
from tests.helpers.weights import save_with_diffusers

PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) \S+ \[\S+\] ")
# A model that takes a while to load: the failure must come before it starts.
LOAD_LINE = "loading model"


@pytest.fixture()
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def serve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = clean_env(**{"SD_MODEL": "random:tiny", **env})
    return subprocess.run(
        [*SERVE, *args], env=environment, cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("host", "reason"),
    [("127.0.0.1", "in use"), ("0.0.0.0", "in use"), ("192.0.2.1", "assign"), ("::1", None)],
    ids=["busy-loopback", "busy-any", "not-this-machine", "busy-ipv6-or-none"],
)
def test_an_address_it_cannot_listen_on_fails_before_the_model_loads(
    busy_port: int, host: str, reason: str | None
) -> None:
    if reason is None:  # IPv6 loopback: busy too, when this machine has it
        try:
            with socket.socket(socket.AF_INET6) as six:
                six.bind(("::1", busy_port))
                six.listen()
                done = serve("--host", host, "--port", str(busy_port))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        reason = "in use"
    else:
        started = time.monotonic()
        done = serve("--host", host, "--port", str(busy_port))
        assert time.monotonic() - started < 60
    assert done.returncode == 2, done.stderr[-2000:]  # as any setting the server cannot start with
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("sd-endpoint serve: error: ") and "cannot listen on " in line
    assert f"{host}:{busy_port}" in line and reason in line.lower() and "SD_PORT" in line
    assert LOAD_LINE not in done.stderr and done.stdout == ""


def record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("service.runtime.lifecycle", logging.WARNING, __file__, 1, msg, args, None)


def formatted(one: logging.LogRecord) -> list[str]:
    RequestContextFilter().filter(one)
    return TextFormatter().format(one).split("\n")


def test_the_random_weights_banner_is_four_lines_in_the_text_log(tmp_path: Path) -> None:
    running = start_server(tmp_path / "server.log")
    stop_server(running)
    lines = running.log_path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "RANDOM WEIGHTS" in line) - 1
    banner = lines[start : start + 4]
    assert all(PREFIX.match(line) for line in banner), banner
    assert banner[0].endswith("!" * 78) and banner[3].endswith("!" * 78)
    assert banner[1].endswith("  model random:tiny has RANDOM WEIGHTS: every image it makes is noise.")
    assert "\\n" not in "".join(banner)


@pytest.mark.parametrize(
    "sent",
    [
        "/x\n2026-12-01 00:00:00,000 INFO forged",
        "id\rwith-a-return",
        "\x1b[31mred",
        "a\u2028b\u2029c",
        "t\tab",
    ],
)
def test_what_clients_send_stays_escaped_inside_a_multi_line_message(sent: str) -> None:
    lines = formatted(
        record("%s\n  the request %s failed: %s\n%s", "!" * 10, sent, ValueError(sent), "!" * 10)
    )
    assert len(lines) == 3 and all(PREFIX.match(line) for line in lines), lines
    assert not any(control in "".join(lines) for control in "\r\x1b\u2028\u2029\t")
    one_line = formatted(record("request %s failed", sent))
    assert len(one_line) == 1 and PREFIX.match(one_line[0])


def test_a_traceback_follows_the_last_line_and_odd_records_stay_one_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        with_trace = record("first\nsecond %s", "x")
        with_trace.exc_info = sys.exc_info()
    text = formatted(with_trace)
    assert PREFIX.match(text[0]) and text[0].endswith("first")
    assert PREFIX.match(text[1]) and text[1].endswith("second x") and text[2].startswith("Traceback")
    for odd in (record("%(a)s\n%(b)s", {"a": 1, "b": "2"}), record(ValueError("a\nb"))):  # type: ignore[arg-type]
        assert len(formatted(odd)) == 1


# -- 5. a broken weight folder: one line, on serve and on batch ------------------------------------
@pytest.fixture(scope="module")
def zero_byte_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_with_diffusers(tmp_path_factory.mktemp("broken") / "sd", seed=1)
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize("devices", ["cpu", "cpu,cpu"])
def test_serve_on_a_broken_folder_exits_1_with_one_line_naming_the_file(
    zero_byte_encoder: Path, devices: str
) -> None:
    done = serve("--port", "0", SD_MODEL=str(zero_byte_encoder), SD_DEVICES=devices)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    [error] = [line for line in done.stderr.splitlines() if " ERROR " in line]
    named = str(zero_byte_encoder / "text_encoder" / "model.safetensors")
    assert named in error and "empty (0 bytes)" in error and "SD_MODEL" in error


def test_batch_on_a_broken_folder_exits_2_with_one_line(zero_byte_encoder: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a red cat\n")
    command = [sys.executable, "-m", "service.cli.main", "batch", "--input", str(tmp_path / "in"),
               "--output", str(tmp_path / "out"), "--model", str(zero_byte_encoder)]  # fmt: skip
    done = subprocess.run(command, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert line.startswith("sd-endpoint batch: error: ") and "text_encoder" in line and "0 bytes" in line


def test_a_model_without_a_safety_checker_says_so_once_loudly(tmp_path: Path) -> None:
    folder = save_with_diffusers(tmp_path / "sd", arch="tiny", seed=1)
    shutil.rmtree(folder / "safety_checker")
    shutil.rmtree(folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index))
    running = start_server(tmp_path / "server.log", SD_MODEL=str(folder), SD_DEVICES="cpu,cpu")
    stop_server(running)
    text = running.log_path.read_text()
    assert text.count("NO SAFETY CHECKER: its images go out unchecked") == 1
    checked = start_server(tmp_path / "checked.log")  # random:tiny has a checker
    stop_server(checked)
    assert "NO SAFETY CHECKER" not in checked.log_path.read_text()
