"""Jobs in one SQLite file (WAL mode), large results as files beside it: one machine, any number of
processes and threads, nothing lost when a process is killed (every write is a committed
transaction, synchronous=FULL)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.jobstore.records import CANCELLED_ERROR, STATES, JobRecord, check_new, is_job_id, may_finish

if TYPE_CHECKING:  # typing.Unpack is 3.11+; the package still runs on 3.10
    from typing_extensions import Unpack

    from service.jobstore.records import Outcome

SCHEMA_VERSION = 1
# Results above this go to a file: a row stays small, so that listing and claiming never page
# megabytes of PNG through SQLite's cache.
INLINE_RESULT_BYTES = 64 * 1024
# A result file no row names (a process died between writing it and committing) is removed by
# expire() once it is this old; younger ones may belong to a finish in progress in another process.
ORPHAN_AGE_S = 3600.0
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    caller TEXT NOT NULL,
    route TEXT NOT NULL,
    body BLOB NOT NULL,
    content_type TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    status INTEGER,
    result BLOB,
    result_file TEXT,
    result_bytes INTEGER NOT NULL DEFAULT 0,
    result_type TEXT,
    error TEXT,
    webhook TEXT,
    events TEXT NOT NULL,
    idempotency_key TEXT,
    owner TEXT,
    lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_caller ON jobs (caller, seq);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_lease ON jobs (state, lease_until);
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_idempotency ON jobs (caller, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
"""
_LIGHT = "seq, id, caller, route, X'' AS body, content_type, state, created_at, started_at, finished_at, \
step, steps, status, NULL AS result, NULL AS result_file, result_bytes, result_type, error, webhook, events, \
idempotency_key, owner, lease_until, cancel_requested, attempts"


class SqliteStore:
    """The JobStore on SQLite. One connection, shared by the threads under a lock: SQLite serializes
    writers anyway, and other processes on the same file wait on busy_timeout."""

    def __init__(self, path: Path, results_dir: Path | None = None) -> None:
        self.path = path
        self.results_dir = results_dir if results_dir is not None else path.parent / "results"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.results_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Made here with 0o600 before SQLite opens it: SQLite gives its -wal and -shm files the
        # database's permissions, so prompts and images stay the service user's.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._migrate()

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the job store {self.path} has schema version {version}, newer than this release's "
                    f"{SCHEMA_VERSION}: run a newer release, or point SD_JOB_STORE at another file"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front: a claim's read and update cannot interleave
        # with another process's claim.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- records ------------------------------------------------------------------------------

    def _record(self, row: sqlite3.Row) -> JobRecord:
        result: bytes | None = row["result"]
        if row["result_file"] is not None:
            try:
                result = (self.results_dir / row["result_file"]).read_bytes()
            except FileNotFoundError:
                result = None  # deleted or expired between the read of the row and of the file
        return JobRecord(
            id=row["id"],
            caller=row["caller"],
            route=row["route"],
            body=bytes(row["body"]),
            content_type=row["content_type"],
            state=row["state"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            step=row["step"],
            steps=row["steps"],
            status=row["status"],
            result=None if result is None else bytes(result),
            result_type=row["result_type"],
            error=None if row["error"] is None else json.loads(row["error"]),
            webhook=row["webhook"],
            events=tuple(json.loads(row["events"])),
            idempotency_key=row["idempotency_key"],
            owner=row["owner"],
            lease_until=row["lease_until"],
            cancel_requested=bool(row["cancel_requested"]),
            attempts=row["attempts"],
        )

    def _row(self, db: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row

    def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        check_new(record)
        with self._transaction() as db:
            if record.idempotency_key is not None:
                found = db.execute(
                    "SELECT * FROM jobs WHERE caller = ? AND idempotency_key = ?",
                    (record.caller, record.idempotency_key),
                ).fetchone()
                if found is not None:
                    return self._record(found), False
            db.execute(
                "INSERT INTO jobs (id, caller, route, body, content_type, state, created_at, webhook, events,"
                " idempotency_key) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (record.id, record.caller, record.route, record.body, record.content_type,
                 record.created_at, record.webhook, json.dumps(list(record.events)),
                 record.idempotency_key),
            )  # fmt: skip
            row = self._row(db, record.id)
        assert row is not None
        return self._record(row), True

    def get(self, caller: str, job_id: str) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        rows = self._read("SELECT * FROM jobs WHERE id = ? AND caller = ?", (job_id, caller))
        return self._record(rows[0]) if rows else None

    def list(self, caller: str, *, limit: int = 20, before: str | None = None) -> list[JobRecord]:
        if limit <= 0:
            return []
        if before is None:
            rows = self._read(
                f"SELECT {_LIGHT} FROM jobs WHERE caller = ? ORDER BY seq DESC LIMIT ?", (caller, limit)
            )
        elif not is_job_id(before):
            return []
        else:
            rows = self._read(
                f"SELECT {_LIGHT} FROM jobs WHERE caller = ? AND seq < "
                "(SELECT seq FROM jobs WHERE id = ? AND caller = ?) ORDER BY seq DESC LIMIT ?",
                (caller, before, caller, limit),
            )
        return [self._record(row) for row in rows]

    # -- running ------------------------------------------------------------------------------

    def claim(self, replica: str, lease_s: float, now: float) -> JobRecord | None:
        with self._transaction() as db:
            # An expired job whose cancel was requested has nobody left to stop it: it ends here.
            db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = ?, lease_until = NULL"
                " WHERE state = 'running' AND lease_until < ? AND cancel_requested = 1",
                (now, json.dumps(CANCELLED_ERROR), now),
            )
            found = db.execute(
                "SELECT id FROM jobs WHERE state = 'running' AND lease_until < ?"
                " ORDER BY lease_until LIMIT 1",
                (now,),
            ).fetchone()
            if found is None:
                found = db.execute(
                    "SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1"
                ).fetchone()
            if found is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', owner = ?, lease_until = ?, attempts = attempts + 1,"
                " started_at = COALESCE(started_at, ?) WHERE id = ?",
                (replica, now + lease_s, now, found["id"]),
            )
            row = self._row(db, found["id"])
        assert row is not None
        return self._record(row)

    def renew(self, job_id: str, replica: str, lease_s: float, now: float, step: int, steps: int) -> bool:
        if not is_job_id(job_id):
            return False
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET lease_until = ?, step = ?, steps = ?"
                " WHERE id = ? AND owner = ? AND state = 'running'",
                (now + lease_s, step, steps, job_id, replica),
            ).rowcount
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return changed == 1 and row is not None and not row["cancel_requested"]

    def finish(
        self, job_id: str, replica: str, *, state: str, now: float, **outcome: Unpack[Outcome]
    ) -> bool:
        if not may_finish(job_id, state):
            return False
        result = outcome.get("result")
        as_file = result is not None and len(result) > INLINE_RESULT_BYTES
        error = outcome.get("error")
        with self._transaction() as db:
            owned = db.execute(
                "SELECT 1 FROM jobs WHERE id = ? AND owner = ? AND state = 'running'", (job_id, replica)
            ).fetchone()
            if owned is None:
                return False
            if as_file:
                assert result is not None
                # Written while this transaction holds the write lock: no other finish or delete of
                # this job can run between the file and the row that names it.
                self._write_result(job_id, result)
            db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, status = ?, result = ?, result_file = ?,"
                " result_bytes = ?, result_type = ?, error = ?, lease_until = NULL WHERE id = ?",
                (state, now, outcome.get("status"), None if as_file else result, job_id if as_file else None,
                 0 if result is None else len(result), outcome.get("result_type"),
                 None if error is None else json.dumps(error), job_id),
            )  # fmt: skip
        return True

    def _write_result(self, job_id: str, data: bytes) -> None:
        final = self.results_dir / job_id
        temporary = self.results_dir / f".{job_id}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        # The rename itself is durable only once the folder is synced.
        folder = os.open(self.results_dir, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    # -- callers' changes ---------------------------------------------------------------------

    def cancel(self, caller: str, job_id: str, now: float) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        with self._transaction() as db:
            row = db.execute(
                "SELECT state FROM jobs WHERE id = ? AND caller = ?", (job_id, caller)
            ).fetchone()
            if row is None:
                return None
            if row["state"] == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = ? WHERE id = ?",
                    (now, json.dumps(CANCELLED_ERROR), job_id),
                )
            elif row["state"] == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            row = self._row(db, job_id)
        assert row is not None
        return self._record(row)

    def delete(self, caller: str, job_id: str) -> bool:
        if not is_job_id(job_id):
            return False
        with self._transaction() as db:
            row = db.execute(
                "SELECT result_file FROM jobs WHERE id = ? AND caller = ?", (job_id, caller)
            ).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            if row["result_file"] is not None:
                (self.results_dir / row["result_file"]).unlink(missing_ok=True)
        return True

    def expire(self, now: float, ttl_s: float) -> int:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, result_file FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?",
                (now - ttl_s,),
            ).fetchall()
            db.executemany("DELETE FROM jobs WHERE id = ?", [(row["id"],) for row in rows])
            for row in rows:
                if row["result_file"] is not None:
                    (self.results_dir / row["result_file"]).unlink(missing_ok=True)
            self._remove_orphans(db)
        return len(rows)

    def _remove_orphans(self, db: sqlite3.Connection) -> None:
        named = {row[0] for row in db.execute("SELECT result_file FROM jobs WHERE result_file IS NOT NULL")}
        cutoff = time.time() - ORPHAN_AGE_S
        for entry in os.scandir(self.results_dir):
            if entry.name not in named and entry.is_file() and entry.stat().st_mtime < cutoff:
                Path(entry.path).unlink(missing_ok=True)

    # -- figures ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        found = {row[0]: int(row[1]) for row in self._read("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
        return {state: found.get(state, 0) for state in STATES}

    def queued_for(self, caller: str) -> int:
        rows = self._read(
            "SELECT COUNT(*) FROM jobs WHERE caller = ? AND state IN ('queued', 'running')", (caller,)
        )
        return int(rows[0][0])

    def size_bytes(self) -> int:
        rows = self._read("SELECT COALESCE(SUM(LENGTH(body) + result_bytes), 0) FROM jobs")
        return int(rows[0][0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
