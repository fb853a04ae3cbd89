"""Worker heartbeats: how the API (and an operator) knows the write-through is alive.

Each worker process writes ``{"at": ..., "pid": ..., "last_flush": ..., "state": ..., "error": ...}``
under its consumer name in the ``P:workers`` hash every WORKER_HEARTBEAT_INTERVAL seconds, also while
Postgres or its arq loop is down (then ``error`` says why). A worker whose heartbeat is older than
WORKER_HEARTBEAT_TIMEOUT is gone: killed, hung, or cut off from Redis. It is written by a script that
runs on a full Redis too (``scripts.BEAT``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import orjson

from session_svc.record.keys import Keys
from session_svc.storage.redis_client import AnyRedis
from session_svc.storage.scripts import Scripts

# Heartbeats of workers gone this long are forgotten (each worker start has a new name).
FORGET_AFTER_S = 86_400


@dataclass(frozen=True, slots=True)
class Heartbeat:
    name: str
    at: float  # epoch seconds of this heartbeat
    pid: int
    last_flush: float  # epoch seconds of the last committed batch (0: none since start)
    state: str  # "ok", or what the worker cannot do right now
    error: str = ""


async def beat(scripts: Scripts, keys: Keys, hb: Heartbeat) -> None:
    """Record ``hb`` (``scripts.BEAT``, which also forgets workers gone for FORGET_AFTER_S)."""
    doc = orjson.dumps({k: v for k, v in asdict(hb).items() if k != "name"}).decode()
    await scripts.beat(keys, hb.name, doc, time.time(), FORGET_AFTER_S)


async def read(redis: AnyRedis, keys: Keys) -> list[Heartbeat]:
    """Every heartbeat on record, newest first."""
    return parse(await redis.hgetall(keys.workers))  # type: ignore[misc]


def parse(raw: dict[str, str]) -> list[Heartbeat]:
    """The heartbeats of the ``P:workers`` hash, newest first; malformed ones are skipped."""
    out: list[Heartbeat] = []
    for name, doc in raw.items():
        try:
            d = orjson.loads(doc)
            out.append(Heartbeat(name, float(d["at"]), int(d["pid"]), float(d["last_flush"]),
                                 str(d["state"]), str(d.get("error", ""))))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda h: h.at, reverse=True)
