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

Each test builds its rig (``tests/rig.py``): its own redis-server (AOF or maxmemory as it needs) and
its own schema on a PostgreSQL cluster started once for the module, neither a shared server; answers
are filed and reconciled by the model of acknowledged writes (``tests/acked.py``). Figures (recovery time,
latencies while Redis is down, memory) are printed: ``pytest -s -k redis_faults`` shows them.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import asyncpg
import pytest

from session_svc.http.appkeys import BACKEND
from session_svc.storage.redis_client import REDIS_OOM_DETAIL, REDIS_UNKNOWN_DETAIL
from tests import outbox_drain
from tests.acked import first_ok_after
from tests.helpers import new_user, session_url
from tests.rig import AOF, MakeRig, Rig
from tests.servers import RedisServer
from tests.support import eventually
from workers import expiry

pytestmark = pytest.mark.fault


# The tests ------------------------------------------------------------------------------------------


async def test_redis_killed_and_restarted_three_times_under_load(make_rig: MakeRig) -> None:
    """kill -9 of Redis (AOF everysec), restarted 3 s later, three times in a row under write load: the
    worker process lives through it and goes on by itself (drain and cron jobs: the sweep evicts the
    sessions at the end), the API recovers without a restart, and Postgres has every 200."""
    rig: Rig = await make_rig(AOF, session_hot_ttl=2, sweep_every_seconds=1)
    sids = [await rig.create(f"s{i}") for i in range(6)]
    worker = rig.start_worker("w1")
    load = rig.load(sids, writers=8)
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
            down += [s.elapsed for s in rig.model.samples if killed <= s.start < restarted]
            await load.acked(60)
            recoveries.append(first_ok_after(rig.model.samples, restarted))
            assert worker.alive, rig.logs()
    finally:
        await load.finish()
    print(
        f"\nredis restarts: {len(down)} requests while down, p50 {statistics.median(down) * 1000:.1f} ms, "
        f"max {max(down) * 1000:.0f} ms; writes acknowledged again {[round(r, 2) for r in recoveries]} s "
        "after restart; "
        f"{rig.model.acked_total} acked, {len(rig.model.refused)} refused, "
        f"{len(rig.model.unknown)} unknown"
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
        for sid, uid in rig.model.users.items():
            if await rig.redis.exists(rig.keys.for_user(uid).session(sid)):
                return False
        return True

    await eventually(all_evicted, "the sweep to evict every idle, flushed session", within=20)
    await rig.check()  # the same answers, now read back from Postgres
    assert worker.alive, rig.logs()


async def test_redis_paused_for_10s_fails_fast_and_recovers_by_itself(make_rig: MakeRig) -> None:
    """SIGSTOP for 10 s under load: every request is answered within the fail-fast bound (most in
    milliseconds: the circuit breaker), health says why within its 1 s cap, writes are acknowledged
    again soon after SIGCONT without anyone touching the service, and every 200 is in Postgres."""
    rig: Rig = await make_rig(AOF)
    sids = [await rig.create(f"s{i}") for i in range(8)]
    worker = rig.start_worker("w1")
    load = rig.load(sids, writers=16)
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
    during = [s for s in rig.model.samples if paused <= s.start < resumed - bound]
    latencies = sorted(s.elapsed for s in during)
    recovery = first_ok_after(rig.model.samples, resumed)
    print(
        f"\nredis paused 10 s: {len(during)} requests answered, "
        f"p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms; writes acknowledged again {recovery:.2f} s after SIGCONT; "
        f"{len(rig.model.unknown)} unknown outcomes, {len(rig.model.refused)} refused"
    )
    assert {s.status for s in during} == {503}
    assert latencies[-1] <= bound, latencies[-10:]
    assert len(during) >= 500  # without the breaker, 16 writers saw about 16 answers a second
    assert statistics.median(latencies) < 0.05
    assert recovery < 5
    assert worker.alive, rig.logs()
    await rig.quiescent()
    await rig.check()


async def test_full_redis_refuses_writes_with_503_and_recovers_by_itself(make_rig: MakeRig) -> None:
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
    load = rig.load(sids, writers=16, size=2048, pause=0)
    reads: list[int] = []
    try:

        async def full() -> bool:
            sid = random.choice(sids)
            resp = await rig.client.get(session_url(sid), params={"user_id": rig.model.users[sid]})
            reads.append(resp.status)
            return rig.model.oom >= 50

        await eventually(full, "writes refused for lack of memory", within=60, interval=0.05)
        full_at = time.monotonic()

        async def health_says_full() -> dict[str, Any] | None:
            status, body, _ = await rig.health()
            oom = status == 503 and not body["accepting_writes"]
            return body if oom and any("out of memory" in r for r in body["reasons"]) else None

        await eventually(health_says_full, "health to report Redis out of memory", within=10, interval=0.05)
        worker = rig.start_worker("w1")  # flushes into a full Redis while the writers keep it full

        async def flushed() -> bool:
            assert worker.alive, rig.logs()
            return await rig.count("session_messages") > 0

        await eventually(flushed, "the worker's first batch committed into Postgres", within=20)
    finally:
        await load.finish()
    assert set(reads) == {200}, reads  # reads keep working on a full Redis
    assert {s.status for s in rig.model.samples} == {200, 503}
    assert not rig.model.wrong, rig.model.wrong[:3]

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
        f"\nfull redis: {rig.model.acked_total} acked, {rig.model.oom} answered 503 out of memory; "
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


async def test_health_reports_a_killed_worker_within_the_heartbeat_timeout(make_rig: MakeRig) -> None:
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


async def test_full_redis_refuses_every_write_whole_and_keeps_reading(make_rig: MakeRig) -> None:
    rig: Rig = await make_rig(("--maxmemory-policy", "noeviction"))
    sid = await rig.create("before")
    uid = rig.model.users[sid]
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


async def test_a_lost_reply_is_an_unknown_outcome_not_a_refusal(make_rig: MakeRig) -> None:
    """Redis paused after receiving a write: the API cannot know whether it ran, and says so; when
    Redis resumes, the write is applied (which is why "nothing was written" would have been a lie)."""
    rig: Rig = await make_rig(())
    sid = await rig.create()
    uid = rig.model.users[sid]
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
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session of 25 messages whose outbox entries were all lost is re-sent a few entries per script
    (never its whole history at once), not at all while Redis is above the high-water mark, and
    completely once it is below."""
    rig: Rig = await make_rig(())
    sid = await rig.create()
    for i in range(25):
        assert await rig.append(sid, f"m{i}") == 200
    uk = rig.keys.for_user(rig.model.users[sid])
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
