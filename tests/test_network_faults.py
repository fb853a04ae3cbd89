"""Faults on the links and of the API process, under load, each on a private redis-server and a private
PostgreSQL: Redis connections killed in the middle of script calls (``CLIENT KILL``), Redis and Postgres
behind a TCP proxy (``tests/proxy.py``) that slows, black-holes or cuts the link, and the API process
killed with SIGKILL and started again.

Every append carries content no other request sends, so each answer can be checked against what is
stored, in Redis and in Postgres, once the worker has drained (``Rig.settle``: the model of
acknowledged writes, ``tests/acked.py``): a 200 promises its message is stored once, at the
``sequence`` that answer gave; a 503 "nothing was written" promises it is absent; "outcome unknown"
may be either; the Redis stream and Postgres agree, no content is stored twice, and every counter a
user sees equals what is stored. A fault meant to meet a request in flight is made to: Redis holds one
(``CLIENT PAUSE WRITE``) or the proxy does, and only then is the connection killed, cut or the process
killed, so every such test asserts that each fault produced an "outcome unknown" answer.

Figures (latency during the fault, recovery time, acknowledged writes lost) are measured, never
asserted beyond the bounds the timeouts promise: each test prints them and writes them to
``var/reliability/<name>.json``; ``docs/reliability.md`` is the table made from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import redis as redis_sync
from redis.exceptions import TimeoutError as RedisTimeoutError

from session_svc.http.appkeys import BACKEND
from session_svc.settings import Settings
from session_svc.storage import outbox
from session_svc.storage.coalesce import Coalescer
from session_svc.storage.redis_client import CircuitOpen, redis_client
from tests import acked, pg_rows, servers
from tests.acked import during, first_ok_after, ms, within
from tests.proxy import proxy_to
from tests.rig import MakeRig, Rig
from tests.support import ROOT, eventually
from workers.expiry import sweep

pytestmark = pytest.mark.fault

API_NAME = "api-under-test"  # CLIENT SETNAME of the API's Redis connections, to kill only those
PG_DOWN_DETAIL = "Session store unavailable (PostgreSQL)"
FIGURES = ROOT / "var" / "reliability"


# Figures ---------------------------------------------------------------------------------------------


def record(name: str, **figures: Any) -> None:
    """Print the figures of a fault and keep them in ``var/reliability/<name>.json``."""
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    FIGURES.mkdir(parents=True, exist_ok=True)
    doc = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), **figures}
    (FIGURES / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")


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

KILL_ROUNDS = 6


def held_api_connections(rig: Rig) -> list[dict[str, Any]]:
    """The API's connections that Redis holds a script of, unrun (``CLIENT PAUSE WRITE``: flag ``b``)."""
    with rig.redis_server.client() as r:
        return [
            c for c in r.client_list()
            if c.get("name") == API_NAME and "b" in c["flags"] and c["cmd"].startswith("eval")
        ]  # fmt: skip


async def test_api_connections_killed_repeatedly_under_coalesced_appends(
    make_rig: MakeRig, aiohttp_client: Any
) -> None:
    """Six times while 16 writers append (coalesced: one pipeline of many scripts per connection),
    Redis holds the API's writes (``CLIENT PAUSE WRITE``) until it has a script of the API's in hand,
    then every connection of the API is killed and Redis goes on. So each kill cuts at least one
    request in flight, and that request's answer is "outcome unknown" (the kill comes before the
    script runs; the API cannot know that): never a 200, never "nothing was written". Every other
    answer is a 200 whose message is stored at the sequence it gave, or an honest 503; nothing is
    half-written; the service recovers without a restart after each kill."""
    # A held script must meet the kill, not the API's own socket timeout.
    rig: Rig = await make_rig((), redis_socket_timeout=10.0)
    await rig.use_app(aiohttp_client, redis_url=f"{rig.redis_server.url}?client_name={API_NAME}")
    assert rig.settings.redis_coalesce
    sids = [await rig.create(f"s{i}") for i in range(8)]
    rig.start_worker("w1")
    load = rig.load(sids, writers=16)
    admin = rig.redis_server.client()
    held_per_kill: list[int] = []
    queued_bytes: list[int] = []  # the rest of each held pipeline, waiting behind its first script
    unknown_per_kill: list[int] = []
    kills = 0
    try:
        await load.acked(100)
        start = time.monotonic()
        for _ in range(KILL_ROUNDS):
            unknown_before = len(rig.model.unknown)
            await asyncio.to_thread(admin.execute_command, "CLIENT", "PAUSE", 30_000, "WRITE")
            try:
                held = await eventually(
                    lambda: asyncio.to_thread(held_api_connections, rig), "a script of the API held", 20
                )
                kills += await asyncio.to_thread(kill_api_connections, rig)
            finally:
                await asyncio.to_thread(admin.execute_command, "CLIENT", "UNPAUSE")
            held_per_kill.append(len(held))
            queued_bytes.append(sum(int(c["qbuf"]) for c in held))

            async def answered_unknown(before: int = unknown_before) -> bool:
                return len(rig.model.unknown) > before

            await eventually(answered_unknown, "the held request answered 'outcome unknown'", within=15)
            unknown_per_kill.append(len(rig.model.unknown) - unknown_before)
            await load.acked(20)  # writes acknowledged again before the next kill
        end = time.monotonic()
        await load.acked(100)
    finally:
        admin.close()
        await load.finish()
    hit = during(rig.model.samples, start, end)
    figures = await rig.settle()
    record(
        "client_kill",
        kill_rounds=KILL_ROUNDS,
        connections_killed=kills,
        held_connections_per_kill=held_per_kill,
        queued_bytes_behind_held_script=queued_bytes,
        unknown_answers_per_kill=unknown_per_kill,
        requests_during=len(hit),
        p50_ms=ms([s.elapsed for s in hit], 0.5),
        p99_ms=ms([s.elapsed for s in hit], 0.99),
        answered_200_during=sum(s.status == 200 for s in hit),
        recovery_s=round(first_ok_after(rig.model.samples, end), 3),
        **figures,
    )
    assert kills >= KILL_ROUNDS and min(held_per_kill) >= 1
    assert min(unknown_per_kill) >= 1  # every kill cut a request, and it said "unknown"


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


async def test_api_connections_killed_while_a_long_script_runs(
    make_rig: MakeRig, aiohttp_client: Any
) -> None:
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
    await rig.use_app(aiohttp_client, redis_url=f"{rig.redis_server.url}?client_name={API_NAME}")
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
    figures = await rig.settle()
    record(
        "client_kill_long_script",
        connections_killed=killed,
        answers={str(s): statuses.count(s) for s in sorted(set(statuses))},
        **figures,
    )
    assert killed >= 1
    # Which of the queued scripts the kill overtakes varies from run to run (all of them, some, or none
    # when Redis had already answered): the figures say what happened, the checks hold either way.
    assert set(statuses) <= {200, 503}
    assert after == [200] * 4  # no restart needed


# 2. Redis behind a slow, then black-holed link ---------------------------------------------------------


async def test_redis_link_slow_then_too_slow_then_black_holed(make_rig: MakeRig, aiohttp_client: Any) -> None:
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
        await rig.use_app(aiohttp_client, redis_url=proxy.url("redis://127.0.0.1:{port}/0"))
        sids = [await rig.create(f"s{i}") for i in range(6)]
        rig.start_worker("w1")
        load = rig.load(sids, writers=8)
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
        outcomes = await rig.settle()
    samples = rig.model.samples
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
           **outcomes)  # fmt: skip
    assert {s.status for s in slow} == {200} and min(s.elapsed for s in slow) >= 0.2
    assert {s.status for s in too_slow} | {s.status for s in holed} == {503}
    assert max(s.elapsed for s in too_slow + holed) <= bound
    # The breaker: after the first round of timeouts, no request waits for one.
    assert statistics.median(s.elapsed for s in too_slow) < 0.05
    assert statistics.median(s.elapsed for s in holed) < 0.05
    assert health["status"] == 503 and any(r.startswith("Redis unreachable") for r in health["reasons"])
    assert rig.model.unknown  # sent and not answered in time: the answer did not pretend otherwise
    assert recovery < 5


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


async def test_redis_link_cut_repeatedly(make_rig: MakeRig, aiohttp_client: Any) -> None:
    """Every connection through the proxy reset five times, each time while the link holds a command of
    the API's (``delay(up=...)`` until one is held, then ``cut()``), and new ones refused for 0.3 s: the
    same promises as CLIENT KILL, from the network's side. Each cut meets a request in flight, whose
    answer is "outcome unknown" (it was sent; the API cannot know it never arrived)."""
    rig: Rig = await make_rig(())
    unknown_per_cut: list[int] = []
    with proxy_to(rig.redis_server.port) as proxy:
        await rig.use_app(aiohttp_client, redis_url=proxy.url("redis://127.0.0.1:{port}/0"))
        sids = [await rig.create(f"s{i}") for i in range(6)]
        rig.start_worker("w1")
        load = rig.load(sids, writers=8)
        try:
            await load.acked(50)
            start = time.monotonic()
            for _ in range(5):
                unknown_before = len(rig.model.unknown)
                proxy.delay(up=30.0)  # held until the cut, which comes as soon as one is

                async def held() -> bool:
                    return proxy.held_up > 0

                await eventually(held, "a command of the API held in the link", within=10, interval=0.001)
                proxy.cut()
                await asyncio.sleep(0.3)
                proxy.normal()

                async def answered_unknown(before: int = unknown_before) -> bool:
                    return len(rig.model.unknown) > before

                await eventually(answered_unknown, "the cut request answered 'outcome unknown'", within=10)
                unknown_per_cut.append(len(rig.model.unknown) - unknown_before)
                await load.acked(10)
            end = time.monotonic()
            await load.acked(50)
        finally:
            await load.finish()
        figures = await rig.settle()
    hit = during(rig.model.samples, start, end)
    record(
        "redis_link_cut",
        unknown_answers_per_cut=unknown_per_cut,
        requests_during=len(hit),
        ok_during=sum(s.status == 200 for s in hit),
        p50_ms=ms([s.elapsed for s in hit], 0.5),
        p99_ms=ms([s.elapsed for s in hit], 0.99),
        recovery_s=round(first_ok_after(rig.model.samples, end), 3),
        **figures,
    )
    assert min(unknown_per_cut) >= 1  # every cut met a request in flight, and it said "unknown"


# 3. Postgres behind a slow or black-holed link ---------------------------------------------------------


async def flushed_ahead(rig: Rig) -> list[str]:
    """Sessions whose Redis record claims more is in Postgres (``fv``, set with the XACK after COMMIT)
    than Postgres holds: there must never be one."""
    rows = await pg_rows.pg_sessions(rig.pg, rig.settings.db_schema, list(rig.model.users))
    versions = {sid: row["version"] for sid, row in rows.items()}
    ahead = []
    for sid, uid in rig.model.users.items():
        fv = await rig.redis.hget(rig.keys.for_user(uid).session(sid), "fv")
        if fv is not None and int(fv) > versions.get(sid, 0):
            ahead.append(f"{sid}: fv {fv} > {versions.get(sid)}")
    return ahead


async def test_worker_postgres_link_black_holed_then_slow(make_rig: MakeRig, tmp_path: Any) -> None:
    """The worker reaches Postgres through the proxy (PG_COMMAND_TIMEOUT=2), 8 writers append to the API
    (straight to Redis) throughout. Black-holed for 6 s: writes are still acknowledged, nothing is
    marked flushed that Postgres does not hold (the outbox acknowledges after COMMIT only), the backlog
    grows; then +100 ms each way, then normal: everything is flushed, nothing lost or doubled."""
    rig: Rig = await make_rig((), pg_command_timeout=2.0)
    sids = [await rig.create(f"s{i}") for i in range(6)]
    with proxy_to(rig.pg_server.port) as proxy:
        worker = rig.start_worker("w1", database_url=f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres")
        await rig.quiescent()  # the sessions are in Postgres: the worker works through the proxy
        load = rig.load(sids, writers=8)
        ahead: list[str] = []
        backlog: list[int] = []
        try:
            await load.acked(50)
            holed = time.monotonic()
            proxy.blackhole()
            acked_before = rig.model.acked_total
            while time.monotonic() - holed < 6:
                ahead += await flushed_ahead(rig)
                backlog.append((await outbox.backlog(rig.redis, rig.keys)).entries)
                await asyncio.sleep(0.25)
            acked_during = rig.model.acked_total - acked_before
            normal = time.monotonic()
            proxy.delay(up=0.1, down=0.1)
            await load.acked(50)
        finally:
            await load.finish()
        drained_at = time.monotonic()
        await rig.quiescent()
        drained = time.monotonic() - normal
        proxy.normal()
        figures = await rig.settle()
    holed_api = during(rig.model.samples, holed, normal)
    record(
        "worker_postgres_link",
        acked_while_blackholed=acked_during,
        api_p50_ms=ms([s.elapsed for s in holed_api], 0.5),
        api_p99_ms=ms([s.elapsed for s in holed_api], 0.99),
        backlog_max=max(backlog),
        flushed_ahead_of_postgres=len(ahead),
        drained_s_after_link_back=round(drained, 2),
        drained_s_after_load_stop=round(time.monotonic() - drained_at, 2),
        worker_alive=worker.alive,
        **figures,
    )
    assert not ahead, ahead[:5]
    assert acked_during > 0 and {s.status for s in holed_api} == {200}
    assert max(backlog) > 0
    assert worker.alive, rig.logs()


async def test_cold_reads_through_a_slow_then_black_holed_postgres_link(
    make_rig: MakeRig, aiohttp_client: Any
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
        resp = await rig.client.get(f"/api/v1/sessions/{sid}", params={"user_id": rig.model.users[sid]})
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
        through = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
        await rig.use_app(aiohttp_client, database_url=through)
        baseline = await read_all()
        proxy.delay(up=0.2, down=0.2)
        slow = await read_all()
        proxy.delay(up=0.8, down=0.8)
        too_slow = await read_all()
        proxy.blackhole()
        holed = await read_all()
        hot_resp = await rig.client.get(f"/api/v1/sessions/{hot}", params={"user_id": rig.model.users[hot]})
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


async def test_api_process_sigkilled_under_load_and_restarted(make_rig: MakeRig) -> None:
    """``python -m session_svc`` killed with SIGKILL twice while 16 writers append over real HTTP, each
    time while Redis holds at least one of its appends (``CLIENT PAUSE WRITE``), and started again on
    the same port: the requests in hand die with the process and count as "outcome unknown" (a
    connection refused before sending wrote nothing); afterwards every acknowledged append is in
    Postgres exactly once, at the sequence its answer gave, nothing is doubled, the counters equal what
    is stored."""
    rig: Rig = await make_rig(())
    sids = [await rig.create(f"s{i}") for i in range(8)]
    rig.start_worker("w1")
    port = servers.free_port()
    named = f"{rig.settings.redis_url}?client_name={API_NAME}"
    downtimes: list[float] = []
    startups: list[float] = []  # of those, the new process starting until it answers /health
    in_flight_lost: list[int] = []
    admin = rig.redis_server.client()
    timeout = aiohttp.ClientTimeout(total=10)
    with contextlib.ExitStack() as stack:
        api = stack.enter_context(rig.api_process(port, "api-1", REDIS_URL=named))
        await asyncio.to_thread(api.wait_healthy)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}", timeout=timeout) as http:
            load = acked.Load(http, rig.model, sids, writers=16, backoff=0.02)
            try:
                for round_ in range(2):
                    await load.acked(150)
                    unknown_before = len(rig.model.unknown)
                    await asyncio.to_thread(admin.execute_command, "CLIENT", "PAUSE", 30_000, "WRITE")
                    try:
                        await eventually(
                            lambda: asyncio.to_thread(held_api_connections, rig), "an append held", 20
                        )
                        api.proc.kill()  # SIGKILL: no shutdown hook, requests in hand die with it
                        killed = time.monotonic()
                        await asyncio.to_thread(api.proc.wait, 10)
                    finally:
                        await asyncio.to_thread(admin.execute_command, "CLIENT", "UNPAUSE")
                    restarted = time.monotonic()
                    api = stack.enter_context(rig.api_process(port, f"api-{round_ + 2}", REDIS_URL=named))
                    await asyncio.to_thread(api.wait_healthy)
                    startups.append(time.monotonic() - restarted)
                    await eventually(
                        lambda t=killed: _ok_after(rig, t), "an append acknowledged after the restart"
                    )
                    downtimes.append(first_ok_after(rig.model.samples, killed))
                    in_flight_lost.append(len(rig.model.unknown) - unknown_before)
                await load.acked(100)
            finally:
                admin.close()
                await load.finish()
    figures = await rig.settle()
    record(
        "api_sigkill",
        kills=len(downtimes),
        kill_to_next_200_s=[round(d, 2) for d in downtimes],
        restart_to_healthy_s=[round(d, 2) for d in startups],
        p99_ms_other_requests=ms([s.elapsed for s in rig.model.samples if s.status == 200], 0.99),
        requests_cut_per_kill=in_flight_lost,
        **figures,
    )
    assert min(in_flight_lost) >= 1  # each kill cut a request in hand, and it counted as unknown


async def _ok_after(rig: Rig, t: float) -> bool:
    return any(s.status == 200 and s.start >= t for s in rig.model.samples)
