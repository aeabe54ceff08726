"""Jobs in Redis, shared by several replicas: every change is one Lua script, so a job is claimed by
exactly one replica and the counters never drift from the records.

Keys (``sdjobs`` is the prefix): ``:job:<id>`` a hash per record; ``:caller:<caller>`` a sorted set
of that caller's ids by creation order (listing); ``:queue`` the queued ids by creation order;
``:running`` the running ids by lease deadline (an expired one is taken over); ``:finished`` the
finished ids by finish time (expiry); ``:idem:<caller>:<key>`` the id an idempotency key made;
``:counts`` jobs per state, ``:active`` queued + running per caller, ``:bytes`` bodies and results
held, ``:seq`` the creation counter. The scripts name keys they build, so one Redis server (or a
primary with replicas) is supported, not Redis Cluster.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

import redis

from service.jobstore.records import CANCELLED_ERROR, STATES, JobRecord, check_new, is_job_id, may_finish

if TYPE_CHECKING:  # typing.Unpack is 3.11+; the package still runs on 3.10
    from typing_extensions import Unpack

    from service.jobstore.records import Outcome

PREFIX = "sdjobs"
_EXPIRE_BATCH = 500
_LIGHT_FIELDS = [
    "id", "caller", "route", "content_type", "state", "created_at", "started_at", "finished_at", "step",
    "steps", "status", "result_type", "error", "webhook", "events", "idempotency_key", "owner",
    "lease_until", "cancel_requested", "attempts",
]  # fmt: skip

# Shared by the scripts: end a job (from queued or running) in ``state`` and keep the indexes and
# counters in step; drop a job and everything that points at it.
_LUA_COMMON = """
local function conclude(p, id, k, from, caller, state, now)
  redis.call('HSET', k, 'state', state, 'finished_at', now)
  redis.call('HDEL', k, 'lease_until')
  redis.call('ZREM', p..':queue', id)
  redis.call('ZREM', p..':running', id)
  redis.call('ZADD', p..':finished', now, id)
  redis.call('HINCRBY', p..':counts', from, -1)
  redis.call('HINCRBY', p..':counts', state, 1)
  redis.call('HINCRBY', p..':active', caller, -1)
end
local function drop(p, id)
  local k = p..':job:'..id
  local f = redis.call('HMGET', k, 'state', 'caller', 'idem', 'body_bytes', 'result_bytes')
  if not f[1] then return 0 end
  redis.call('HINCRBY', p..':counts', f[1], -1)
  if f[1] == 'queued' or f[1] == 'running' then redis.call('HINCRBY', p..':active', f[2], -1) end
  redis.call('DECRBY', p..':bytes', tonumber(f[4] or '0') + tonumber(f[5] or '0'))
  if f[3] and redis.call('GET', f[3]) == id then redis.call('DEL', f[3]) end
  redis.call('ZREM', p..':caller:'..f[2], id)
  redis.call('ZREM', p..':queue', id)
  redis.call('ZREM', p..':running', id)
  redis.call('ZREM', p..':finished', id)
  redis.call('DEL', k)
  return 1
end
"""

# ARGV: prefix, id, caller, idempotency key's name ('' for none), body bytes, then field, value...
_CREATE = """
local p, id, caller, idem = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing and redis.call('EXISTS', p..':job:'..existing) == 1 then
    return {0, redis.call('HGETALL', p..':job:'..existing)}
  end
end
local k = p..':job:'..id
local seq = redis.call('INCR', p..':seq')
redis.call('HSET', k, unpack(ARGV, 6))
redis.call('HSET', k, 'seq', seq, 'state', 'queued', 'body_bytes', ARGV[5])
if idem ~= '' then
  redis.call('SET', idem, id)
  redis.call('HSET', k, 'idem', idem)
end
redis.call('ZADD', p..':caller:'..caller, seq, id)
redis.call('ZADD', p..':queue', seq, id)
redis.call('HINCRBY', p..':counts', 'queued', 1)
redis.call('HINCRBY', p..':active', caller, 1)
redis.call('INCRBY', p..':bytes', ARGV[5])
return {1, redis.call('HGETALL', k)}
"""

# ARGV: prefix, replica, now, lease deadline, the cancelled error (JSON)
_CLAIM = """
local p, replica, now, lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
while true do
  local expired = redis.call('ZRANGEBYSCORE', p..':running', '-inf', '('..now, 'LIMIT', 0, 1)
  if #expired == 0 then break end
  local id = expired[1]
  local k = p..':job:'..id
  local f = redis.call('HMGET', k, 'cancel_requested', 'caller')
  if not f[2] then
    redis.call('ZREM', p..':running', id)
  elseif f[1] == '1' then
    conclude(p, id, k, 'running', f[2], 'cancelled', now)
    redis.call('HSET', k, 'error', ARGV[5])
  else
    redis.call('HSET', k, 'owner', replica, 'lease_until', lease)
    redis.call('HINCRBY', k, 'attempts', 1)
    redis.call('ZADD', p..':running', lease, id)
    return redis.call('HGETALL', k)
  end
end
while true do
  local queued = redis.call('ZRANGE', p..':queue', 0, 0)
  if #queued == 0 then return false end
  local id = queued[1]
  local k = p..':job:'..id
  redis.call('ZREM', p..':queue', id)
  if redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'state', 'running', 'owner', replica, 'lease_until', lease)
    redis.call('HSETNX', k, 'started_at', now)
    redis.call('HINCRBY', k, 'attempts', 1)
    redis.call('ZADD', p..':running', lease, id)
    redis.call('HINCRBY', p..':counts', 'queued', -1)
    redis.call('HINCRBY', p..':counts', 'running', 1)
    return redis.call('HGETALL', k)
  end
end
"""

# ARGV: prefix, id, replica, lease deadline, step, steps
_RENEW = """
local p, id, replica = ARGV[1], ARGV[2], ARGV[3]
local k = p..':job:'..id
local f = redis.call('HMGET', k, 'owner', 'state', 'cancel_requested')
if f[1] ~= replica or f[2] ~= 'running' then return 0 end
redis.call('HSET', k, 'lease_until', ARGV[4], 'step', ARGV[5], 'steps', ARGV[6])
redis.call('ZADD', p..':running', ARGV[4], id)
if f[3] == '1' then return 0 end
return 1
"""

# ARGV: prefix, id, replica, state, now, result bytes, then field, value...
_FINISH = """
local p, id, replica = ARGV[1], ARGV[2], ARGV[3]
local k = p..':job:'..id
local f = redis.call('HMGET', k, 'owner', 'state', 'caller')
if f[1] ~= replica or f[2] ~= 'running' then return 0 end
conclude(p, id, k, 'running', f[3], ARGV[4], ARGV[5])
if #ARGV > 6 then redis.call('HSET', k, unpack(ARGV, 7)) end
redis.call('HSET', k, 'result_bytes', ARGV[6])
redis.call('INCRBY', p..':bytes', ARGV[6])
return 1
"""

# ARGV: prefix, id, caller, now, the cancelled error (JSON)
_CANCEL = """
local p, id, caller = ARGV[1], ARGV[2], ARGV[3]
local k = p..':job:'..id
local f = redis.call('HMGET', k, 'caller', 'state')
if f[1] ~= caller then return false end
if f[2] == 'queued' then
  conclude(p, id, k, 'queued', caller, 'cancelled', ARGV[4])
  redis.call('HSET', k, 'error', ARGV[5])
elseif f[2] == 'running' then
  redis.call('HSET', k, 'cancel_requested', '1')
end
return redis.call('HGETALL', k)
"""

# ARGV: prefix, id, caller
_DELETE = """
if redis.call('HGET', ARGV[1]..':job:'..ARGV[2], 'caller') ~= ARGV[3] then return 0 end
return drop(ARGV[1], ARGV[2])
"""

# ARGV: prefix, cutoff, batch
_EXPIRE = """
local ids = redis.call('ZRANGEBYSCORE', ARGV[1]..':finished', '-inf', '('..ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  if drop(ARGV[1], id) == 0 then redis.call('ZREM', ARGV[1]..':finished', id) end
end
return #ids
"""


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _number(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _record(fields: dict[bytes, bytes]) -> JobRecord:
    def get(name: str) -> bytes | None:
        return fields.get(name.encode())

    error, events, status = get("error"), get("events"), get("status")
    return JobRecord(
        id=fields[b"id"].decode(),
        caller=fields[b"caller"].decode(),
        route=fields[b"route"].decode(),
        body=get("body") or b"",
        content_type=fields[b"content_type"].decode(),
        state=fields[b"state"].decode(),
        created_at=float(fields[b"created_at"]),
        started_at=_number(get("started_at")),
        finished_at=_number(get("finished_at")),
        step=int(get("step") or 0),
        steps=int(get("steps") or 0),
        status=None if status is None else int(status),
        result=get("result"),
        result_type=_text(get("result_type")),
        error=None if error is None else json.loads(error),
        webhook=_text(get("webhook")),
        events=("completed",) if events is None else tuple(json.loads(events)),
        idempotency_key=_text(get("idempotency_key")),
        owner=_text(get("owner")),
        lease_until=_number(get("lease_until")),
        cancel_requested=get("cancel_requested") == b"1",
        attempts=int(get("attempts") or 0),
    )


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisStore:
    """The JobStore on Redis. The client's connection pool is thread-safe."""

    def __init__(self, client: redis.Redis, prefix: str = PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        scripts = {
            name: client.register_script(_LUA_COMMON + source)
            for name, source in {
                "create": _CREATE, "claim": _CLAIM, "renew": _RENEW, "finish": _FINISH,
                "cancel": _CANCEL, "delete": _DELETE, "expire": _EXPIRE,
            }.items()
        }  # fmt: skip
        self._scripts = scripts

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
        where = client.connection_pool.connection_kwargs
        try:
            client.ping()
        except redis.RedisError as error:
            client.close()
            # The URL may hold a password: name only the host and port.
            raise RuntimeError(
                f"cannot reach the job store's Redis at {where.get('host')}:{where.get('port')} "
                f"({type(error).__name__}): start it, or fix SD_JOB_STORE"
            ) from None
        return cls(client)

    def _run(self, name: str, *args: Any) -> Any:
        return self._scripts[name](keys=[], args=[self._prefix, *args])

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}:{kind}:{name}"

    def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        check_new(record)
        idem = (
            ""
            if record.idempotency_key is None
            else self._key("idem", f"{record.caller}:{record.idempotency_key}")
        )
        fields: dict[str, bytes | str] = {
            "id": record.id,
            "caller": record.caller,
            "route": record.route,
            "body": record.body,
            "content_type": record.content_type,
            "created_at": repr(record.created_at),
            "events": json.dumps(list(record.events)),
            "step": "0",
            "steps": "0",
            "attempts": "0",
            "cancel_requested": "0",
        }
        if record.webhook is not None:
            fields["webhook"] = record.webhook
        if record.idempotency_key is not None:
            fields["idempotency_key"] = record.idempotency_key
        flat = [item for pair in fields.items() for item in pair]
        created, stored = self._run("create", record.id, record.caller, idem, len(record.body), *flat)
        return _record(_pairs(stored)), bool(created)

    def get(self, caller: str, job_id: str) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        fields = cast(dict[bytes, bytes], self._redis.hgetall(self._key("job", job_id)))
        if not fields or fields.get(b"caller") != caller.encode():
            return None
        return _record(fields)

    def list(self, caller: str, *, limit: int = 20, before: str | None = None) -> list[JobRecord]:
        if limit <= 0:
            return []
        listing = self._key("caller", caller)
        if before is None:
            ids = cast(list[bytes], self._redis.zrevrange(listing, 0, limit - 1))
        else:
            score = self._redis.zscore(listing, before) if is_job_id(before) else None
            if score is None:
                return []
            ids = cast(
                list[bytes], self._redis.zrevrangebyscore(listing, f"({score!r}", "-inf", start=0, num=limit)
            )
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self._key("job", job_id.decode()), _LIGHT_FIELDS)
        records = []
        for values in pipe.execute():
            fields = {
                name.encode(): v for name, v in zip(_LIGHT_FIELDS, values, strict=True) if v is not None
            }
            if b"id" in fields:  # deleted between the listing and the read
                records.append(_record(fields))
        return records

    def claim(self, replica: str, lease_s: float, now: float) -> JobRecord | None:
        found = self._run("claim", replica, repr(now), repr(now + lease_s), json.dumps(CANCELLED_ERROR))
        return _record(_pairs(found)) if found else None

    def renew(self, job_id: str, replica: str, lease_s: float, now: float, step: int, steps: int) -> bool:
        if not is_job_id(job_id):
            return False
        return bool(self._run("renew", job_id, replica, repr(now + lease_s), int(step), int(steps)))

    def finish(
        self, job_id: str, replica: str, *, state: str, now: float, **outcome: Unpack[Outcome]
    ) -> bool:
        if not may_finish(job_id, state):
            return False
        status, result = outcome.get("status"), outcome.get("result")
        result_type, error = outcome.get("result_type"), outcome.get("error")
        fields: list[bytes | str | int] = []
        if status is not None:
            fields += ["status", int(status)]
        if result is not None:
            fields += ["result", result]
        if result_type is not None:
            fields += ["result_type", result_type]
        if error is not None:
            fields += ["error", json.dumps(error)]
        size = 0 if result is None else len(result)
        return bool(self._run("finish", job_id, replica, state, repr(now), size, *fields))

    def cancel(self, caller: str, job_id: str, now: float) -> JobRecord | None:
        if not is_job_id(job_id):
            return None
        found = self._run("cancel", job_id, caller, repr(now), json.dumps(CANCELLED_ERROR))
        return _record(_pairs(found)) if found else None

    def delete(self, caller: str, job_id: str) -> bool:
        if not is_job_id(job_id):
            return False
        return bool(self._run("delete", job_id, caller))

    def expire(self, now: float, ttl_s: float) -> int:
        total = 0
        while True:
            # In batches: one script never blocks Redis for long.
            dropped = int(self._run("expire", repr(now - ttl_s), _EXPIRE_BATCH))
            total += dropped
            if dropped < _EXPIRE_BATCH:
                return total

    def counts(self) -> dict[str, int]:
        found = self._redis.hgetall(f"{self._prefix}:counts")
        return {state: int(found.get(state.encode(), 0)) for state in STATES}

    def queued_for(self, caller: str) -> int:
        return int(self._redis.hget(f"{self._prefix}:active", caller) or 0)

    def size_bytes(self) -> int:
        return int(self._redis.get(f"{self._prefix}:bytes") or 0)

    def close(self) -> None:
        self._redis.close()
