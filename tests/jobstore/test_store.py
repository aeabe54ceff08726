"""The JobStore contract, run on SQLite (a file in tmp_path) and on a real redis-server; then what only
SQLite promises: results as files, permissions, durability across kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from service.jobstore import JobRecord, JobStore, new_job_id, open_store
from service.jobstore.redis_store import RedisStore
from service.jobstore.sqlite import INLINE_RESULT_BYTES, SqliteStore
from tests.helpers.ports import free_port

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0
HOSTILE_IDS = [
    "../x",
    "../../etc/passwd",
    "job_" + "a" * 5000,
    "job_ÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅÅ",
    "",
    "job_\x00",
]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("redis-server did not answer PING within 20 s")
            time.sleep(0.05)
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait(timeout=10)


Factory = Callable[[], JobStore]


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Opens stores on one fresh database: each call is another replica (its own connection)."""
    opened: list[JobStore] = []
    if request.param == "sqlite":
        spec = f"sqlite://{tmp_path / 'db' / 'jobs.db'}"
    else:
        spec = request.getfixturevalue("redis_url")
        redis.Redis.from_url(spec).flushdb()

    def make() -> JobStore:
        opened.append(open_store(spec, tmp_path))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: Factory) -> JobStore:
    return make_store()


def job(
    caller: str = "alice", *, at: float = T0, key: str | None = None, body: bytes = b'{"prompt":"a cat"}'
) -> JobRecord:
    return JobRecord(
        id=new_job_id(), caller=caller, route="/score", body=body, content_type="application/json",
        state="queued", created_at=at, webhook="https://hooks.example/x", events=("start", "completed"),
        idempotency_key=key,
    )  # fmt: skip


def test_create_then_get_returns_the_record_and_hides_it_from_other_callers(store: JobStore) -> None:
    submitted = job()
    stored, created = store.create(submitted)
    assert created and stored == submitted
    assert store.get("alice", submitted.id) == submitted
    assert store.get("bob", submitted.id) is None
    assert store.get("alice", new_job_id()) is None


def test_create_refuses_records_it_did_not_make() -> None:
    from service.jobstore.records import check_new

    with pytest.raises(ValueError, match="new_job_id"):
        check_new(JobRecord("../x", "a", "/score", b"", "application/json", "queued", T0))
    with pytest.raises(ValueError, match="queued"):
        check_new(JobRecord(new_job_id(), "a", "/score", b"", "application/json", "running", T0))


def test_list_pages_newest_first_without_bodies_and_only_the_callers_jobs(store: JobStore) -> None:
    mine = [store.create(job(at=T0 + i))[0] for i in range(5)]
    store.create(job("bob"))
    first = store.list("alice", limit=2)
    assert [r.id for r in first] == [mine[4].id, mine[3].id]
    assert all(r.body == b"" and r.result is None for r in first)
    assert first[0].webhook == "https://hooks.example/x" and first[0].events == ("start", "completed")
    second = store.list("alice", limit=2, before=first[-1].id)
    assert [r.id for r in second] == [mine[2].id, mine[1].id]
    assert [r.id for r in store.list("alice", limit=10, before=second[-1].id)] == [mine[0].id]
    assert store.list("alice", before=mine[0].id) == []
    assert [r.caller for r in store.list("bob")] == ["bob"]
    assert store.list("bob", before=mine[3].id) == []  # another caller's cursor is no cursor
    assert store.list("alice", before="../x") == [] and store.list("alice", limit=0) == []


def test_an_idempotency_key_returns_the_callers_existing_job(store: JobStore) -> None:
    first, created = store.create(job(key="k1"))
    again, created_again = store.create(job(key="k1", body=b"other"))
    assert created and not created_again and again == first
    other, created_other = store.create(job("bob", key="k1"))
    assert created_other and other.id != first.id
    assert store.counts()["queued"] == 2
    # Once the job is gone the key may make a new one.
    assert store.delete("alice", first.id)
    assert store.create(job(key="k1"))[1]


def test_claim_takes_the_oldest_queued_job_and_marks_it_running(store: JobStore) -> None:
    jobs = [store.create(job(at=T0 + i))[0] for i in range(3)]
    claimed = store.claim("r1", 30, T0 + 10)
    assert claimed is not None and claimed.id == jobs[0].id
    assert (claimed.state, claimed.owner, claimed.lease_until, claimed.attempts) == (
        "running",
        "r1",
        T0 + 40,
        1,
    )
    assert claimed.started_at == T0 + 10 and claimed.body == jobs[0].body
    assert [store.claim("r1", 30, T0 + 10).id for _ in range(2)] == [jobs[1].id, jobs[2].id]  # type: ignore[union-attr]
    assert store.claim("r1", 30, T0 + 10) is None


def test_two_replicas_claiming_at_once_take_every_job_exactly_once(make_store: Factory) -> None:
    stores = [make_store(), make_store()]
    ids = {stores[0].create(job(at=T0 + i))[0].id for i in range(100)}
    taken: list[list[str]] = [[], []]

    def claim_50(n: int) -> None:
        for _ in range(50):
            claimed = stores[n].claim(f"r{n}", 600, T0 + 1)
            if claimed is not None:
                taken[n].append(claimed.id)

    threads = [threading.Thread(target=claim_50, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = taken[0] + taken[1]
    assert len(every) == 100 and set(every) == ids
    assert stores[0].counts()["running"] == 100 and stores[1].claim("r2", 600, T0 + 2) is None


def test_a_job_whose_lease_expired_is_taken_over_and_its_old_owner_is_refused(store: JobStore) -> None:
    submitted = store.create(job())[0]
    assert store.claim("dead", 10, T0) is not None
    assert store.claim("r2", 10, T0 + 5) is None  # still leased
    assert store.renew(submitted.id, "dead", 10, T0 + 5, 1, 4)  # renewed until T0 + 15
    assert store.claim("r2", 10, T0 + 14) is None
    taken = store.claim("r2", 10, T0 + 16)
    assert taken is not None and taken.id == submitted.id
    assert (taken.owner, taken.attempts, taken.started_at) == ("r2", 2, T0)
    assert not store.renew(submitted.id, "dead", 10, T0 + 17, 2, 4)
    assert not store.finish(submitted.id, "dead", state="succeeded", now=T0 + 17, status=200, result=b"x")
    assert store.finish(submitted.id, "r2", state="succeeded", now=T0 + 18, status=200, result=b"{}",
                        result_type="application/json")  # fmt: skip
    done = store.get("alice", submitted.id)
    assert done is not None
    assert (done.state, done.status, done.result, done.result_type, done.finished_at) == (
        "succeeded", 200, b"{}", "application/json", T0 + 18,
    )  # fmt: skip
    assert store.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0}


def test_renew_records_progress_and_says_false_once_a_cancel_is_requested(store: JobStore) -> None:
    submitted = store.create(job())[0]
    store.claim("r1", 10, T0)
    assert store.renew(submitted.id, "r1", 10, T0 + 1, 3, 20)
    progressed = store.get("alice", submitted.id)
    assert progressed is not None and (progressed.step, progressed.steps, progressed.lease_until) == (
        3,
        20,
        T0 + 11,
    )
    cancelling = store.cancel("alice", submitted.id, T0 + 2)
    assert cancelling is not None and cancelling.state == "running" and cancelling.cancel_requested
    assert not store.renew(submitted.id, "r1", 10, T0 + 3, 4, 20)
    assert store.finish(
        submitted.id, "r1", state="cancelled", now=T0 + 4, error={"code": "cancelled", "message": "m"}
    )
    cancelled = store.get("alice", submitted.id)
    assert cancelled is not None and cancelled.state == "cancelled" and cancelled.error is not None


def test_finish_by_a_replica_that_does_not_own_the_job_is_refused(store: JobStore) -> None:
    submitted = store.create(job())[0]
    assert not store.finish(submitted.id, "r1", state="succeeded", now=T0)  # not even claimed
    store.claim("r1", 10, T0)
    assert not store.finish(submitted.id, "r2", state="failed", now=T0, error={"code": "x", "message": "y"})
    assert store.finish(
        submitted.id, "r1", state="failed", now=T0 + 1, status=500, error={"code": "x", "message": "y"}
    )
    assert not store.finish(submitted.id, "r1", state="succeeded", now=T0 + 2)  # finished once only
    with pytest.raises(ValueError, match="finishes as one of"):
        store.finish(submitted.id, "r1", state="running", now=T0)


def test_cancel_ends_a_queued_job_flags_a_running_one_and_leaves_a_finished_one(store: JobStore) -> None:
    running = store.create(job(at=T0))[0]
    assert store.claim("r1", 10, T0) is not None
    finished = store.create(job(at=T0 + 1))[0]
    assert store.claim("r1", 10, T0) is not None
    assert store.finish(finished.id, "r1", state="succeeded", now=T0 + 1, status=200)
    queued = store.create(job(at=T0 + 2))[0]
    gone = store.cancel("alice", queued.id, T0 + 6)
    assert gone is not None and gone.state == "cancelled" and gone.finished_at == T0 + 6
    assert gone.error is not None and gone.error["code"] == "cancelled"
    assert store.claim("r2", 10, T0 + 7) is None  # the cancelled job is never run
    flagged = store.cancel("alice", running.id, T0 + 6)
    assert flagged is not None and flagged.state == "running" and flagged.cancel_requested
    unchanged = store.cancel("alice", finished.id, T0 + 6)
    assert unchanged is not None and unchanged.state == "succeeded" and not unchanged.cancel_requested
    assert store.cancel("bob", running.id, T0) is None
    assert store.queued_for("alice") == 1
    assert store.counts() == {"queued": 0, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 1}


def test_an_expired_job_whose_cancel_was_requested_is_cancelled_not_run_again(store: JobStore) -> None:
    submitted = store.create(job())[0]
    store.claim("dead", 10, T0)
    store.cancel("alice", submitted.id, T0 + 1)
    assert store.claim("r2", 10, T0 + 20) is None
    ended = store.get("alice", submitted.id)
    assert ended is not None and ended.state == "cancelled" and ended.attempts == 1
    assert (
        store.counts()["cancelled"] == 1 and store.counts()["running"] == 0 and store.queued_for("alice") == 0
    )


def test_delete_drops_any_job_and_its_runner_learns_it_at_the_next_renew(store: JobStore) -> None:
    queued, running = store.create(job())[0], store.create(job(at=T0 + 1))[0]
    assert not store.delete("bob", queued.id)
    assert store.delete("alice", queued.id) and store.get("alice", queued.id) is None
    assert not store.delete("alice", queued.id)
    claimed = store.claim("r1", 10, T0)
    assert claimed is not None and claimed.id == running.id
    assert store.delete("alice", running.id)
    assert not store.renew(running.id, "r1", 10, T0 + 1, 1, 2)
    assert not store.finish(running.id, "r1", state="succeeded", now=T0 + 2, result=b"x" * 100)
    assert store.get("alice", running.id) is None and store.list("alice") == []
    assert store.counts() == dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0)
    assert store.size_bytes() == 0 and store.queued_for("alice") == 0


def test_expire_drops_only_the_jobs_finished_longer_ago_than_the_ttl(store: JobStore) -> None:
    old, recent, waiting = (store.create(job(at=T0 + i))[0] for i in range(3))
    store.claim("r", 10, T0)
    store.claim("r", 10, T0)
    store.finish(old.id, "r", state="succeeded", now=T0 + 10, result=b"r" * 10)
    store.finish(recent.id, "r", state="failed", now=T0 + 100, error={"code": "c", "message": "m"})
    assert store.expire(T0 + 150, ttl_s=60) == 1
    assert store.get("alice", old.id) is None and store.get("alice", recent.id) is not None
    assert store.expire(T0 + 150, ttl_s=60) == 0
    assert store.expire(T0 + 10_000, ttl_s=60) == 1
    assert [r.id for r in store.list("alice")] == [waiting.id]
    assert store.counts()["succeeded"] == store.counts()["failed"] == 0


def test_counts_queued_for_and_size_bytes_follow_every_change(store: JobStore) -> None:
    a = store.create(job(body=b"x" * 100))[0]
    store.create(job(at=T0 + 1, body=b"y" * 50))
    store.create(job("bob", body=b"z" * 7))
    assert store.size_bytes() == 157
    assert store.queued_for("alice") == 2 and store.queued_for("bob") == 1 and store.queued_for("carol") == 0
    store.claim("r", 10, T0)
    assert store.counts() == {"queued": 2, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert store.queued_for("alice") == 2
    store.finish(a.id, "r", state="succeeded", now=T0 + 1, status=200, result=b"r" * 1000)
    assert store.queued_for("alice") == 1 and store.size_bytes() == 1157
    assert store.delete("alice", a.id) and store.size_bytes() == 57


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
def test_hostile_ids_are_simply_not_found(store: JobStore, hostile: str, tmp_path: Path) -> None:
    store.create(job())
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert store.get("alice", hostile) is None
    assert store.cancel("alice", hostile, T0) is None
    assert not store.delete("alice", hostile)
    assert not store.renew(hostile, "r", 10, T0, 0, 0)
    assert not store.finish(hostile, "r", state="succeeded", now=T0, result=b"x" * (INLINE_RESULT_BYTES + 1))
    assert store.list("alice", before=hostile) == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# -- open_store ---------------------------------------------------------------------------------


def test_open_store_picks_the_store_its_spec_names(tmp_path: Path, redis_url: str) -> None:
    for spec in (None, "sqlite", " sqlite "):
        opened = open_store(spec, tmp_path / "data")
        assert isinstance(opened, SqliteStore) and opened.path == tmp_path / "data" / "jobs.sqlite3"
        opened.close()
    elsewhere = open_store(f"sqlite://{tmp_path / 'other' / 'x.db'}", tmp_path / "data")
    assert isinstance(elsewhere, SqliteStore) and elsewhere.results_dir == tmp_path / "other" / "results"
    elsewhere.close()
    shared = open_store(redis_url, tmp_path)
    assert isinstance(shared, RedisStore)
    shared.close()


@pytest.mark.parametrize("spec", ["postgres://u:secret@h/db", "sqlite://relative.db", "jobs.db", "mysql"])
def test_open_store_refuses_other_specs_without_repeating_them(tmp_path: Path, spec: str) -> None:
    with pytest.raises(ValueError, match="SD_JOB_STORE") as refused:
        open_store(spec, tmp_path)
    assert "secret" not in str(refused.value)


def test_an_unreachable_redis_is_said_plainly_without_its_password(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="cannot reach") as refused:
        open_store(f"redis://:hunter2@127.0.0.1:{free_port()}/0", tmp_path)
    assert "hunter2" not in str(refused.value)


# -- SQLite only --------------------------------------------------------------------------------


def test_sqlite_keeps_large_results_as_private_files_and_removes_them(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "d" / "jobs.db")
    big, small, deleted = (store.create(job(at=T0 + i))[0] for i in range(3))
    for _ in range(3):
        store.claim("r", 10, T0)
    png = os.urandom(INLINE_RESULT_BYTES + 1)
    store.finish(big.id, "r", state="succeeded", now=T0, status=200, result=png, result_type="image/png")
    store.finish(small.id, "r", state="succeeded", now=T0, status=200, result=b"{}")
    store.finish(deleted.id, "r", state="succeeded", now=T0, status=200, result=png)
    results = tmp_path / "d" / "results"
    assert sorted(p.name for p in results.iterdir()) == sorted([big.id, deleted.id])
    got = store.get("alice", big.id)
    assert got is not None and got.result == png
    assert store.size_bytes() == 3 * len(job().body) + 2 * len(png) + 2
    assert (results / big.id).stat().st_mode & 0o777 == 0o600
    assert results.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "d" / "jobs.db").stat().st_mode & 0o777 == 0o600
    assert store.delete("alice", deleted.id) and not (results / deleted.id).exists()
    assert store.expire(T0 + 100, 10) == 2 and list(results.iterdir()) == []
    store.close()


def test_sqlite_removes_old_result_files_no_row_names(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "jobs.db")
    stray, fresh = tmp_path / "results" / new_job_id(), tmp_path / "results" / new_job_id()
    stray.write_bytes(b"left by a crash")
    fresh.write_bytes(b"a finish in progress elsewhere")
    os.utime(stray, (time.time() - 7200, time.time() - 7200))
    store.expire(T0, 10)
    assert not stray.exists() and fresh.exists()
    store.close()


def test_sqlite_refuses_a_file_from_a_newer_schema(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "jobs.db").close()
    import sqlite3

    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="newer than this release"):
        SqliteStore(tmp_path / "jobs.db")


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from service.jobstore import JobRecord, new_job_id, open_store
    store = open_store(None, Path(sys.argv[1]))
    for i in range(3):
        record = JobRecord(new_job_id(), "alice", "/score", b"body%d" % i, "text/plain", "queued", 100.0 + i)
        store.create(record)
    claimed = store.claim("doomed", 30, 200.0)
    print(claimed.id, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_sqlite_keeps_committed_jobs_when_its_process_is_killed(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None
        claimed_id = writer.stdout.readline().strip()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    assert claimed_id.startswith("job_")
    store = open_store(None, tmp_path)
    assert store.counts()["queued"] == 2 and store.counts()["running"] == 1
    assert [r.body for r in store.list("alice")] == [b"", b"", b""]
    assert store.claim("heir", 30, 201.0).id != claimed_id  # type: ignore[union-attr]  # still leased
    store.claim("heir", 30, 201.0)
    assert store.claim("heir", 30, 229.0) is None
    taken = store.claim("heir", 30, 231.0)
    assert taken is not None and taken.id == claimed_id and taken.attempts == 2 and taken.body == b"body0"
    store.close()
