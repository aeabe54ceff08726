"""One stage of benchmarks/gpu_suite.py in a process of its own: started (a fresh interpreter or a
fork), given its plan, killed at its budget, and its record completed whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from gpu_plan import HERE, Plan, read_record, stage_file, write_json


class SuiteStopped(Exception):
    """SIGTERM (a time limit from outside): finish the record of the running stage, then stop."""


def run_stage_process(plan: Plan, deepspeed_path: bool, fork: bool) -> bool:
    """Run one stage in its own process group; complete its record. False if the suite was stopped."""
    work = Path(plan.work)
    plan_file = work / "plans" / f"{plan.index:02d}-{plan.stage}.json"
    plan_file.write_text(json.dumps(asdict(plan), indent=2))
    log_path = work / "logs" / f"{plan.index:02d}-{plan.stage}.log"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    if deepspeed_path and plan.deepspeed_site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [plan.deepspeed_site, env.get("PYTHONPATH", "")]))
    started = time.time()
    cpu_before = _children_cpu_s()
    print(f"[{plan.stage}] stage {plan.index}: {plan.title} (budget {plan.budget_s:.0f} s)", flush=True)
    killed = stopped = False
    with log_path.open("w") as log:
        proc = StageProcess(plan_file, env, fork=fork and not deepspeed_path)
        reader = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(started + plan.budget_s - time.time(), 1))
        except subprocess.TimeoutExpired:
            killed = True
        except SuiteStopped:
            killed = stopped = True
        if killed:
            with _ignoring_sigterm():
                proc.kill()
        reader.join(timeout=5)
    finish_record(plan, proc.returncode, killed, stopped, time.time() - started, log_path)
    _add_to_record(plan, cpu_s=round(_children_cpu_s() - cpu_before, 1))
    return not stopped


class StageProcess:
    """A stage's process, in a process group of its own (killing it kills whatever it started).

    A fresh interpreter (exec) wherever CUDA may be used: CUDA does not survive a fork. On the CPU
    (the dry run) a fork of the suite, which has imported torch and diffusers once, so that eight
    stages do not pay eight imports.
    """

    def __init__(self, plan_file: Path, env: dict[str, str], fork: bool) -> None:
        self.returncode: int | None = None
        self._popen: subprocess.Popen[str] | None = None
        self.stdout: IO[str]
        if fork:
            sys.stdout.flush()
            sys.stderr.flush()
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                _forked_stage(plan_file, read, write)  # never returns
            os.close(write)
            self.pid = pid
            self.stdout = os.fdopen(read, "r", errors="replace")
        else:
            # the suite's own script, whose --stage-plan runs one stage (gpu_stages.run_stage)
            self._popen = subprocess.Popen(
                [sys.executable, str(HERE / "gpu_suite.py"), "--stage-plan", str(plan_file)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                env=env,
                start_new_session=True,
            )
            self.pid = self._popen.pid
            assert self._popen.stdout is not None
            self.stdout = self._popen.stdout

    def wait(self, timeout: float) -> int:
        """The exit status; subprocess.TimeoutExpired if it is still running after ``timeout``."""
        if self._popen is not None:
            self.returncode = self._popen.wait(timeout=timeout)
            return self.returncode
        end = time.time() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                return self.returncode
            if time.time() >= end:
                raise subprocess.TimeoutExpired(f"stage process {self.pid}", timeout)
            time.sleep(0.1)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self._popen is not None:
            self.returncode = self._popen.wait()
        else:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)


def _forked_stage(plan_file: Path, read: int, write: int) -> None:
    """The forked child: a session of its own, output into the pipe, run the stage, exit."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.close(read)
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        from gpu_stages import run_stage

        code = run_stage(str(plan_file))
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _add_to_record(plan: Plan, **values: Any) -> None:
    record = read_record(plan.out, plan.index, plan.stage)
    if record is not None:
        write_json(stage_file(plan.out, plan.index, plan.stage), record | values)


class _ignoring_sigterm:
    def __enter__(self) -> None:
        self.previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _tee(stream: Any, log: Any) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        sys.stdout.write(line)
        sys.stdout.flush()


def finish_record(
    plan: Plan, returncode: int | None, killed: bool, stopped: bool, wall: float, log: Path
) -> None:
    record = read_record(plan.out, plan.index, plan.stage) or {
        "stage": plan.index,
        "name": plan.stage,
        "title": plan.title,
        "status": "running",
        "cases": [],
        "skipped_for_time": [],
    }
    if record.get("status") == "running":
        record["status"] = "timeout" if killed else "crashed"
    if killed:
        why = "the suite was stopped" if stopped else f"its {plan.budget_s:.0f} s budget ran out"
        record.setdefault("skipped_for_time", []).append(
            f"stopped: {why}; the cases above had finished, the rest did not run"
        )
    record.update(returncode=returncode, wall_s=round(wall, 1), budget_s=round(plan.budget_s, 1))
    if record["status"] not in ("ok", "not_run", "skipped"):
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        record["log_tail"] = "\n".join(lines[-60:])[-6000:]
    write_json(stage_file(plan.out, plan.index, plan.stage), record)
    print(f"[{plan.stage}] {record['status']} in {wall:.0f} s", flush=True)
