"""What one Redis node spends per request, and what a user's index costs: the inputs of docs/scale.md.

``scripts/bench.sh capacity`` (or ``python -m bench.capacity``; under ``flock /tmp/bench.lock``). A private redis-server (no persistence,
``latency-tracking no``) on a free port, the service's own scripts through ``session_svc.storage.scripts``, no
HTTP: each kind of call is sent CAP_CALLS times, pipelined by 500 (as the coalescer batches a busy loop
turn), and its cost is read from Redis itself: ``INFO cpu`` (the server's whole CPU, parsing and replies
included) as a difference across the phase. (``INFO commandstats`` would count a script's inner commands
twice, inside EVALSHA and on their own.) The worker's side (read the outbox, snapshot, mark flushed) is measured
by draining the appends with the worker's ``Flusher`` into a schema of its own on the configured
PostgreSQL. Last, ``MEMORY USAGE`` of a user's index at several sizes: the bytes per entry.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from session_svc import migrate
from session_svc.record.fields import new_session_record
from session_svc.record.keys import Keys
from session_svc.record.shapes import new_id, now_us
from session_svc.settings import Settings
from session_svc.storage.resources import Backend
from session_svc.storage.scripts import Scripts
from workers.flush import Flusher

CALLS = int(os.environ.get("CAP_CALLS", "20000"))
SESSIONS = int(os.environ.get("CAP_SESSIONS", "1000"))
BATCH = 500
DATABASE_URL = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test"
MESSAGE = {
    "role": "user",
    "content": "Hello, this is a benchmark message of a typical chat size.",
    "type": "chat",
    "tokens": "12",
    "cost": "100",
    "meta": '{"model":"gpt-4"}',
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _cpu(r: Redis) -> float:
    cpu = await r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def _phase(r: Redis, name: str, calls: int, run: object) -> None:
    cpu0 = await _cpu(r)
    start = time.perf_counter()
    await run  # type: ignore[misc]
    wall = time.perf_counter() - start
    per_call = (await _cpu(r) - cpu0) * 1e6 / calls
    print(f"| {name} | {calls:,} | {per_call:.1f} | {1e6 / per_call:,.0f} | {wall:.1f} |", flush=True)


async def _pipelined(r: Redis, calls: list[object]) -> None:
    for i in range(0, len(calls), BATCH):
        async with r.pipeline(transaction=False) as pipe:
            for make in calls[i : i + BATCH]:
                await make(pipe)  # type: ignore[operator]
            await pipe.execute()


def capacity(env: dict[str, str]) -> None:
    """``scripts/bench.sh capacity``: on the run's PostgreSQL (a schema of its own), a private Redis."""
    asyncio.run(main(env.get("DATABASE_URL") or DATABASE_URL))


async def main(database_url: str = DATABASE_URL) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cap-redis-"))
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir),
         "--latency-tracking", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    schema = f"cap{os.getpid()}"
    settings = Settings(database_url=database_url, db_schema=schema)
    await asyncio.to_thread(migrate.upgrade, settings)
    r = Redis(port=port, decode_responses=True)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        for _ in range(50):
            try:
                await r.ping()
                break
            except OSError:
                await asyncio.sleep(0.1)
        keys = Keys("cap", 16)
        scripts = Scripts(r)
        users = [f"user-{i}" for i in range(SESSIONS)]
        sids = [new_id() for _ in users]
        uks = [keys.for_user(u) for u in users]
        backend = Backend(r, keys, scripts, pool, schema)
        flusher = Flusher(backend, "cap", batch_size=500, max_deliveries=5, claim_idle_ms=30_000)
        await flusher.ensure_groups()
        await scripts.get_session(uks[0], sids[0])  # loads the scripts
        print("| call | calls | Redis CPU µs per call | calls/s per Redis core | wall s |")
        print("|---|---:|---:|---:|---:|")

        def create(i: int) -> object:
            return lambda p: scripts._create_session(
                {"session": uks[i].session(sids[i]), "user_index": uks[i].sessions, "active_index": uks[i].active,
                 "stats": uks[i].stats, "outbox": uks[i].outbox, "hot": uks[i].hot},
                {"sid": sids[i], "uid": users[i], "now": (now := now_us())},
                [x for kv in new_session_record(sids[i], users[i], "t", "{}", "{}", "", now).items() for x in kv],
                client=p,
            )  # fmt: skip

        await _phase(r, "create a session", SESSIONS, _pipelined(r, [create(i) for i in range(SESSIONS)]))
        await _phase(r, "flush the creates (worker)", SESSIONS, _drain(flusher))

        def append(i: int) -> object:
            j = i % SESSIONS
            m = {**MESSAGE, "id": str(uuid.uuid4()), "ts": str(now_us())}
            return lambda p: scripts._append_message(
                {"session": uks[j].session(sids[j]), "messages": uks[j].messages(sids[j]),
                 "user_index": uks[j].sessions, "active_index": uks[j].active, "stats": uks[j].stats,
                 "outbox": uks[j].outbox, "hot": uks[j].hot},
                {"sid": sids[j], "uid": users[j], **{f"msg_{f}": m[f] for f in m}},
                client=p,
            )  # fmt: skip

        await _phase(r, "append a message", CALLS, _pipelined(r, [append(i) for i in range(CALLS)]))
        await _phase(r, "flush the appends (worker)", CALLS, _drain(flusher))

        def get(i: int) -> object:
            j = i % SESSIONS
            return lambda p: scripts._get_session(
                {"session": uks[j].session(sids[j]), "user_index": uks[j].sessions},
                {"sid": sids[j], "uid": users[j]},
                client=p,
            )

        await _phase(r, "get a session", CALLS, _pipelined(r, [get(i) for i in range(CALLS)]))

        def page(i: int) -> object:
            j = i % SESSIONS
            return lambda p: scripts._list_messages(
                {"session": uks[j].session(sids[j]), "messages": uks[j].messages(sids[j]),
                 "user_index": uks[j].sessions},
                {"sid": sids[j], "uid": users[j], "lo": 1, "hi": 20},
                client=p,
            )  # fmt: skip

        await _phase(r, "page of 20 messages", CALLS, _pipelined(r, [page(i) for i in range(CALLS)]))

        def listing(i: int) -> object:
            j = i % SESSIONS
            return lambda p: scripts._list_user_sessions(
                {"user_index": uks[j].sessions, "trimmed": uks[j].trimmed},
                {"bucket_prefix": uks[j].prefix, "start": 0, "stop": 19, "every": 1},
                client=p,
            )

        await _phase(r, "a user's session list", CALLS, _pipelined(r, [listing(i) for i in range(CALLS)]))

        print()
        print("| sessions in one user's index | `MEMORY USAGE` u: | bytes per entry |")
        print("|---:|---:|---:|")
        for n in (1, 10, 100, 128, 129, 1000, 10000):
            key = f"cap:{{b00}}:u:size{n}"
            for i in range(0, n, 1000):
                await r.zadd(key, {str(uuid.uuid4()): now_us() + k for k in range(i, min(n, i + 1000))})
            used = int(await r.memory_usage(key, samples=0) or 0)
            print(f"| {n:,} | {used:,} | {used / n:,.0f} |")
        print(f"\n({SESSIONS:,} sessions of as many users in 16 buckets, {CALLS:,} calls per row)")
    finally:
        await r.aclose()
        await pool.close()
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        conn = await asyncpg.connect(database_url)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def _drain(flusher: Flusher) -> None:
    while entries := await flusher.read():
        await flusher.flush(entries)


if __name__ == "__main__":
    asyncio.run(main())
