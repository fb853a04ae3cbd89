"""Redis faults under load: the real worker (``python -m workers``) and the API against a private
redis-server that is killed and restarted, paused (SIGSTOP) and filled to its ``maxmemory``, and a
private PostgreSQL. Afterwards Postgres must hold every write the API acknowledged, exactly once.

What an answer promised is what is checked:
- 200: the write is in Postgres, equal to the answer;
- 503 "nothing was written": the write is not there (the command never reached Redis, or Redis
  refused it whole for lack of memory);
- 503 "outcome ... unknown": the write may be there or not (a reply was lost), but at most once and
  without a gap in the sequence numbers;
- anything else (a 500, a 503 of another kind) fails the test.

Each test starts its own redis-server (AOF or maxmemory as it needs) and uses its own schema on a
PostgreSQL cluster started once for the module; neither is a shared server. Figures (recovery time,
latencies while Redis is down, memory) are printed: ``pytest -s -k redis_faults`` shows them.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from session_svc.http.app import create_app
from session_svc.http.appkeys import BACKEND
from session_svc.record.keys import Keys
from session_svc.settings import Settings
from session_svc.storage import outbox
from session_svc.storage.redis_client import REDIS_DOWN_DETAIL, REDIS_OOM_DETAIL, REDIS_UNKNOWN_DETAIL
from tests import outbox_drain, pg_rows, servers, support
from tests.helpers import new_user, session_url
from tests.servers import PgServer, RedisServer, WorkerProcess
from tests.support import eventually
from workers import expiry

pytestmark = pytest.mark.fault

AOF = ("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction")


@dataclass
class Sample:
    start: float
    elapsed: float
    status: int


@dataclass
class Ledger:
    """What the API answered to each write, by what that answer promises (see the module docstring)."""

    users: dict[str, str] = field(default_factory=dict)  # sid -> uid
    acked: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)  # contents of writes with an unknown outcome
    refused: set[str] = field(default_factory=set)  # contents of writes that wrote nothing
    oom: int = 0
    wrong: list[str] = field(default_factory=list)  # answers that are never acceptable
    samples: list[Sample] = field(default_factory=list)

    @property
    def acked_total(self) -> int:
        return sum(len(v) for v in self.acked.values())


@dataclass
class Rig:
    settings: Settings
    client: Any
    redis: Redis
    redis_server: RedisServer
    pg_server: PgServer
    pg: asyncpg.Connection
    log_dir: Path
    ledger: Ledger = field(default_factory=Ledger)
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix, self.settings.redis_buckets)

    def start_worker(self, tag: str) -> WorkerProcess:
        worker = servers.start_worker(self.settings, f"{self.settings.key_prefix}-{tag}", self.log_dir)
        self.workers.append(worker)
        return worker

    def logs(self) -> str:
        return "\n".join(f"--- worker {w.name} (alive={w.alive}):\n{w.tail()}" for w in self.workers)

    async def create(self, title: str = "") -> str:
        uid = new_user()
        resp = await self.client.post("/api/v1/sessions", json={"user_id": uid, "title": title})
        body = await resp.json()
        assert resp.status == 200, body
        sid: str = body["session_id"]
        self.ledger.users[sid] = uid
        self.ledger.acked[sid] = []
        return sid

    async def append(self, sid: str, content: str) -> int:
        """One message, its answer filed in the ledger; returns the status."""
        ledger = self.ledger
        body = {"role": "user", "content": content, "tokens_used": 3, "cost_usd": 0.000125}
        t0 = time.monotonic()
        resp = await self.client.post(
            session_url(sid, "/messages"), params={"user_id": ledger.users[sid]}, json=body
        )
        answer = await resp.json()
        ledger.samples.append(Sample(t0, time.monotonic() - t0, resp.status))
        detail = answer.get("detail") if resp.status == 503 else None
        if resp.status == 200:
            ledger.acked[sid].append(answer)
        elif detail == REDIS_UNKNOWN_DETAIL:
            ledger.unknown.add(content)
        elif detail in (REDIS_DOWN_DETAIL, REDIS_OOM_DETAIL):
            ledger.refused.add(content)
            ledger.oom += detail == REDIS_OOM_DETAIL
        else:
            ledger.wrong.append(f"{resp.status} {answer}")
        return int(resp.status)

    async def health(self) -> tuple[int, dict[str, Any], float]:
        t0 = time.monotonic()
        resp = await self.client.get("/health/detailed")
        return resp.status, await resp.json(), time.monotonic() - t0

    async def quiescent(self, within: float = 60.0) -> None:
        async def drained() -> bool:
            backlog = await outbox.backlog(self.redis, self.keys)
            pending = await outbox_drain.pending_per_consumer(self.redis, self.keys)
            return backlog.entries == 0 and not any(pending.values())

        try:
            await eventually(drained, "an empty outbox backlog with nothing pending", within, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    async def check(self) -> None:
        """Postgres holds each acknowledged write once, equal to its answer, and nothing refused."""
        ledger = self.ledger
        assert not ledger.wrong, ledger.wrong[:5]
        conn = self.pg  # Postgres is never restarted here
        schema = self.settings.db_schema
        for sid, uid in ledger.users.items():
            rows = await pg_rows.pg_messages(conn, schema, sid)
            assert [r["sequence"] for r in rows] == list(range(1, len(rows) + 1)), sid
            by_id = {r["message_id"]: r for r in rows}
            for m in ledger.acked[sid]:
                assert by_id.get(m["message_id"]) == pg_rows.api_message(m), (sid, m)
            acked_ids = {m["message_id"] for m in ledger.acked[sid]}
            extra = {r["content"] for r in rows if r["message_id"] not in acked_ids}
            assert extra <= ledger.unknown, (sid, extra - ledger.unknown)
            assert not {r["content"] for r in rows} & ledger.refused, sid
            resp = await self.client.get(session_url(sid), params={"user_id": uid})
            body = await resp.json()
            assert resp.status == 200, body
            assert body["message_count"] == len(rows), sid
            h = await self.redis.hgetall(self.keys.for_user(uid).session(sid))
            row = (await pg_rows.pg_sessions(conn, schema, [sid]))[sid]
            if h:  # still hot: fully flushed and not pinned
                assert (h["fv"], h.get("stuck")) == (h["v"], None), (sid, h)
            assert row == pg_rows.api_session(body, 0, int(h["v"]) if h else row["version"]), sid
        assert await outbox_drain.dead_letters(self.redis, self.keys) == []


def fault_settings(redis: RedisServer, pg: PgServer, schema: str, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis.url,
        "database_url": pg.url,
        "db_schema": schema,
        "key_prefix": support.new_name("r"),
        "flush_claim_idle_ms": 1000,
        "flush_batch_size": 200,
        "redis_socket_timeout": 1.0,
        "redis_pool_timeout": 1.0,
        "redis_connect_timeout": 0.5,
        "worker_redis_socket_timeout": 2.0,
        "worker_heartbeat_interval": 0.5,
        "worker_heartbeat_timeout": 3.0,
    }
    values.update(over)
    return Settings(**values)


@pytest.fixture
async def make_rig(pg_server: PgServer, aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """``await make_rig(redis_args, **settings)``: a private Redis, a fresh schema, the app on both."""
    made: list[Rig] = []
    schemas: list[str] = []

    async def make(redis_args: tuple[str, ...], **over: Any) -> Rig:
        server = servers.start_redis(*redis_args)
        schema = await asyncio.to_thread(support.create_schema, pg_server.url)  # runs its own loop
        schemas.append(schema)
        settings = fault_settings(server, pg_server, schema, **over)
        client = await aiohttp_client(create_app(settings))
        rig = Rig(
            settings,
            client,
            Redis.from_url(server.url, decode_responses=True),
            server,
            pg_server,
            await asyncpg.connect(pg_server.url),
            tmp_path,
        )
        made.append(rig)
        return rig

    yield make
    try:
        for rig in made:  # SIGTERM while their Redis still runs: each must exit cleanly
            await asyncio.to_thread(servers.stop_workers, rig.workers)
    finally:
        for rig in made:
            for worker in rig.workers:
                if worker.alive:
                    worker.kill()
            await rig.redis.aclose()
            await rig.pg.close(timeout=5)
            rig.redis_server.destroy()
        for schema in schemas:
            await asyncio.to_thread(support.drop_schema, pg_server.url, schema)


class Load:
    """``writers`` tasks appending to the rig's sessions until stopped."""

    def __init__(self, rig: Rig, sids: list[str], writers: int, size: int = 40, pause: float = 0.002) -> None:
        self.rig, self.sids, self.size, self.pause = rig, sids, size, pause
        self.stop = asyncio.Event()
        self.n = 0
        self.tasks = [asyncio.create_task(self._writer(w)) for w in range(writers)]

    async def _writer(self, w: int) -> None:
        rnd = random.Random(w)
        while not self.stop.is_set():
            self.n += 1
            content = f"w{w} n{self.n} ".ljust(self.size, "x")
            await self.rig.append(rnd.choice(self.sids), content)
            await asyncio.sleep(self.pause)

    async def acked(self, more: int, within: float = 30.0) -> float:
        """Until ``more`` further writes were acknowledged; returns how long that took."""
        t0 = time.monotonic()
        target = self.rig.ledger.acked_total + more

        async def reached() -> bool:
            return self.rig.ledger.acked_total >= target

        await eventually(reached, f"{more} more acknowledged writes", within)
        return time.monotonic() - t0

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


def first_ok_after(samples: list[Sample], t: float) -> float:
    """Seconds from ``t`` to the first 200 of a request started after ``t``."""
    return min(s.start + s.elapsed for s in samples if s.start >= t and s.status == 200) - t


# The tests ------------------------------------------------------------------------------------------


async def test_redis_killed_and_restarted_three_times_under_load(make_rig: Any) -> None:
    """kill -9 of Redis (AOF everysec), restarted 3 s later, three times in a row under write load: the
    worker process lives through it and goes on by itself (drain and cron jobs: the sweep evicts the
    sessions at the end), the API recovers without a restart, and Postgres has every 200."""
    rig: Rig = await make_rig(AOF, session_hot_ttl=2, sweep_every_seconds=1)
    sids = [await rig.create(f"s{i}") for i in range(6)]
    worker = rig.start_worker("w1")
    load = Load(rig, sids, writers=8)
    recoveries = []
    down: list[float] = []  # latencies of requests made while Redis was down
    try:
        await load.acked(60)
        for _ in range(3):
            await asyncio.to_thread(rig.redis_server.kill)
            killed = time.monotonic()
            await asyncio.sleep(3)
            await asyncio.to_thread(rig.redis_server.restart)
            restarted = time.monotonic()
            down += [s.elapsed for s in rig.ledger.samples if killed <= s.start < restarted]
            await load.acked(60)
            recoveries.append(first_ok_after(rig.ledger.samples, restarted))
            assert worker.alive, rig.logs()
    finally:
        await load.finish()
    print(
        f"\nredis restarts: {len(down)} requests while down, p50 {statistics.median(down) * 1000:.1f} ms, "
        f"max {max(down) * 1000:.0f} ms; writes acknowledged again {[round(r, 2) for r in recoveries]} s "
        "after restart; "
        f"{rig.ledger.acked_total} acked, {len(rig.ledger.refused)} refused, "
        f"{len(rig.ledger.unknown)} unknown"
    )
    assert worker.alive, rig.logs()
    await rig.quiescent()
    await rig.check()

    last: dict[str, Any] = {}

    async def worker_healthy() -> bool:
        status, body, _ = await rig.health()
        last.update(body)
        return status == 200 and body["workers_alive"] == 1 and body["status"] == "operational"

    try:
        await eventually(worker_healthy, "health to report the worker alive and all well", within=15)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {last}\n{rig.logs()}") from None

    async def all_evicted() -> bool:  # the sweep, an arq cron job, still runs after three restarts
        for sid, uid in rig.ledger.users.items():
            if await rig.redis.exists(rig.keys.for_user(uid).session(sid)):
                return False
        return True

    await eventually(all_evicted, "the sweep to evict every idle, flushed session", within=20)
    await rig.check()  # the same answers, now read back from Postgres
    assert worker.alive, rig.logs()


async def test_redis_paused_for_10s_fails_fast_and_recovers_by_itself(make_rig: Any) -> None:
    """SIGSTOP for 10 s under load: every request is answered within the fail-fast bound (most in
    milliseconds: the circuit breaker), health says why within its 1 s cap, writes are acknowledged
    again soon after SIGCONT without anyone touching the service, and every 200 is in Postgres."""
    rig: Rig = await make_rig(AOF)
    sids = [await rig.create(f"s{i}") for i in range(8)]
    worker = rig.start_worker("w1")
    load = Load(rig, sids, writers=16)
    bound = rig.settings.redis_pool_timeout + rig.settings.redis_socket_timeout + 0.5
    try:
        await load.acked(100)
        paused = time.monotonic()
        rig.redis_server.pause()
        try:
            await asyncio.sleep(2)
            status, health, took = await rig.health()
            assert status == 503 and health["status"] == "degraded", health
            assert health["accepting_writes"] is False
            assert any(r.startswith("Redis unreachable") for r in health["reasons"]), health
            assert took < 1.5, took
            await asyncio.sleep(max(0.0, paused + 10 - time.monotonic()))
        finally:
            rig.redis_server.resume()
        resumed = time.monotonic()
        await load.acked(100)
    finally:
        await load.finish()
    during = [s for s in rig.ledger.samples if paused <= s.start < resumed - bound]
    latencies = sorted(s.elapsed for s in during)
    recovery = first_ok_after(rig.ledger.samples, resumed)
    print(
        f"\nredis paused 10 s: {len(during)} requests answered, "
        f"p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms; writes acknowledged again {recovery:.2f} s after SIGCONT; "
        f"{len(rig.ledger.unknown)} unknown outcomes, {len(rig.ledger.refused)} refused"
    )
    assert {s.status for s in during} == {503}
    assert latencies[-1] <= bound, latencies[-10:]
    assert len(during) >= 500  # without the breaker, 16 writers saw about 16 answers a second
    assert statistics.median(latencies) < 0.05
    assert recovery < 5
    assert worker.alive, rig.logs()
    await rig.quiescent()
    await rig.check()


async def test_full_redis_refuses_writes_with_503_and_recovers_by_itself(make_rig: Any) -> None:
    """Redis at maxmemory under 16 writers of 2 KB messages to 40 sessions, filled while no worker ran
    (so the worker must flush into a full Redis: its bookkeeping after COMMIT must still land), then
    idle for longer than a reconciliation period: writes answer 503 "out of memory" (never 500) while
    reads go on; once the writers stop, the worker evicts flushed sessions and writes are taken again;
    no session is left pinned, the worker never dies, and every 200 is in Postgres."""
    rig: Rig = await make_rig(
        ("--maxmemory", "12mb", "--maxmemory-policy", "noeviction"),
        session_hot_ttl=5,
        sweep_every_seconds=1,
        reconcile_every_seconds=2,
        reconcile_stale_after_seconds=1,
    )
    sids = [await rig.create(f"s{i}") for i in range(40)]
    load = Load(rig, sids, writers=16, size=2048, pause=0)
    reads: list[int] = []
    try:

        async def full() -> bool:
            sid = random.choice(sids)
            resp = await rig.client.get(session_url(sid), params={"user_id": rig.ledger.users[sid]})
            reads.append(resp.status)
            return rig.ledger.oom >= 50

        await eventually(full, "writes refused for lack of memory", within=60, interval=0.05)
        full_at = time.monotonic()

        async def health_says_full() -> dict[str, Any] | None:
            status, body, _ = await rig.health()
            oom = status == 503 and not body["accepting_writes"]
            return body if oom and any("out of memory" in r for r in body["reasons"]) else None

        await eventually(health_says_full, "health to report Redis out of memory", within=10, interval=0.05)
        worker = rig.start_worker("w1")  # flushes into a full Redis while the writers keep it full
        await asyncio.sleep(3)
    finally:
        await load.finish()
    assert set(reads) == {200}, reads  # reads keep working on a full Redis
    assert {s.status for s in rig.ledger.samples} == {200, 503}
    assert not rig.ledger.wrong, rig.ledger.wrong[:3]

    # Idle now. Writes are taken again once the worker has flushed and evicted sessions.
    idle = time.monotonic()
    probe = sids[0]

    async def writes_taken() -> bool:
        return await rig.append(probe, f"probe {time.monotonic()}") == 200

    try:
        await eventually(
            writes_taken, "a write acknowledged after the writers stopped", within=30, interval=0.25
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{rig.logs()}") from None
    recovered = time.monotonic() - idle
    await asyncio.sleep(max(0.0, idle + 2 * rig.settings.reconcile_every_seconds + 1 - time.monotonic()))
    info = await rig.redis.info("memory")
    print(
        f"\nfull redis: {rig.ledger.acked_total} acked, {rig.ledger.oom} answered 503 out of memory; "
        f"writes taken again {recovered:.2f} s after the load stopped; used_memory "
        f"{info['used_memory'] / 2**20:.1f} MiB of {info['maxmemory'] / 2**20:.0f} MiB"
    )
    assert worker.alive, rig.logs()
    assert info["used_memory"] < info["maxmemory"] * rig.settings.redis_memory_high_water, rig.logs()
    await rig.quiescent()
    await rig.check()
    status, health, _ = await rig.health()
    assert status == 200 and health["accepting_writes"] is True, health
    assert time.monotonic() - full_at < 60
    assert worker.alive, rig.logs()


async def test_health_reports_a_killed_worker_within_the_heartbeat_timeout(make_rig: Any) -> None:
    rig: Rig = await make_rig(())
    worker = rig.start_worker("w1")

    async def alive() -> bool:
        status, body, _ = await rig.health()
        return status == 200 and body["status"] == "operational" and body["workers_alive"] == 1

    await eventually(alive, "health to see the worker", within=20)
    worker.kill()
    killed = time.monotonic()

    async def reported() -> dict[str, Any] | None:
        status, body, _ = await rig.health()
        gone = body["workers_alive"] == 0 and any(r.startswith("no live worker") for r in body["reasons"])
        return body if gone and status == 200 else None  # writes are still taken: 200, degraded

    body = await eventually(reported, "health to report the worker gone", within=10, interval=0.1)
    took = time.monotonic() - killed
    assert body is not None
    print(f"\nworker killed: health reported it after {took:.2f} s")
    assert body["status"] == "degraded" and body["accepting_writes"] is True
    assert took <= rig.settings.worker_heartbeat_timeout + 1


# Single requests, deterministic ---------------------------------------------------------------------


def set_maxmemory(server: RedisServer, limit: str) -> None:
    """``1`` makes Redis full at once, whatever it holds (it refuses writes while used > limit)."""
    with server.client() as r:
        r.config_set("maxmemory", limit)


async def test_full_redis_refuses_every_write_whole_and_keeps_reading(make_rig: Any) -> None:
    rig: Rig = await make_rig(("--maxmemory-policy", "noeviction"))
    sid = await rig.create("before")
    uid = rig.ledger.users[sid]
    assert await rig.append(sid, "one") == 200
    before = await (await rig.client.get(session_url(sid), params={"user_id": uid})).json()
    set_maxmemory(rig.redis_server, "1")

    p = {"user_id": uid}
    writes = [
        ("POST", "/api/v1/sessions", {}, {"user_id": new_user()}),
        ("POST", session_url(sid, "/messages"), p, {"role": "user", "content": "two"}),
        ("POST", session_url(sid, "/memory"), p, {"memory_type": "entity", "content": "x"}),
        ("PUT", session_url(sid), p, {"title": "changed"}),
        ("DELETE", session_url(sid), p, None),
    ]
    for method, url, query, body in writes:
        resp = await rig.client.request(method, url, params=query, json=body)
        assert (resp.status, await resp.json()) == (503, {"detail": REDIS_OOM_DETAIL}), (method, url)
    # Reads go on, and show that nothing changed.
    after = await (await rig.client.get(session_url(sid), params=p)).json()
    assert after == before
    resp = await rig.client.get(session_url(sid, "/messages"), params=p)
    assert [m["content"] for m in (await resp.json())["messages"]] == ["one"]
    status, health, _ = await rig.health()
    assert status == 503 and health["accepting_writes"] is False, health

    # Room again (an operator raised maxmemory): writes are taken, and the sequence has no gap.
    set_maxmemory(rig.redis_server, "0")
    resp = await rig.client.post(
        session_url(sid, "/messages"), params=p, json={"role": "user", "content": "two"}
    )
    assert resp.status == 200 and (await resp.json())["sequence"] == 2


async def test_a_lost_reply_is_an_unknown_outcome_not_a_refusal(make_rig: Any) -> None:
    """Redis paused after receiving a write: the API cannot know whether it ran, and says so; when
    Redis resumes, the write is applied (which is why "nothing was written" would have been a lie)."""
    rig: Rig = await make_rig(())
    sid = await rig.create()
    uid = rig.ledger.users[sid]
    assert await rig.append(sid, "first") == 200  # the script is loaded: the next call is one EVALSHA
    rig.redis_server.pause()
    try:
        t0 = time.monotonic()
        resp = await rig.client.post(
            session_url(sid, "/messages"), params={"user_id": uid}, json={"role": "user", "content": "maybe"}
        )
        took = time.monotonic() - t0
        assert (resp.status, await resp.json()) == (503, {"detail": REDIS_UNKNOWN_DETAIL})
        assert took < rig.settings.redis_socket_timeout + 0.5
    finally:
        rig.redis_server.resume()

    async def applied() -> bool:
        resp = await rig.client.get(session_url(sid), params={"user_id": uid})
        body = await resp.json()
        return resp.status == 200 and body["message_count"] == 2

    await eventually(applied, "the paused write to be applied once Redis resumed", within=5)


async def test_reconciliation_resends_in_bounded_chunks_and_stops_above_the_high_water_mark(
    make_rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session of 25 messages whose outbox entries were all lost is re-sent a few entries per script
    (never its whole history at once), not at all while Redis is above the high-water mark, and
    completely once it is below."""
    rig: Rig = await make_rig(())
    sid = await rig.create()
    for i in range(25):
        assert await rig.append(sid, f"m{i}") == 200
    uk = rig.keys.for_user(rig.ledger.users[sid])
    await rig.redis.delete(uk.outbox)  # every entry lost, as after a failover
    backend = rig.client.app[BACKEND]

    # Above the mark (any used memory is "above" 0+): nothing is added to Redis.
    set_maxmemory(rig.redis_server, "100mb")
    assert await expiry.reconcile(backend, stale_after_s=0, high_water=1e-9) == 0
    assert await rig.redis.xlen(uk.outbox) == 0

    monkeypatch.setattr(expiry, "RESYNC_ENTRIES", 4)
    chunks: list[int] = []
    resync = backend.scripts.resync

    async def counting(*args: Any) -> Any:
        reply = await resync(*args)
        chunks.append(int(reply[2]))
        return reply

    monkeypatch.setattr(backend.scripts, "resync", counting)
    assert await expiry.reconcile(backend, stale_after_s=0, high_water=1.0) == 1
    assert max(chunks) <= 4 and sum(chunks) == 25 + 1, chunks  # messages, then the snapshot
    pool = await asyncpg.create_pool(rig.pg_server.url, min_size=0, max_size=2)
    try:
        await outbox_drain.drain(outbox_drain.make_flusher(rig.redis, pool, rig.keys, rig.settings.db_schema))
    finally:
        await pool.close()
    await rig.check()
