"""Fault injection: the real worker (``python -m workers``) against a private redis-server and a private
PostgreSQL cluster, killed, blocked and deprived of its database; after quiescence Postgres must equal
the model of acknowledged writes: every write the API answered 200 is there exactly once.

Both servers are started once for the module on spare ports (never the shared ones) and destroyed at
the end, even on failure; each test has its own schema and key prefix on them. Writes go through the
HTTP API served in-process on those servers. Waits poll with short sleeps and fail on a timeout.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from session_svc.http.app import create_app
from session_svc.http.appkeys import BACKEND
from session_svc.record.fields import MemoryType
from session_svc.record.keys import Keys
from session_svc.settings import Settings
from session_svc.storage import outbox
from tests import outbox_drain, pg_rows, servers, support
from tests.helpers import new_user, session_url
from tests.pg_rows import Model
from tests.servers import PgServer, RedisServer, WorkerProcess
from tests.support import eventually
from workers.expiry import sweep

pytestmark = pytest.mark.fault

MEMORY_TYPES = tuple(MemoryType)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = servers.start_redis()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def fault_settings(pg_server: PgServer, redis_server: RedisServer) -> Iterator[Settings]:
    if not pg_server.running:  # a previous test failed while its Postgres was down
        pg_server.start()
    schema = support.create_schema(pg_server.url)
    yield Settings(
        redis_url=redis_server.url,
        database_url=pg_server.url,
        db_schema=schema,
        key_prefix=support.new_name("f"),
        flush_claim_idle_ms=500,
        flush_batch_size=200,
        flush_max_deliveries=5,
        session_hot_ttl=3600,
    )
    if not pg_server.running:
        pg_server.start()
    support.drop_schema(pg_server.url, schema)


@dataclass
class Rig:
    """The app, raw clients on the private servers, and the workers this test started."""

    settings: Settings
    client: Any
    redis: Redis
    pg: asyncpg.Connection
    pg_server: PgServer
    redis_server: RedisServer
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix, self.settings.redis_buckets)

    @property
    def schema(self) -> str:
        return self.settings.db_schema

    def start_worker(self, tag: str) -> WorkerProcess:
        worker = servers.start_worker(self.settings, f"{self.settings.key_prefix}-{tag}", self.log_dir)
        self.workers.append(worker)
        return worker

    def logs(self) -> str:
        return "\n".join(f"--- worker {w.name} (alive={w.alive}):\n{w.tail()}" for w in self.workers)

    async def pending(self, worker: WorkerProcess) -> int:
        return (await outbox_drain.pending_per_consumer(self.redis, self.keys)).get(worker.name, 0)

    async def wait_claimable(self, dead: WorkerProcess) -> None:
        """Until every entry the dead worker left pending has been idle past FLUSH_CLAIM_IDLE_MS, so the
        next worker reclaims them at its start rather than at its next maintenance round."""
        idle_ms = self.settings.flush_claim_idle_ms + 100

        async def claimable() -> bool:
            for bucket in range(self.keys.buckets):
                rows = await self.redis.xpending_range(
                    self.keys.outbox(bucket), outbox.GROUP, "-", "+", 10_000, consumername=dead.name
                )
                if any(int(r["time_since_delivered"]) < idle_ms for r in rows):
                    return False
            return True

        await eventually(claimable, "the dead worker's entries to become claimable")

    async def quiescent(self, within: float = 30.0) -> None:
        """The outbox is drained: nothing undelivered, nothing pending for any consumer."""

        async def drained() -> bool:
            backlog = await outbox.backlog(self.redis, self.keys)
            pending = await outbox_drain.pending_per_consumer(self.redis, self.keys)
            return backlog.entries == 0 and not any(pending.values()) and bool(pending)

        try:
            await eventually(drained, "quiescence (empty outbox backlog, nothing pending)", within)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    async def db(self) -> asyncpg.Connection:
        """The test's own connection to the private Postgres, opened again after a restart."""
        try:
            await self.pg.fetchval("SELECT 1")
        except (asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
            self.pg.terminate()
            self.pg = await asyncpg.connect(self.pg_server.url)
        return self.pg

    async def count(self, table: str) -> int:
        return int(await (await self.db()).fetchval(f'SELECT count(*) FROM "{self.schema}".{table}'))

    async def check(self, model: Model) -> None:
        await pg_rows.assert_postgres_equals_model(
            self.client, self.redis, self.keys, await self.db(), self.schema, model
        )
        assert await outbox_drain.dead_letters(self.redis, self.keys) == []
        for sid, uid in model.users.items():  # nothing failed for good: no session is pinned in Redis
            assert not await self.redis.hexists(self.keys.for_user(uid).session(sid), "stuck"), sid

    async def health(self) -> dict[str, Any]:
        resp = await self.client.get("/health/detailed")
        assert resp.status == 200
        return await resp.json()


@pytest.fixture
async def rig(
    fault_settings: Settings,
    aiohttp_client: Any,
    pg_server: PgServer,
    redis_server: RedisServer,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    client = await aiohttp_client(create_app(fault_settings))
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    pg = await asyncpg.connect(pg_server.url)
    rig = Rig(fault_settings, client, redis, pg, pg_server, redis_server, tmp_path)
    try:
        yield rig
    finally:
        try:
            await asyncio.to_thread(servers.stop_workers, rig.workers)  # SIGTERM: must exit cleanly
        finally:
            await redis.aclose()
            await rig.pg.close(timeout=5)


# Writes through the API, recorded in the model -------------------------------------------------------


async def create(rig: Rig, model: Model, title: str = "") -> tuple[str, str]:
    user = new_user()
    resp = await rig.client.post("/api/v1/sessions", json={"user_id": user, "title": title})
    body = await resp.json()
    assert resp.status == 200, body
    return model.session(body), user


async def message(rig: Rig, model: Model, sid: str, content: str, cost: float = 0.000125) -> None:
    user = model.users[sid]
    body = {"role": "user", "content": content, "tokens_used": len(content), "cost_usd": cost}
    resp = await rig.client.post(session_url(sid, "/messages"), params={"user_id": user}, json=body)
    answer = await resp.json()
    if resp.status == 200:
        model.messages[sid].append(answer)
    else:
        model.failures.append(f"message to {sid}: {resp.status} {answer}")


async def memory(rig: Rig, model: Model, sid: str, n: int) -> None:
    user = model.users[sid]
    body = {
        "memory_type": MEMORY_TYPES[n % len(MEMORY_TYPES)],
        "content": f"memory {n}",
        "metadata": {"n": n},
    }
    resp = await rig.client.post(session_url(sid, "/memory"), params={"user_id": user}, json=body)
    answer = await resp.json()
    if resp.status == 200:
        model.memories[sid].append(answer)
    else:
        model.failures.append(f"memory to {sid}: {resp.status} {answer}")


async def retitle(rig: Rig, model: Model, sid: str, title: str) -> None:
    user = model.users[sid]
    resp = await rig.client.put(session_url(sid), params={"user_id": user}, json={"title": title})
    if resp.status != 200:
        model.failures.append(f"title of {sid}: {resp.status} {await resp.text()}")


async def some_writes(rig: Rig, model: Model, sids: list[str], tag: str) -> None:
    for i, sid in enumerate(sids):
        await message(rig, model, sid, f"{tag} a", cost=0.1)
        await message(rig, model, sid, f"{tag} b ✓", cost=0.2)
        await memory(rig, model, sid, i + len(model.memories[sid]))
        await retitle(rig, model, sid, f"{tag} title")


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
    model = Model()
    sids = [(await create(rig, model, f"s{i}"))[0] for i in range(4)]
    await some_writes(rig, model, sids, "first")

    lock_conn = await asyncpg.connect(rig.pg_server.url)
    try:
        tr = await lock_sessions(rig, lock_conn)
        w1 = rig.start_worker("w1")
        backends = await wait_blocked(rig, w1)
        taken = await rig.pending(w1)
        await some_writes(rig, model, sids, "during")  # new entries, not delivered: w1 is stuck
        sids.append((await create(rig, model, "late"))[0])
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
    await some_writes(rig, model, sids, "after")
    await rig.quiescent()
    await rig.check(model)
    assert await rig.pending(w1) == 0  # reclaimed from the dead consumer


async def test_worker_killed_between_commit_and_ack_duplicates_nothing(rig: Rig) -> None:
    model = Model()
    sids = [(await create(rig, model, f"s{i}"))[0] for i in range(4)]
    await some_writes(rig, model, sids, "first")
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
                    model.message_total,
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
    await some_writes(rig, model, sids, "after")
    await rig.quiescent()
    await rig.check(model)
    assert await rig.pending(w1) == 0


@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_postgres_down_mid_load_api_serves_and_worker_catches_up(rig: Rig, mode: str) -> None:
    model = Model()
    sids = [(await create(rig, model, f"s{i}"))[0] for i in range(6)]
    rig.start_worker("w1")
    stop = asyncio.Event()
    acked = 0

    async def writer(sid: str) -> None:
        nonlocal acked
        n = 0
        while not stop.is_set():
            n += 1
            if n % 7 == 0:
                await memory(rig, model, sid, n)
            else:
                await message(rig, model, sid, f"load {n}", cost=n / 1_000_000)
            acked += 1
            await asyncio.sleep(0.002)

    async def reached(target: int) -> bool:
        assert not model.failures, model.failures[:3]
        return acked >= target

    writers = [asyncio.create_task(writer(sid)) for sid in sids]
    try:
        await eventually(lambda: reached(60), "60 writes before the outage")
        await asyncio.to_thread(rig.pg_server.stop, mode)
        mark = acked
        h1 = await rig.health()
        assert h1["database_connected"] is False and h1["status"] == "degraded"
        assert h1["redis_connected"] is True
        # New sessions and writes are still answered from Redis.
        late, _user = await create(rig, model, "created while Postgres is down")
        await message(rig, model, late, "hello from the outage")
        await eventually(lambda: reached(mark + 60), "60 writes during the outage")
        h2 = await rig.health()
        assert h2["database_connected"] is False
        assert h2["outbox_backlog"] > h1["outbox_backlog"] > 0
        assert h2["outbox_lag_seconds"] > 0

        await asyncio.to_thread(rig.pg_server.start)
        mark = acked
        await eventually(lambda: reached(mark + 60), "60 writes after the restart")
    finally:
        stop.set()
        await asyncio.gather(*writers)
    assert not model.failures, model.failures[:5]
    await rig.quiescent(within=60)
    assert (await rig.health())["database_connected"] is True
    await rig.check(model)


async def test_sweep_racing_new_messages_loses_and_duplicates_nothing(rig: Rig) -> None:
    """The expiry sweep (TTL 0: every flushed session is evictable at once) runs in a loop while writers
    append to the same sessions; each round waits until its session was evicted, so appends keep hitting
    cold sessions (rehydration) concurrently with the sweep and the worker."""
    model = Model()
    sids = [(await create(rig, model, f"s{i}"))[0] for i in range(4)]
    for i, sid in enumerate(sids):
        await memory(rig, model, sid, i)
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
                await message(rig, model, sid, f"w{w} r{r} m{i}")
                await asyncio.sleep(rnd.random() * 0.01)

    sweeping = asyncio.create_task(sweeper())
    try:
        await asyncio.gather(*(writer(sid, w) for sid in sids for w in range(2)))
    finally:
        stop.set()
        await sweeping
    assert evicted >= 3 * len(sids)
    assert not model.failures, model.failures[:5]
    await rig.quiescent()
    await rig.check(model)

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
        await message(rig, model, sid, "one more")  # hot again, history in Postgres
        assert await all_messages(sid) == in_order(sid)
    await rig.quiescent()
    await rig.check(model)


@pytest.mark.parametrize("interrupt", ["pg_terminate_backend", "pg_cancel_backend"])
async def test_interrupted_database_work_is_transient_not_a_poison_entry(rig: Rig, interrupt: str) -> None:
    """An operator (or a failover, a pooler, a statement_timeout) terminates the worker's connection
    or cancels its statement, mid-batch and again while it retries entry by entry. That says nothing
    about the data: once the database is usable again everything is written, nothing is dead-lettered,
    and no session is left marked ``stuck`` (which pins it in Redis forever: the sweep never evicts a
    stuck session)."""
    model = Model()
    sids = [(await create(rig, model, f"s{i}"))[0] for i in range(2)]
    pool = await asyncpg.create_pool(rig.pg_server.url, min_size=1, max_size=2)
    flusher = outbox_drain.make_flusher(rig.redis, pool, rig.keys, rig.schema)
    await outbox_drain.drain(flusher)
    for sid in sids:
        await message(rig, model, sid, "one")
        await message(rig, model, sid, "two")

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
    await rig.check(model)
    for sid in sids:
        h = await rig.redis.hgetall(rig.keys.for_user(model.users[sid]).session(sid))
        assert "stuck" not in h, h
    assert await sweep(rig.client.app[BACKEND], 0) == len(sids)


async def test_postgres_down_cold_sessions_answer_503_hot_ones_200(rig: Rig) -> None:
    """Without Postgres a cold session cannot be read or written: an honest 503, never a 500 nor a
    wrong 404; hot sessions keep answering; once Postgres is back the cold one is served again."""
    model = Model()
    cold_sid, cold_user = await create(rig, model, "cold")
    await message(rig, model, cold_sid, "old news")
    hot_sid, _hot_user = await create(rig, model, "hot")
    pool = await asyncpg.create_pool(rig.pg_server.url, min_size=0, max_size=2)
    try:
        await outbox_drain.drain(outbox_drain.make_flusher(rig.redis, pool, rig.keys, rig.schema))
    finally:
        await pool.close()
    backend = rig.client.app[BACKEND]
    assert await sweep(backend, 0) == 2
    await message(rig, model, hot_sid, "brought back")  # rehydrated: hot again
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
        await message(rig, model, hot_sid, "still served from Redis")
        assert not model.failures, model.failures
        assert (await rig.health())["database_connected"] is False
    finally:
        await asyncio.to_thread(rig.pg_server.start)
    resp = await rig.client.get(session_url(cold_sid), params={"user_id": cold_user})
    assert (resp.status, await resp.json()) == (200, before)
    rig.start_worker("w1")
    await rig.quiescent()
    await rig.check(model)
