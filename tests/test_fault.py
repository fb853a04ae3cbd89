"""Fault injection: the real worker (``python -m workers``) against a private redis-server and a private
PostgreSQL cluster, killed, blocked and deprived of its database; after quiescence Postgres must equal
the model of acknowledged writes (``tests/acked.py``): every write the API answered 200 is there exactly
once, with exact counters, and every write here must be answered 200.

The rig (``tests/rig.py``) gives each test a redis-server and a schema of its own on a PostgreSQL cluster
started once for the module (never the shared servers), destroyed at the end, even on failure. Writes go
through the HTTP API served in-process on those servers. Waits poll with short sleeps and fail on a
timeout.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest

from session_svc.http.appkeys import BACKEND
from session_svc.settings import Settings
from session_svc.storage import outbox
from tests import outbox_drain
from tests.helpers import session_url
from tests.rig import DEFAULTS, MakeRig, Rig
from tests.servers import WorkerProcess
from tests.support import eventually
from workers.expiry import sweep

pytestmark = pytest.mark.fault

# The service's own timeouts (these faults are in the worker and Postgres, not Redis), a claim idle time
# short enough to reclaim a dead worker's entries within the test.
SETTINGS: dict[str, Any] = {
    **{name: getattr(Settings(), name) for name in DEFAULTS},
    "flush_claim_idle_ms": 500,
    "flush_batch_size": 200,
    "flush_max_deliveries": 5,
    "session_hot_ttl": 3600,
}


@pytest.fixture
async def rig(make_rig: MakeRig) -> Rig:
    return await make_rig((), **SETTINGS)


async def some_writes(rig: Rig, sids: list[str], tag: str) -> None:
    for i, sid in enumerate(sids):
        await rig.append(sid, f"{tag} a", cost=0.1)
        await rig.append(sid, f"{tag} b ✓", cost=0.2)
        await rig.memory(sid, i + len(rig.model.memories[sid]))
        await rig.retitle(sid, f"{tag} title")


async def lock_sessions(rig: Rig, conn: asyncpg.Connection) -> Any:
    """Hold ACCESS EXCLUSIVE on the sessions table in an open transaction: the worker blocks mid-batch."""
    tr = conn.transaction()
    await tr.start()
    await conn.execute(f'LOCK TABLE "{rig.schema}".sessions IN ACCESS EXCLUSIVE MODE')
    return tr


async def blocked_backends(conn: asyncpg.Connection) -> list[int]:
    rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
    return [r["pid"] for r in rows]


async def wait_blocked(rig: Rig, worker: WorkerProcess) -> list[int]:
    """Until the worker holds pending entries and waits on our lock; returns its blocked backends.
    (Asked on another connection than the lock's: pg_stat_activity is frozen within a transaction.)"""
    conn = await rig.db()

    async def blocked() -> list[int]:
        if not worker.alive:
            raise AssertionError(f"worker died\n{rig.logs()}")
        return await blocked_backends(conn) if await rig.pending(worker) else []

    try:
        return await eventually(blocked, "the worker to read a batch and block on the sessions lock")
    except AssertionError as exc:
        activity = await conn.fetch(
            "SELECT pid, state, wait_event_type, wait_event, query FROM pg_stat_activity"
        )
        pending = await outbox_drain.pending_per_consumer(rig.redis, rig.keys)
        raise AssertionError(
            f"{exc}\npending={pending}\n{[dict(r) for r in activity]}\n{rig.logs()}"
        ) from None


# The tests -----------------------------------------------------------------------------------------


async def test_worker_killed_before_commit_loses_nothing(rig: Rig) -> None:
    sids = [await rig.create(f"s{i}") for i in range(4)]
    await some_writes(rig, sids, "first")

    lock_conn = await asyncpg.connect(rig.pg_server.url)
    try:
        tr = await lock_sessions(rig, lock_conn)
        w1 = rig.start_worker("w1")
        backends = await wait_blocked(rig, w1)
        taken = await rig.pending(w1)
        await some_writes(rig, sids, "during")  # new entries, not delivered: w1 is stuck
        sids.append(await rig.create("late"))
        w1.kill()
        assert await rig.pending(w1) == taken > 0
        await tr.rollback()

        async def gone() -> bool:
            return not await (await rig.db()).fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", backends
            )

        await eventually(gone, "the killed worker's backend to end")
    finally:
        await lock_conn.close(timeout=5)
    # Its transaction never committed.
    assert (await rig.count("sessions"), await rig.count("session_messages")) == (0, 0)

    await rig.wait_claimable(w1)
    rig.start_worker("w2")
    await some_writes(rig, sids, "after")
    await rig.quiescent()
    await rig.check(all_ok=True)
    assert await rig.pending(w1) == 0  # reclaimed from the dead consumer


async def test_worker_killed_between_commit_and_ack_duplicates_nothing(rig: Rig) -> None:
    model = rig.model
    sids = [await rig.create(f"s{i}") for i in range(4)]
    await some_writes(rig, sids, "first")
    redis_admin = rig.redis_server.client()

    lock_conn = await asyncpg.connect(rig.pg_server.url)
    try:
        tr = await lock_sessions(rig, lock_conn)
        w1 = rig.start_worker("w1")
        await wait_blocked(rig, w1)
        # Writes to Redis now wait; reads go on. The worker will commit, then block before its XACK.
        redis_admin.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        try:
            await tr.rollback()

            async def committed() -> bool:
                return (await rig.count("sessions"), await rig.count("session_messages")) == (
                    len(model.users),
                    model.acked_total,
                )

            await eventually(committed, "the worker's batch committed in Postgres")
            assert await rig.pending(w1) > 0  # committed, not acknowledged
            w1.kill()
        finally:
            redis_admin.execute_command("CLIENT", "UNPAUSE")
    finally:
        await lock_conn.close(timeout=5)
        redis_admin.close()
    assert await rig.pending(w1) > 0  # the kill came between COMMIT and XACK

    await rig.wait_claimable(w1)
    rig.start_worker("w2")
    await some_writes(rig, sids, "after")
    await rig.quiescent()
    await rig.check(all_ok=True)
    assert await rig.pending(w1) == 0


@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_postgres_down_mid_load_api_serves_and_worker_catches_up(rig: Rig, mode: str) -> None:
    model = rig.model
    sids = [await rig.create(f"s{i}") for i in range(6)]
    rig.start_worker("w1")
    stop = asyncio.Event()
    acked = 0

    async def writer(sid: str) -> None:
        nonlocal acked
        n = 0
        while not stop.is_set():
            n += 1
            if n % 7 == 0:
                await rig.memory(sid, n)
            else:
                await rig.append(sid, f"load {n}", cost=n / 1_000_000)
            acked += 1
            await asyncio.sleep(0.002)

    async def reached(target: int) -> bool:
        assert not model.not_ok, model.not_ok[:3]
        return acked >= target

    writers = [asyncio.create_task(writer(sid)) for sid in sids]
    try:
        await eventually(lambda: reached(60), "60 writes before the outage")
        await asyncio.to_thread(rig.pg_server.stop, mode)
        mark = acked
        status, h1, _ = await rig.health()
        assert status == 200 and h1["database_connected"] is False and h1["status"] == "degraded"
        assert h1["redis_connected"] is True
        # New sessions and writes are still answered from Redis.
        late = await rig.create("created while Postgres is down")
        await rig.append(late, "hello from the outage")
        await eventually(lambda: reached(mark + 60), "60 writes during the outage")
        _, h2, _ = await rig.health()
        assert h2["database_connected"] is False
        assert h2["outbox_backlog"] > h1["outbox_backlog"] > 0
        assert h2["outbox_lag_seconds"] > 0

        await asyncio.to_thread(rig.pg_server.start)
        mark = acked
        await eventually(lambda: reached(mark + 60), "60 writes after the restart")
    finally:
        stop.set()
        await asyncio.gather(*writers)
    assert not model.not_ok, model.not_ok[:5]
    await rig.quiescent(within=60)
    assert (await rig.health())[1]["database_connected"] is True
    await rig.check(all_ok=True)


async def test_sweep_racing_new_messages_loses_and_duplicates_nothing(rig: Rig) -> None:
    """The expiry sweep (TTL 0: every flushed session is evictable at once) runs in a loop while writers
    append to the same sessions; each round waits until its session was evicted, so appends keep hitting
    cold sessions (rehydration) concurrently with the sweep and the worker."""
    model = rig.model
    sids = [await rig.create(f"s{i}") for i in range(4)]
    for i, sid in enumerate(sids):
        await rig.memory(sid, i)
    rig.start_worker("w1")
    backend = rig.client.app[BACKEND]
    uk = {sid: rig.keys.for_user(model.users[sid]) for sid in sids}
    stop = asyncio.Event()
    evicted = 0

    async def sweeper() -> None:
        nonlocal evicted
        while not stop.is_set():
            evicted += await sweep(backend, 0)
            await asyncio.sleep(0.001)

    async def cold(sid: str) -> bool:
        return not await rig.redis.exists(uk[sid].session(sid))

    async def writer(sid: str, w: int) -> None:
        rnd = random.Random(f"{sid}{w}")
        for r in range(3):
            await eventually(lambda: cold(sid), f"session {sid} evicted (round {r})", within=30)
            for i in range(8):
                await rig.append(sid, f"w{w} r{r} m{i}")
                await asyncio.sleep(rnd.random() * 0.01)

    sweeping = asyncio.create_task(sweeper())
    try:
        await asyncio.gather(*(writer(sid, w) for sid in sids for w in range(2)))
    finally:
        stop.set()
        await sweeping
    assert evicted >= 3 * len(sids)
    assert not model.not_ok, model.not_ok[:5]
    await rig.quiescent()
    await rig.check(all_ok=True)

    async def all_messages(sid: str) -> list[dict[str, Any]]:
        resp = await rig.client.get(
            session_url(sid, "/messages"), params={"user_id": model.users[sid], "page_size": 200}
        )
        body = await resp.json()
        assert resp.status == 200, body
        return body["messages"]

    def in_order(sid: str) -> list[dict[str, Any]]:
        return sorted(model.messages[sid], key=lambda m: m["sequence"])

    for sid in sids:  # hot or cold, as the race left them
        assert await all_messages(sid) == in_order(sid)
    await sweep(backend, 0)
    for sid in sids:  # all cold
        assert await cold(sid)
        assert await all_messages(sid) == in_order(sid)
        await rig.append(sid, "one more")  # hot again, history in Postgres
        assert await all_messages(sid) == in_order(sid)
    await rig.quiescent()
    await rig.check(all_ok=True)


@pytest.mark.parametrize("interrupt", ["pg_terminate_backend", "pg_cancel_backend"])
async def test_interrupted_database_work_is_transient_not_a_poison_entry(rig: Rig, interrupt: str) -> None:
    """An operator (or a failover, a pooler, a statement_timeout) terminates the worker's connection
    or cancels its statement, mid-batch and again while it retries entry by entry. That says nothing
    about the data: once the database is usable again everything is written, nothing is dead-lettered,
    and no session is left marked ``stuck`` (which pins it in Redis forever: the sweep never evicts a
    stuck session)."""
    model = rig.model
    sids = [await rig.create(f"s{i}") for i in range(2)]
    pool = await asyncpg.create_pool(rig.pg_server.url, min_size=1, max_size=2)
    flusher = outbox_drain.make_flusher(rig.redis, pool, rig.keys, rig.schema)
    await outbox_drain.drain(flusher)
    for sid in sids:
        await rig.append(sid, "one")
        await rig.append(sid, "two")

    stop = asyncio.Event()
    lock_conn = await asyncpg.connect(rig.pg_server.url)
    task: asyncio.Task[None] | None = None
    try:
        tr = await lock_sessions(rig, lock_conn)
        task = asyncio.create_task(flusher.run(stop, maintenance_every=0.3))
        db = await rig.db()
        for _ in range(3):  # the batch, then (if it is taken for bad data) the entries one by one
            pids = await eventually(lambda: blocked_backends(db), "the flusher blocked on the lock")
            assert not task.done()
            await db.execute(f"SELECT {interrupt}(pid) FROM unnest($1::int[]) AS pid", pids)
        await eventually(lambda: blocked_backends(db), "the flusher blocked on the lock again")
        await tr.rollback()

        async def drained() -> bool:
            return (await outbox.backlog(rig.redis, rig.keys)).entries == 0

        await eventually(drained, "the outbox drained after the lock was released")
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, timeout=10)
        await lock_conn.close(timeout=5)
        await pool.close()
    await rig.check(all_ok=True)
    for sid in sids:
        h = await rig.redis.hgetall(rig.keys.for_user(model.users[sid]).session(sid))
        assert "stuck" not in h, h
    assert await sweep(rig.client.app[BACKEND], 0) == len(sids)


async def test_postgres_down_cold_sessions_answer_503_hot_ones_200(rig: Rig) -> None:
    """Without Postgres a cold session cannot be read or written: an honest 503, never a 500 nor a
    wrong 404; hot sessions keep answering; once Postgres is back the cold one is served again."""
    model = rig.model
    cold_sid = await rig.create("cold")
    cold_user = model.users[cold_sid]
    await rig.append(cold_sid, "old news")
    hot_sid = await rig.create("hot")
    pool = await asyncpg.create_pool(rig.pg_server.url, min_size=0, max_size=2)
    try:
        await outbox_drain.drain(outbox_drain.make_flusher(rig.redis, pool, rig.keys, rig.schema))
    finally:
        await pool.close()
    backend = rig.client.app[BACKEND]
    assert await sweep(backend, 0) == 2
    await rig.append(hot_sid, "brought back")  # rehydrated: hot again
    before = await (await rig.client.get(session_url(cold_sid), params={"user_id": cold_user})).json()

    await asyncio.to_thread(rig.pg_server.stop, "immediate")
    try:
        p = {"user_id": cold_user}
        cold_answers = [
            await rig.client.get(session_url(cold_sid), params=p),
            await rig.client.get(session_url(cold_sid, "/messages"), params=p),
            await rig.client.get(session_url(cold_sid, "/memories"), params=p),
            await rig.client.get(f"/api/v1/users/{cold_user}/sessions"),
            await rig.client.post(
                session_url(cold_sid, "/messages"), params=p, json={"role": "user", "content": "x"}
            ),
        ]
        for resp in cold_answers:
            body = await resp.json()
            assert (resp.status, body) == (503, {"detail": "Session store unavailable (PostgreSQL)"}), (
                resp.url
            )
        await rig.append(hot_sid, "still served from Redis")
        assert not model.not_ok, model.not_ok
        assert (await rig.health())[1]["database_connected"] is False
    finally:
        await asyncio.to_thread(rig.pg_server.start)
    resp = await rig.client.get(session_url(cold_sid), params={"user_id": cold_user})
    assert (resp.status, await resp.json()) == (200, before)
    rig.start_worker("w1")
    await rig.quiescent()
    await rig.check(all_ok=True)
