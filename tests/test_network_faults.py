"""Faults on the links and of the API process, under load, each on a private redis-server and a private
PostgreSQL: Redis connections killed in the middle of script calls (``CLIENT KILL``), Redis and Postgres
behind a TCP proxy (``tests/proxy.py``) that slows, black-holes or cuts the link, and the API process
killed with SIGKILL and started again.

Every append carries content no other request sends, so each answer can be checked against what is
stored, in Redis and in Postgres, once the worker has drained: a 200 promises its message is stored
once, at the ``sequence`` that answer gave (an answer meant for another request would name another
sequence or another message id); a 503 "nothing was written" promises it is absent; "outcome unknown"
may be either (``Rig.check`` of ``test_redis_faults``, and ``check_stored`` here: the Redis stream and
Postgres agree, no content is stored twice, and every counter a user sees equals what is stored).

Figures (latency during the fault, recovery time, acknowledged writes lost) are measured, never
asserted beyond the bounds the timeouts promise: each test prints them and writes them to
``var/reliability/<name>.json``; ``docs/reliability.md`` is the table made from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import redis as redis_sync
from redis.exceptions import TimeoutError as RedisTimeoutError

from session_svc.http.app import create_app
from session_svc.http.appkeys import BACKEND
from session_svc.settings import Settings
from session_svc.storage import outbox
from session_svc.storage.coalesce import Coalescer
from session_svc.storage.redis_client import (
    REDIS_DOWN_DETAIL,
    REDIS_OOM_DETAIL,
    REDIS_UNKNOWN_DETAIL,
    CircuitOpen,
    redis_client,
)
from tests import pg_rows, servers, support, test_redis_faults
from tests.proxy import proxy_to
from tests.support import ROOT, eventually
from tests.test_redis_faults import Load, Rig, Sample, first_ok_after
from workers.expiry import sweep

pytestmark = pytest.mark.fault

make_rig = test_redis_faults.make_rig  # the fixture: a private Redis, a fresh schema, the app on both

API_NAME = "api-under-test"  # CLIENT SETNAME of the API's Redis connections, to kill only those
PG_DOWN_DETAIL = "Session store unavailable (PostgreSQL)"
FIGURES = ROOT / "var" / "reliability"


# Figures ---------------------------------------------------------------------------------------------


def ms(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (seconds) in milliseconds, 0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def record(name: str, **figures: Any) -> None:
    """Print the figures of a fault and keep them in ``var/reliability/<name>.json``."""
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    FIGURES.mkdir(parents=True, exist_ok=True)
    doc = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), **figures}
    (FIGURES / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")


def during(samples: list[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.start < end]


def within(samples: list[Sample], start: float, end: float) -> list[Sample]:
    """Requests made and answered between ``start`` and ``end`` (one made just before a link came back
    may be sent after it, and answered 200)."""
    return [s for s in samples if start <= s.start and s.start + s.elapsed < end]


async def outcomes(rig: Rig) -> dict[str, int]:
    """How the writes were answered, and how many of the "outcome unknown" ones Postgres holds."""
    ledger = rig.ledger
    stored: set[str] = set()
    for sid in ledger.users:
        stored |= {r["content"] for r in await pg_rows.pg_messages(rig.pg, rig.settings.db_schema, sid)}
    return {
        "acked": ledger.acked_total,
        "unknown": len(ledger.unknown),
        "unknown_applied": len(ledger.unknown & stored),
        "refused": len(ledger.refused),
    }


# The check beyond Rig.check ----------------------------------------------------------------------------


async def check_stored(rig: Rig) -> int:
    """After ``Rig.check`` (each 200 in Postgres once, equal to its answer, nothing refused, no gap):
    the Redis stream of a session still hot holds the same content at the same sequences as Postgres, no
    content is stored twice, every session's counters equal the sum of its stored messages, and the
    service-wide stats equal the sum over sessions. Returns acknowledged writes missing from Postgres
    (the figure the table reports: ``Rig.check`` has already failed if there is one)."""
    schema = rig.settings.db_schema
    totals: dict[str, Any] = {"total_messages": 0, "total_tokens": 0, "total_cost": Decimal(0)}
    lost = 0
    for sid, uid in rig.ledger.users.items():
        rows = await pg_rows.pg_messages(rig.pg, schema, sid)
        contents = [r["content"] for r in rows]
        assert len(set(contents)) == len(contents), (sid, "a message stored twice")
        stored_ids = {r["message_id"] for r in rows}
        lost += sum(m["message_id"] not in stored_ids for m in rig.ledger.acked[sid])
        stream = await rig.redis.xrange(rig.keys.for_user(uid).messages(sid))
        in_redis = {int(entry_id.partition("-")[0]): f["content"] for entry_id, f in stream}
        assert in_redis == {r["sequence"]: r["content"] for r in rows if r["sequence"] in in_redis}, sid
        resp = await rig.client.get(f"/api/v1/sessions/{sid}", params={"user_id": uid})
        body = await resp.json()
        assert resp.status == 200, body
        assert body["total_tokens"] == sum(r["tokens_used"] for r in rows), sid
        assert pg_rows.money(body["total_cost"]) == sum((r["cost_usd"] for r in rows), Decimal(0)), sid
        totals["total_messages"] += len(rows)
        totals["total_tokens"] += body["total_tokens"]
        totals["total_cost"] += pg_rows.money(body["total_cost"])
    stats = await (await rig.client.get("/api/v1/sessions/stats")).json()
    assert stats["total_sessions"] == len(rig.ledger.users), stats
    assert {**{k: stats[k] for k in totals}, "total_cost": pg_rows.money(stats["total_cost"])} == totals
    return lost


async def settle(rig: Rig) -> int:
    """The worker drains everything; then every check. Returns acknowledged writes lost (0)."""
    await rig.quiescent()
    await rig.check()
    return await check_stored(rig)


async def use_client(rig: Rig, aiohttp_client: Any, **settings: Any) -> None:
    """The rig's app, built again with ``settings`` changed (a URL through a proxy, a name on its Redis
    connections); the worker and the test's own clients keep going straight to the servers."""
    rig.client = await aiohttp_client(create_app(dataclasses.replace(rig.settings, **settings)))


def api_connections(rig: Rig) -> list[int]:
    with rig.redis_server.client() as r:
        return [int(c["id"]) for c in r.client_list() if c.get("name") == API_NAME]


def kill_api_connections(rig: Rig) -> int:
    """``CLIENT KILL ID`` of every connection the API holds now; returns how many were killed."""
    killed = 0
    with rig.redis_server.client() as r:
        for cid in [int(c["id"]) for c in r.client_list() if c.get("name") == API_NAME]:
            killed += int(r.execute_command("CLIENT", "KILL", "ID", cid))
    return killed


# 1. CLIENT KILL in the middle of script calls ----------------------------------------------------------


async def test_api_connections_killed_repeatedly_under_coalesced_appends(
    make_rig: Any, aiohttp_client: Any
) -> None:
    """Every Redis connection of the API killed ten times a second for 3 s while 16 writers append
    (coalesced: one pipeline of many scripts per connection): each answer is a 200 whose message is
    stored at the sequence it gave, or an honest 503; nothing is half-written; the service recovers
    without a restart."""
    rig: Rig = await make_rig(())
    await use_client(rig, aiohttp_client, redis_url=f"{rig.redis_server.url}?client_name={API_NAME}")
    assert rig.settings.redis_coalesce
    sids = [await rig.create(f"s{i}") for i in range(8)]
    rig.start_worker("w1")
    load = Load(rig, sids, writers=16)
    kills = rounds = 0
    try:
        await load.acked(100)
        start = time.monotonic()
        while time.monotonic() - start < 3:
            kills += await asyncio.to_thread(kill_api_connections, rig)
            rounds += 1
            await asyncio.sleep(0.1)
        end = time.monotonic()
        await load.acked(100)
    finally:
        await load.finish()
    hit = during(rig.ledger.samples, start, end)
    lost = await settle(rig)
    record(
        "client_kill",
        kill_rounds=rounds,
        connections_killed=kills,
        requests_during=len(hit),
        p50_ms=ms([s.elapsed for s in hit], 0.5),
        p99_ms=ms([s.elapsed for s in hit], 0.99),
        answered_200_during=sum(s.status == 200 for s in hit),
        recovery_s=round(first_ok_after(rig.ledger.samples, end), 3),
        acked_lost=lost,
        **await outcomes(rig),
    )
    assert kills >= 5, (kills, rounds)  # the API was using Redis when its connections died
    assert rig.ledger.unknown or rig.ledger.refused  # and some requests saw it
    assert lost == 0


def busy_script(server: servers.RedisServer, seconds: float, started: threading.Event) -> None:
    """A Lua script that keeps Redis busy for ``seconds`` (below lua-time-limit: nothing else runs)."""
    lua = "local t = redis.call('TIME'); local s = t[1] + t[2] / 1e6; local n = 0 " + (
        "repeat n = n + 1; t = redis.call('TIME') until t[1] + t[2] / 1e6 - s > tonumber(ARGV[1]) return n"
    )
    with server.client() as r:
        started.set()
        r.eval(lua, 0, seconds)


def kill_ids(killer: redis_sync.Redis, ids: list[int]) -> int:
    """``CLIENT KILL ID`` of each, sent at once (while a script runs, they wait in Redis' input buffer)."""
    pipe = killer.pipeline(transaction=False)
    for cid in ids:
        pipe.execute_command("CLIENT", "KILL", "ID", cid)
    return sum(int(n) for n in pipe.execute(raise_on_error=False) if isinstance(n, int))


async def test_api_connections_killed_while_a_long_script_runs(make_rig: Any, aiohttp_client: Any) -> None:
    """Redis runs a 1 s script; meanwhile 24 appends are sent (one coalesced pipeline, queued behind the
    script) and the kill of the API's connection is sent too. Redis runs the kill only after the script,
    as it runs everything, one at a time: a script is never cut halfway. Scripts still queued on the
    killed connection die with it (never run), and a reply not yet written is lost with it (the script
    ran): either way the answer is a 503 "outcome unknown", nothing is half-applied, the sequences stay
    gap-free with counters equal to what is stored, and the next appends are 200 without a restart."""
    rig: Rig = await make_rig(())
    # Connected before the API: after the script, Redis reads this connection first (a kill sent from a
    # connection made later runs after the API's commands, whose replies are then already on their way).
    killer = rig.redis_server.client()
    killer.ping()
    await use_client(rig, aiohttp_client, redis_url=f"{rig.redis_server.url}?client_name={API_NAME}")
    sids = [await rig.create(f"s{i}") for i in range(4)]
    for i, sid in enumerate(sids):
        assert await rig.append(sid, f"before {i}") == 200
    ids = await asyncio.to_thread(api_connections, rig)
    assert ids
    started = threading.Event()
    script = asyncio.create_task(asyncio.to_thread(busy_script, rig.redis_server, 1.0, started))
    await asyncio.to_thread(started.wait, 5)
    await asyncio.sleep(0.1)  # the script is running
    appends = [asyncio.create_task(rig.append(sids[i % 4], f"during {i}")) for i in range(24)]
    await asyncio.sleep(0.1)  # sent, waiting behind the script
    killed = await asyncio.to_thread(kill_ids, killer, ids)
    killer.close()
    statuses = await asyncio.gather(*appends)
    await script
    after = [await rig.append(sid, f"after {i}") for i, sid in enumerate(sids)]
    rig.start_worker("w1")
    lost = await settle(rig)
    record(
        "client_kill_long_script",
        connections_killed=killed,
        answers={str(s): statuses.count(s) for s in sorted(set(statuses))},
        acked_lost=lost,
        **await outcomes(rig),
    )
    assert killed >= 1
    # Which of the queued scripts the kill overtakes varies from run to run (all of them, some, or none
    # when Redis had already answered): the figures say what happened, the checks hold either way.
    assert set(statuses) <= {200, 503}
    assert after == [200] * 4  # no restart needed
    assert lost == 0


# 2. Redis behind a slow, then black-holed link ---------------------------------------------------------


async def test_redis_link_slow_then_too_slow_then_black_holed(make_rig: Any, aiohttp_client: Any) -> None:
    """The API reaches Redis through the proxy; 8 writers append throughout.
    - +100 ms each way (well below REDIS_SOCKET_TIMEOUT, 2 s here: the proxy shares this process, and
      so the CPU, with the app and the writers): every answer a correct 200, slower.
    - +1.2 s each way for 5 s (the round trip is over the timeout): 503s within the timeouts, "outcome
      unknown" for those sent (and the late commands do land: Redis gets them after the client gave up);
      after the first round of timeouts the breaker is open, and the rest answer in milliseconds.
    - black-hole for 4 s: 503 within the timeouts, then in milliseconds once the breaker opens; health
      says Redis is unreachable.
    - back to normal: writes are acknowledged again without a restart."""
    rig: Rig = await make_rig((), redis_socket_timeout=2.0)
    with proxy_to(rig.redis_server.port) as proxy:
        await use_client(rig, aiohttp_client, redis_url=proxy.url("redis://127.0.0.1:{port}/0"))
        sids = [await rig.create(f"s{i}") for i in range(6)]
        rig.start_worker("w1")
        load = Load(rig, sids, writers=8)
        bound = rig.settings.redis_pool_timeout + rig.settings.redis_socket_timeout + 0.5
        marks: dict[str, float] = {}
        health: dict[str, Any] = {}
        try:
            await load.acked(50)
            proxy.delay(up=0.1, down=0.1)  # returns once the proxy applies it: then mark the time
            marks["slow"] = time.monotonic()
            await asyncio.sleep(3)
            proxy.delay(up=1.2, down=1.2)
            marks["too_slow"] = time.monotonic()
            await asyncio.sleep(5)
            proxy.blackhole()
            marks["blackhole"] = time.monotonic()
            await asyncio.sleep(2)
            status, body, took = await rig.health()
            health = {"status": status, "reasons": body["reasons"], "took_s": round(took, 2)}
            await asyncio.sleep(2)
            marks["normal"] = time.monotonic()  # before: a request answered 200 once the link is back
            proxy.normal()
            await load.acked(50)
        finally:
            await load.finish()
            proxy.normal()
        lost = await settle(rig)
    samples = rig.ledger.samples
    slow = within(samples, marks["slow"] + 0.5, marks["too_slow"])  # after requests of before drained
    too_slow = within(samples, marks["too_slow"] + 0.5, marks["blackhole"])
    holed = within(samples, marks["blackhole"] + 0.5, marks["normal"])
    figures = {
        f"{name}_{key}": value
        for name, hit in (("slow", slow), ("too_slow", too_slow), ("blackhole", holed))
        for key, value in (
            ("requests", len(hit)),
            ("ok", sum(s.status == 200 for s in hit)),
            ("p50_ms", ms([s.elapsed for s in hit], 0.5)),
            ("p99_ms", ms([s.elapsed for s in hit], 0.99)),
            ("max_ms", ms([s.elapsed for s in hit], 1.0)),
        )
    }
    recovery = first_ok_after(samples, marks["normal"])
    record("redis_link", **figures, health_during_blackhole=health, recovery_s=round(recovery, 3),
           acked_lost=lost, **await outcomes(rig))  # fmt: skip
    assert {s.status for s in slow} == {200} and min(s.elapsed for s in slow) >= 0.2
    assert {s.status for s in too_slow} | {s.status for s in holed} == {503}
    assert max(s.elapsed for s in too_slow + holed) <= bound
    # The breaker: after the first round of timeouts, no request waits for one.
    assert statistics.median(s.elapsed for s in too_slow) < 0.05
    assert statistics.median(s.elapsed for s in holed) < 0.05
    assert health["status"] == 503 and any(r.startswith("Redis unreachable") for r in health["reasons"])
    assert rig.ledger.unknown  # sent and not answered in time: the answer did not pretend otherwise
    assert recovery < 5
    assert lost == 0


async def test_a_coalesced_batch_timing_out_opens_the_breaker_for_all_its_callers(private_redis: Any) -> None:
    """Eight script calls sent as one pipeline over a black-holed link time out together after
    REDIS_SOCKET_TIMEOUT, each an "outcome unknown". They are eight callers that met Redis not
    answering, as eight callers on their own connections would be: the breaker (3 failures) is open at
    once, and the next call is refused in milliseconds ("nothing was written") instead of waiting for
    another timeout, and another, one batch at a time."""
    server = private_redis()
    with proxy_to(server.port) as proxy:
        settings = Settings(redis_url=proxy.url("redis://127.0.0.1:{port}/0"), redis_socket_timeout=1.0)
        redis = redis_client(settings)
        try:
            source = "return 1"
            sha = await redis.script_load(source)
            coalescer = Coalescer(redis)
            assert await coalescer.call(sha, source, [], []) == 1  # a pooled connection, in use
            proxy.blackhole()
            failed = await asyncio.gather(
                *(coalescer.call(sha, source, [], []) for _ in range(8)), return_exceptions=True
            )
            assert all(isinstance(e, RedisTimeoutError) for e in failed), failed
            t0 = time.monotonic()
            with pytest.raises(CircuitOpen):
                await coalescer.call(sha, source, [], [])
            assert time.monotonic() - t0 < 0.5
        finally:
            proxy.normal()
            await redis.aclose()


async def test_redis_link_cut_repeatedly(make_rig: Any, aiohttp_client: Any) -> None:
    """Every connection through the proxy reset five times, once a second, and new ones refused for
    0.3 s each time: the same promises as CLIENT KILL, from the network's side."""
    rig: Rig = await make_rig(())
    with proxy_to(rig.redis_server.port) as proxy:
        await use_client(rig, aiohttp_client, redis_url=proxy.url("redis://127.0.0.1:{port}/0"))
        sids = [await rig.create(f"s{i}") for i in range(6)]
        rig.start_worker("w1")
        load = Load(rig, sids, writers=8)
        try:
            await load.acked(50)
            start = time.monotonic()
            for _ in range(5):
                proxy.cut()
                await asyncio.sleep(0.3)
                proxy.normal()
                await asyncio.sleep(0.7)
            end = time.monotonic()
            await load.acked(50)
        finally:
            await load.finish()
        lost = await settle(rig)
    hit = during(rig.ledger.samples, start, end)
    record(
        "redis_link_cut",
        requests_during=len(hit),
        ok_during=sum(s.status == 200 for s in hit),
        p50_ms=ms([s.elapsed for s in hit], 0.5),
        p99_ms=ms([s.elapsed for s in hit], 0.99),
        recovery_s=round(first_ok_after(rig.ledger.samples, end), 3),
        acked_lost=lost,
        **await outcomes(rig),
    )
    assert rig.ledger.unknown or rig.ledger.refused
    assert lost == 0


# 3. Postgres behind a slow or black-holed link ---------------------------------------------------------


async def flushed_ahead(rig: Rig) -> list[str]:
    """Sessions whose Redis record claims more is in Postgres (``fv``, set with the XACK after COMMIT)
    than Postgres holds: there must never be one."""
    rows = await pg_rows.pg_sessions(rig.pg, rig.settings.db_schema, list(rig.ledger.users))
    versions = {sid: row["version"] for sid, row in rows.items()}
    ahead = []
    for sid, uid in rig.ledger.users.items():
        fv = await rig.redis.hget(rig.keys.for_user(uid).session(sid), "fv")
        if fv is not None and int(fv) > versions.get(sid, 0):
            ahead.append(f"{sid}: fv {fv} > {versions.get(sid)}")
    return ahead


async def test_worker_postgres_link_black_holed_then_slow(make_rig: Any, tmp_path: Any) -> None:
    """The worker reaches Postgres through the proxy (PG_COMMAND_TIMEOUT=2), 8 writers append to the API
    (straight to Redis) throughout. Black-holed for 6 s: writes are still acknowledged, nothing is
    marked flushed that Postgres does not hold (the outbox acknowledges after COMMIT only), the backlog
    grows; then +100 ms each way, then normal: everything is flushed, nothing lost or doubled."""
    rig: Rig = await make_rig((), pg_command_timeout=2.0)
    sids = [await rig.create(f"s{i}") for i in range(6)]
    with proxy_to(rig.pg_server.port) as proxy:
        through = dataclasses.replace(
            rig.settings, database_url=f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
        )
        worker = servers.start_worker(through, f"{rig.settings.key_prefix}-w1", rig.log_dir)
        rig.workers.append(worker)
        await rig.quiescent()  # the sessions are in Postgres: the worker works through the proxy
        load = Load(rig, sids, writers=8)
        ahead: list[str] = []
        backlog: list[int] = []
        try:
            await load.acked(50)
            holed = time.monotonic()
            proxy.blackhole()
            acked_before = rig.ledger.acked_total
            while time.monotonic() - holed < 6:
                ahead += await flushed_ahead(rig)
                backlog.append((await outbox.backlog(rig.redis, rig.keys)).entries)
                await asyncio.sleep(0.25)
            acked_during = rig.ledger.acked_total - acked_before
            normal = time.monotonic()
            proxy.delay(up=0.1, down=0.1)
            await load.acked(50)
        finally:
            await load.finish()
        drained_at = time.monotonic()
        await rig.quiescent()
        drained = time.monotonic() - normal
        proxy.normal()
        lost = await settle(rig)
    holed_api = during(rig.ledger.samples, holed, normal)
    record(
        "worker_postgres_link",
        acked_while_blackholed=acked_during,
        api_p50_ms=ms([s.elapsed for s in holed_api], 0.5),
        api_p99_ms=ms([s.elapsed for s in holed_api], 0.99),
        backlog_max=max(backlog),
        flushed_ahead_of_postgres=len(ahead),
        drained_s_after_link_back=round(drained, 2),
        drained_s_after_load_stop=round(time.monotonic() - drained_at, 2),
        acked_lost=lost,
        worker_alive=worker.alive,
        **await outcomes(rig),
    )
    assert not ahead, ahead[:5]
    assert acked_during > 0 and {s.status for s in holed_api} == {200}
    assert max(backlog) > 0
    assert worker.alive, rig.logs()
    assert lost == 0


async def test_cold_reads_through_a_slow_then_black_holed_postgres_link(
    make_rig: Any, aiohttp_client: Any
) -> None:
    """Sessions that left Redis are read from Postgres through the proxy (PG_COMMAND_TIMEOUT=1), 24
    reads at once on a pool of 10: +200 ms each way gives correct, slower answers; past the timeout
    and black-holed, a 503 within PG_COMMAND_TIMEOUT plus the pool's acquire timeout, however many
    wait for a connection, never a 500, never another session's data; hot sessions answer 200
    meanwhile; back to normal, cold reads answer at once."""
    from session_svc.storage.resources import PG_CONNECT_TIMEOUT_S

    rig: Rig = await make_rig((), pg_command_timeout=1.0)
    cold = [await rig.create(f"cold{i}") for i in range(4)]
    for i, sid in enumerate(cold):
        for n in range(i + 1):  # each session its own message count, to tell them apart
            assert await rig.append(sid, f"{sid} {n}") == 200
    rig.start_worker("w1")
    await rig.quiescent()
    assert await sweep(rig.client.app[BACKEND], 0) == len(cold)
    hot = await rig.create("hot")
    bound = rig.settings.pg_command_timeout + PG_CONNECT_TIMEOUT_S + 1.0  # unbounded queueing: 9 s
    wrong: list[str] = []

    async def get(sid: str) -> tuple[int, dict[str, Any]]:
        resp = await rig.client.get(f"/api/v1/sessions/{sid}", params={"user_id": rig.ledger.users[sid]})
        return resp.status, await resp.json()

    async def read(sid: str) -> tuple[int, float, dict[str, Any]]:
        t0 = time.monotonic()
        try:  # a read left hanging fails here rather than hanging the test
            status, body = await asyncio.wait_for(get(sid), bound + 10)
        except TimeoutError:
            status, body = 0, {}
        if status == 200 and (body["session_id"], body["message_count"]) != (sid, cold.index(sid) + 1):
            wrong.append(f"{sid}: {body}")
        return status, time.monotonic() - t0, body

    async def read_all() -> list[tuple[int, float, dict[str, Any]]]:
        # Six reads of each at once: 24, more than DB_POOL_SIZE (10), so some wait for a connection.
        return list(await asyncio.gather(*(read(sid) for sid in cold * 6)))

    with proxy_to(rig.pg_server.port) as proxy:
        await use_client(rig, aiohttp_client,
                         database_url=f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres")  # fmt: skip
        baseline = await read_all()
        proxy.delay(up=0.2, down=0.2)
        slow = await read_all()
        proxy.delay(up=0.8, down=0.8)
        too_slow = await read_all()
        proxy.blackhole()
        holed = await read_all()
        hot_resp = await rig.client.get(f"/api/v1/sessions/{hot}", params={"user_id": rig.ledger.users[hot]})
        back = time.monotonic()
        proxy.normal()
        recovered = await eventually(lambda: _all_ok(read_all), "cold reads answered again", within=20)
        recovery = time.monotonic() - back
    record(
        "cold_read_postgres_link",
        baseline_p50_ms=ms([t for _, t, _ in baseline], 0.5),
        slow_statuses=sorted({s for s, _, _ in slow}),
        slow_p50_ms=ms([t for _, t, _ in slow], 0.5),
        too_slow_statuses=sorted({s for s, _, _ in too_slow}),
        too_slow_max_ms=ms([t for _, t, _ in too_slow], 1.0),
        blackhole_statuses=sorted({s for s, _, _ in holed}),
        blackhole_p50_ms=ms([t for _, t, _ in holed], 0.5),
        blackhole_max_ms=ms([t for _, t, _ in holed], 1.0),
        recovery_s=round(recovery, 3),
        wrong_answers=len(wrong),
    )
    assert {s for s, _, _ in baseline + slow} == {200}
    assert min(t for _, t, _ in slow) >= 0.4
    for status, took, body in too_slow + holed:
        assert status in (200, 503) and took <= bound, (status, took, body)
        if status == 503:
            assert body == {"detail": PG_DOWN_DETAIL}
    assert {s for s, _, _ in holed} == {503}
    assert hot_resp.status == 200
    assert recovered
    assert not wrong, wrong[:3]


async def _all_ok(read_all: Any) -> bool:
    return all(status == 200 for status, _, _ in await read_all())


# 4. The API process killed with SIGKILL under load -----------------------------------------------------


@dataclasses.dataclass
class HttpLoad:
    """Writers appending over real HTTP to a real API process; answers filed in the rig's ledger by what
    they promise. A connection that fails before the request could be sent (refused) wrote nothing;
    one that breaks after (the process died with the request in hand) is an unknown outcome."""

    rig: Rig
    url: str
    sids: list[str]
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    n: int = 0

    async def writer(self, w: int, session: aiohttp.ClientSession) -> None:
        ledger = self.rig.ledger
        while not self.stop.is_set():
            self.n += 1
            sid = self.sids[(w + self.n) % len(self.sids)]
            content = f"w{w} n{self.n} {uuid.uuid4().hex}"
            body = {"role": "user", "content": content, "tokens_used": self.n % 7, "cost_usd": 0.000125}
            t0 = time.monotonic()
            try:
                async with session.post(
                    f"{self.url}/api/v1/sessions/{sid}/messages",
                    params={"user_id": ledger.users[sid]},
                    json=body,
                ) as resp:
                    status, answer = resp.status, await resp.json()
            except aiohttp.ClientConnectorError:
                status, answer = 0, {"detail": REDIS_DOWN_DETAIL}  # refused: nothing was sent
                await asyncio.sleep(0.02)
            except (aiohttp.ClientError, TimeoutError):
                status, answer = -1, {"detail": REDIS_UNKNOWN_DETAIL}  # the process died mid-request
            ledger.samples.append(Sample(t0, time.monotonic() - t0, status))
            detail = answer.get("detail") if status != 200 else None
            if status == 200:
                if answer["content"] != content:
                    ledger.wrong.append(f"asked {content!r}, answered {answer}")
                ledger.acked[sid].append(answer)
            elif detail == REDIS_UNKNOWN_DETAIL:
                ledger.unknown.add(content)
            elif detail in (REDIS_DOWN_DETAIL, REDIS_OOM_DETAIL):
                ledger.refused.add(content)
            else:
                ledger.wrong.append(f"{status} {answer}")

    async def run(self, writers: int) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self.writer(w, session) for w in range(writers)))


@contextlib.contextmanager
def api_process(rig: Rig, port: int, name: str) -> Iterator[servers.ApiProcess]:
    env = support.api_settings(rig.settings.redis_url, rig.settings.database_url, rig.settings.db_schema,
                               rig.settings.key_prefix, port)  # fmt: skip
    api = servers.start_api(env, rig.log_dir, name)
    try:
        yield api
    finally:
        api.stop()


async def test_api_process_sigkilled_under_load_and_restarted(make_rig: Any) -> None:
    """``python -m session_svc`` killed with SIGKILL twice while 16 writers append over HTTP, and
    started again on the same port: afterwards every acknowledged append is in Postgres exactly once,
    at the sequence its answer gave, nothing is doubled, the counters equal what is stored."""
    rig: Rig = await make_rig(())
    sids = [await rig.create(f"s{i}") for i in range(8)]
    rig.start_worker("w1")
    port = servers.free_port()
    load = HttpLoad(rig, f"http://127.0.0.1:{port}", sids)
    downtimes: list[float] = []
    startups: list[float] = []  # of those, the new process starting until it answers /health
    in_flight_lost: list[int] = []
    with contextlib.ExitStack() as stack:
        api = stack.enter_context(api_process(rig, port, "api-1"))
        await asyncio.to_thread(api.wait_healthy)
        running = asyncio.create_task(load.run(16))
        try:
            for round_ in range(2):
                await eventually(lambda n=rig.ledger.acked_total: _more(rig, n + 150), "appends acknowledged")
                unknown_before = len(rig.ledger.unknown)
                api.proc.kill()  # SIGKILL: no shutdown hook, requests in hand die with it
                killed = time.monotonic()
                await asyncio.to_thread(api.proc.wait, 10)
                restarted = time.monotonic()
                api = stack.enter_context(api_process(rig, port, f"api-{round_ + 2}"))
                await asyncio.to_thread(api.wait_healthy)
                startups.append(time.monotonic() - restarted)
                await eventually(
                    lambda t=killed: _ok_after(rig, t), "an append acknowledged after the restart"
                )
                downtimes.append(first_ok_after(rig.ledger.samples, killed))
                in_flight_lost.append(len(rig.ledger.unknown) - unknown_before)
            await eventually(lambda n=rig.ledger.acked_total: _more(rig, n + 100), "appends acknowledged")
        finally:
            load.stop.set()
            await running
    lost = await settle(rig)
    record(
        "api_sigkill",
        kills=len(downtimes),
        kill_to_next_200_s=[round(d, 2) for d in downtimes],
        restart_to_healthy_s=[round(d, 2) for d in startups],
        p99_ms_other_requests=ms([s.elapsed for s in rig.ledger.samples if s.status == 200], 0.99),
        requests_cut_per_kill=in_flight_lost,
        acked_lost=lost,
        **await outcomes(rig),
    )
    assert not rig.ledger.wrong, rig.ledger.wrong[:5]
    assert lost == 0


async def _more(rig: Rig, target: int) -> bool:
    return rig.ledger.acked_total >= target


async def _ok_after(rig: Rig, t: float) -> bool:
    return any(s.status == 200 and s.start >= t for s in rig.ledger.samples)
