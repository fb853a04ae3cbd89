"""Worker heartbeats: how the API (and an operator) knows the write-through is alive.

Each worker process writes ``{"at": ..., "pid": ..., "last_flush": ..., "state": ..., "error": ...}``
under its consumer name in the ``P:workers`` hash every WORKER_HEARTBEAT_INTERVAL seconds, also while
Postgres or its arq loop is down (then ``error`` says why). A worker whose heartbeat is older than
WORKER_HEARTBEAT_TIMEOUT is gone: killed, hung, or cut off from Redis. The script runs with
``allow-oom``: it only overwrites a field of the same size, and a full Redis is exactly when the
operator needs to know whether the worker is still there.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import orjson
from redis.asyncio import Redis

from session_svc.keys import Keys

# KEYS: the workers hash
# ARGV: name, heartbeat JSON, now (s), forget-after (s)
# Also forgets heartbeats of workers gone for longer than forget-after (each start has a new name).
_BEAT = """#!lua flags=allow-oom
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local ok, hb = pcall(cjson.decode, all[i + 1])
  if not ok or type(hb) ~= 'table' or tonumber(hb['at']) == nil
      or tonumber(hb['at']) < tonumber(ARGV[3]) - tonumber(ARGV[4]) then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return 1
"""

FORGET_AFTER_S = 86_400


@dataclass(frozen=True, slots=True)
class Heartbeat:
    name: str
    at: float  # epoch seconds of this heartbeat
    pid: int
    last_flush: float  # epoch seconds of the last committed batch (0: none since start)
    state: str  # "ok", or what the worker cannot do right now
    error: str = ""


async def beat(redis: Redis, keys: Keys, hb: Heartbeat) -> None:
    doc = orjson.dumps({k: v for k, v in asdict(hb).items() if k != "name"})
    script = redis.register_script(_BEAT)  # no I/O: EVALSHA, loading the script on NOSCRIPT
    await script(keys=[keys.workers], args=[hb.name, doc, time.time(), FORGET_AFTER_S])


async def read(redis: Redis, keys: Keys) -> list[Heartbeat]:
    """Every heartbeat on record, newest first."""
    out: list[Heartbeat] = []
    raw: dict[str, str] = await redis.hgetall(keys.workers)  # type: ignore[misc]
    for name, doc in raw.items():
        try:
            d = orjson.loads(doc)
            out.append(Heartbeat(name, float(d["at"]), int(d["pid"]), float(d["last_flush"]),
                                 str(d["state"]), str(d.get("error", ""))))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda h: h.at, reverse=True)
