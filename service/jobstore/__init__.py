"""Jobs that outlive their request: their records (SQLite or Redis) and their signed webhooks.

Nothing here knows the web framework: service/web submits, claims and finishes jobs through the
JobStore protocol (records.py) and sends webhooks through Deliveries (webhooks.py).
"""

from __future__ import annotations

from pathlib import Path

from service.jobstore.records import FINISHED, STATES, JobRecord, JobStore, is_job_id, new_job_id

__all__ = ["FINISHED", "STATES", "JobRecord", "JobStore", "is_job_id", "new_job_id", "open_store"]

DEFAULT_FILE = "jobs.sqlite3"


def open_store(spec: str | None, data_dir: Path) -> JobStore:
    """The store ``spec`` (SD_JOB_STORE) names: None, "" or "sqlite" -> SQLite at
    ``data_dir/jobs.sqlite3`` (large results in ``data_dir/results``); "sqlite:///abs/path.db" -> that
    file (results in a ``results`` folder beside it); "redis://host:port/db" (or "rediss://") -> Redis."""
    # Imported here: a server on SQLite never loads the redis client, nor the reverse.
    if spec is None or spec.strip() in ("", "sqlite"):
        from service.jobstore.sqlite import SqliteStore

        return SqliteStore(data_dir / DEFAULT_FILE)
    spec = spec.strip()
    if spec.startswith("sqlite:///"):
        from service.jobstore.sqlite import SqliteStore

        path = Path(spec[len("sqlite://") :])
        if not path.is_absolute() or path.name == "":
            raise ValueError(
                "SD_JOB_STORE=sqlite:/// needs an absolute file path, e.g. sqlite:///var/lib/sd/jobs.db"
            )
        return SqliteStore(path)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from service.jobstore.redis_store import RedisStore

        return RedisStore.from_url(spec)
    # The spec may be a URL with a password: say what is accepted, not what was given.
    raise ValueError(
        "SD_JOB_STORE must be 'sqlite' (the default), 'sqlite:///absolute/path.db' or "
        "'redis://host:port/db'; the value given is none of these"
    )
