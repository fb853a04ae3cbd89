"""SIGTERM stops each process without losing what it had in hand.

- The API stops accepting connections at once, lets the requests in flight finish (up to
  SHUTDOWN_TIMEOUT), then closes Redis and Postgres and exits 0.
- The worker stops reading the outbox, lets the batch in hand commit and be acknowledged (up to
  SHUTDOWN_TIMEOUT); what it could not finish it releases, so that another worker takes it over at
  once instead of after FLUSH_CLAIM_IDLE_MS.

Both run as the real processes; Redis is slowed down by pausing a private redis-server (SIGSTOP), and
Postgres by holding a lock on the row the worker has to update.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from session_svc.record.keys import Keys
from session_svc.settings import Settings
from session_svc.storage import outbox
from tests import outbox_drain, pg_rows, servers, support
from tests.helpers import SESSIONS, add_message, make_session, new_user, session_url
from tests.support import eventually
from workers.flush import Flusher

pytestmark = pytest.mark.fault


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# Larger than anything the API sends Redis by itself (a ping, a heartbeat read): its command is in the
# stopped Redis's socket once that many bytes wait there.
PAD = "x" * 8_192


async def _reached(redis: servers.RedisServer) -> bool:
    return await asyncio.to_thread(servers.bytes_waiting, redis.port) >= len(PAD)


def _api(settings: Settings, redis_url: str, tmp_path: Path, **extra: str) -> servers.ApiProcess:
    port = servers.free_port()
    s = settings
    env = support.api_settings(redis_url, s.database_url, s.db_schema, s.key_prefix, port)
    # Redis is paused for up to 3 s below: the request must wait for it, not time out.
    env.update(REDIS_SOCKET_TIMEOUT="5", **extra)
    api = servers.start_api(env, tmp_path)
    api.wait_healthy()
    return api


async def test_sigterm_lets_the_request_in_flight_finish_and_refuses_new_connections(
    settings: Settings, private_redis: Any, tmp_path: Path
) -> None:
    redis = private_redis()
    api = _api(settings, redis.url, tmp_path, SHUTDOWN_TIMEOUT="4")
    try:
        async with aiohttp.ClientSession(api.url) as http:
            user = support.new_name("user-")
            async with http.post(SESSIONS, json={"user_id": user}) as resp:
                assert resp.status == 200, await resp.text()
                sid = (await resp.json())["session_id"]
            redis.pause()
            try:
                in_flight = asyncio.create_task(
                    http.post(
                        session_url(sid, "/messages"),
                        params={"user_id": user},
                        json={"role": "user", "content": "sent just before SIGTERM " + PAD},
                    )
                )
                await eventually(lambda: _reached(redis), "the request in the API, waiting for Redis")
                assert not in_flight.done()
                t0 = time.monotonic()
                api.proc.send_signal(signal.SIGTERM)
                await eventually(lambda: _refused(api.port), "new connections refused", within=5)
                refused_after = time.monotonic() - t0
                # aiohttp splits its wait in two halves; the request has all of SHUTDOWN_TIMEOUT.
                await asyncio.sleep(2.5 - refused_after)
                assert not in_flight.done() and api.proc.poll() is None, api.tail()
            finally:
                redis.resume()
            async with await in_flight as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["sequence"] == 1
        status = await asyncio.to_thread(api.proc.wait, 10)
        took = time.monotonic() - t0
    finally:
        redis.resume()
        api.stop()
    assert status == 0, api.tail()
    print(f"\nnew connections refused {refused_after:.3f}s after SIGTERM; exited 0 after {took:.2f}s")


async def test_a_request_that_outlives_the_shutdown_timeout_is_cut_and_the_api_still_exits(
    settings: Settings, private_redis: Any, tmp_path: Path
) -> None:
    """SHUTDOWN_TIMEOUT bounds the wait: Redis stays paused past it, the API exits 0 anyway."""
    redis = private_redis()
    api = _api(settings, redis.url, tmp_path, SHUTDOWN_TIMEOUT="1")
    try:
        async with aiohttp.ClientSession(api.url) as http:
            async with http.post(SESSIONS, json={"user_id": support.new_name("user-")}) as resp:
                assert resp.status == 200, await resp.text()  # a pooled connection to Redis, in use
            redis.pause()
            body = {"user_id": support.new_name("user-"), "metadata": {"pad": PAD}}
            stuck = asyncio.create_task(http.post(SESSIONS, json=body))  # metadata: at most 16 KiB
            await eventually(lambda: _reached(redis), "the request in the API, waiting for Redis")
            t0 = time.monotonic()
            api.proc.send_signal(signal.SIGTERM)
            status = await asyncio.to_thread(api.proc.wait, 10)
            took = time.monotonic() - t0
            with pytest.raises(aiohttp.ClientError):
                await stuck
    finally:
        redis.resume()
        api.stop()
    assert status == 0, api.tail()
    assert took < 1.8, took
    print(f"\nexited 0 {took:.2f}s after SIGTERM with a request still waiting (SHUTDOWN_TIMEOUT=1)")


# The worker -------------------------------------------------------------------------------------------


@dataclass
class Blocked:
    """A session whose row in Postgres is locked (SELECT ... FOR UPDATE in an open transaction), and
    the messages acknowledged for it since: the worker's batch waits on the lock."""

    sid: str
    user: str
    sent: list[dict[str, Any]]
    lock: asyncpg.Connection


async def _block_a_batch(client: Any, flusher: Flusher, settings: Settings, n: int) -> Blocked:
    """A session flushed once (its row exists), its row locked, then ``n`` messages acknowledged: the
    next worker reads them in one batch and waits on the lock in its first statement."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    sent = [await add_message(client, sid, user, content="before the lock")]
    await outbox_drain.drain(flusher)  # in-process: the row exists, nothing is pending
    lock = await asyncpg.connect(settings.database_url)
    tx = lock.transaction()
    await tx.start()
    await lock.execute(f'SELECT 1 FROM "{settings.db_schema}".sessions WHERE session_id = $1 FOR UPDATE', sid)
    sent += [await add_message(client, sid, user, content=f"in the batch {i}") for i in range(n)]
    return Blocked(sid, user, sent, lock)


async def _waiting_on_the_lock(pg: Any, lock: asyncpg.Connection) -> bool:
    blocker = lock.get_server_pid()
    rows = await pg.fetch("SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", blocker)
    return bool(rows)


async def _nothing_left(redis: Redis, keys: Keys) -> bool:
    pending = await outbox_drain.pending_per_consumer(redis, keys)
    return not any(pending.values()) and (await outbox.backlog(redis, keys)).entries == 0


async def test_sigterm_mid_batch_lets_the_batch_commit_and_be_acknowledged(
    client: Any, flusher: Flusher, redis: Redis, keys: Keys, pg: Any, settings: Settings, tmp_path: Path
) -> None:
    blocked = await _block_a_batch(client, flusher, settings, 20)
    worker = servers.start_worker(settings, f"{settings.key_prefix}-w", tmp_path)
    try:
        await eventually(lambda: _waiting_on_the_lock(pg, blocked.lock), "the batch waiting on the lock")
        t0 = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert worker.alive, worker.tail()  # still finishing the batch in hand
        await blocked.lock.execute("ROLLBACK")
        status = await asyncio.to_thread(worker.proc.wait, 20)
        took = time.monotonic() - t0
    finally:
        await blocked.lock.close()
        worker.kill()
    assert status == 0, worker.tail()
    assert await _nothing_left(redis, keys), await outbox_drain.pending_per_consumer(redis, keys)
    written = await pg_rows.pg_messages(pg, settings.db_schema, blocked.sid)
    assert written == [pg_rows.api_message(m) for m in blocked.sent]
    print(f"\nworker exited 0 {took:.2f}s after SIGTERM (1 s of it waiting on the lock), batch committed")


async def test_a_batch_that_cannot_commit_in_time_is_released_to_the_next_worker_at_once(
    client: Any, flusher: Flusher, redis: Redis, keys: Keys, pg: Any, settings: Settings, tmp_path: Path
) -> None:
    """Postgres keeps the batch waiting past SHUTDOWN_TIMEOUT: the worker exits anyway, leaving the
    entries pending but released, so that a worker started afterwards under another name (a new pid)
    takes them over at once, not after FLUSH_CLAIM_IDLE_MS (30 s)."""
    assert settings.flush_claim_idle_ms == 30_000
    blocked = await _block_a_batch(client, flusher, settings, 20)
    first = servers.start_worker(
        dataclasses.replace(settings, shutdown_timeout=1.0), f"{settings.key_prefix}-first", tmp_path
    )
    second: servers.WorkerProcess | None = None
    try:
        await eventually(lambda: _waiting_on_the_lock(pg, blocked.lock), "the batch waiting on the lock")
        t0 = time.monotonic()
        took = await asyncio.to_thread(first.stop, 10)  # SIGTERM: exit 0 within 10 s, or fail
        assert took < 3, took  # SHUTDOWN_TIMEOUT (1 s), then the release and the exit
        pending = await outbox_drain.pending_per_consumer(redis, keys)
        assert pending.get(first.name) == 20, pending  # not written: still pending
        await blocked.lock.execute("ROLLBACK")
        second = servers.start_worker(settings, f"{settings.key_prefix}-second", tmp_path)
        t1 = time.monotonic()
        await eventually(lambda: _nothing_left(redis, keys), "the batch taken over", within=10)
        takeover = time.monotonic() - t1
    finally:
        await blocked.lock.close()
        first.kill()
        if second is not None:
            await asyncio.to_thread(servers.stop_workers, [second])
    written = await pg_rows.pg_messages(pg, settings.db_schema, blocked.sid)
    assert written == [pg_rows.api_message(m) for m in blocked.sent]
    print(
        f"\nfirst worker exited 0 {took:.2f}s after SIGTERM (SHUTDOWN_TIMEOUT=1) with its batch unwritten;"
        f" a new worker had written it {takeover:.2f}s after its start ({time.monotonic() - t0:.2f}s in all)"
    )


async def test_a_worker_stopped_while_postgres_hangs_exits_and_releases_its_batch(
    pg_server: servers.PgServer,
    make_client: Any,
    make_settings: Any,
    redis: Redis,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """Postgres stops answering altogether (every process of a private cluster SIGSTOPped) while the
    worker waits in a statement: SIGTERM still ends it within SHUTDOWN_TIMEOUT and a few seconds, and
    once Postgres is back, a new worker takes the batch over at once."""
    schema = await asyncio.to_thread(support.create_schema, pg_server.url)
    settings = make_settings(database_url=pg_server.url, db_schema=schema, shutdown_timeout=1.0)
    client = await make_client(database_url=pg_server.url, db_schema=schema)
    pool = await asyncpg.create_pool(pg_server.url, min_size=1, max_size=2)
    conn = await asyncpg.connect(pg_server.url)
    first = second = None
    try:
        blocked = await _block_a_batch(
            client, outbox_drain.make_flusher(redis, pool, keys, schema), settings, 20
        )
        first = servers.start_worker(settings, f"{settings.key_prefix}-first", tmp_path)
        await eventually(lambda: _waiting_on_the_lock(conn, blocked.lock), "the batch waiting on the lock")
        pg_server.pause()
        try:
            took = await asyncio.to_thread(first.stop, 15)  # SIGTERM: exit 0 within 15 s, or fail
        finally:
            pg_server.resume()
        # SHUTDOWN_TIMEOUT, then at most 2 s each to release, to let cancelled tasks go, to close the pool
        assert took < 1 + 3 * 2 + 1, took
        await blocked.lock.execute("ROLLBACK")
        await blocked.lock.close()
        second = servers.start_worker(settings, f"{settings.key_prefix}-second", tmp_path)
        t1 = time.monotonic()
        await eventually(lambda: _nothing_left(redis, keys), "the batch taken over", within=10)
        takeover = time.monotonic() - t1
        written = await pg_rows.pg_messages(conn, schema, blocked.sid)
        assert written == [pg_rows.api_message(m) for m in blocked.sent]
    finally:
        for w in (first, second):
            if w is not None and w.alive:
                w.kill()
        await conn.close()
        await pool.close()
    print(f"\nworker exited 0 {took:.2f}s after SIGTERM with Postgres hung; taken over in {takeover:.2f}s")
