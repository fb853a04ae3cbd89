"""Two API processes and two workers on one Redis Cluster: concurrent appends to the same sessions
through both APIs keep every session's sequence gap-free and the counters exact; the workers share the
outbox through the consumer group, and when one is SIGKILLed under load the other takes over what it
left pending (after FLUSH_CLAIM_IDLE_MS, at its next maintenance round) and Postgres gets everything."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.exceptions import ResponseError

from session_svc.settings import Settings
from session_svc.storage.outbox import GROUP
from session_svc.storage.resources import Backend, open_backend
from tests.servers import WorkerProcess, free_port, running_api, start_worker, stop_workers
from tests.support import api_settings, eventually

pytestmark = pytest.mark.cluster

SESSIONS = 4
PER_SESSION = 60
CONCURRENCY = 24


async def _pending(backend: Backend, consumer: str) -> int:
    total = 0
    for bucket in range(backend.keys.buckets):
        with contextlib.suppress(ResponseError):  # no stream (or group) in this bucket
            for c in await backend.redis.xinfo_consumers(backend.keys.outbox(bucket), GROUP):
                total += int(c["pending"]) if c["name"] == consumer else 0
    return total


async def test_two_apis_and_two_workers_on_one_cluster(
    cluster_settings: Settings, tmp_path: Path, pg: asyncpg.Connection
) -> None:
    settings = dataclasses.replace(cluster_settings, flush_claim_idle_ms=1000, flush_batch_size=20)
    env = {"REDIS_CLUSTER": "true", "ARQ_REDIS_URL": settings.arq_redis_url}
    apis = [
        api_settings(settings.redis_url, settings.database_url, settings.db_schema, settings.key_prefix,
                     free_port()) | env
        for _ in range(2)
    ]  # fmt: skip
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(running_api(a, tmp_path, f"api{i}")).url for i, a in enumerate(apis)]
        a, b = (start_worker(settings, f"{settings.key_prefix}-{n}", tmp_path) for n in "ab")
        stack.callback(stop_workers, [a, b])
        async with aiohttp.ClientSession() as http, open_backend(settings) as backend:

            async def call(method: str, i: int, path: str, **kw: Any) -> Any:
                async with http.request(method, urls[i % 2] + path, **kw) as resp:
                    body = await resp.json()
                    assert resp.status == 200, (resp.status, body)
                    return body

            users = [f"user-{settings.key_prefix}-{i}" for i in range(SESSIONS)]
            sids = [(await call("POST", i, "/api/v1/sessions", json={"user_id": u}))["session_id"]
                    for i, u in enumerate(users)]  # fmt: skip
            gate = asyncio.Semaphore(CONCURRENCY)
            done = 0

            async def append(n: int) -> None:
                nonlocal done
                s = n % SESSIONS
                body = {"role": "user", "content": f"m{n}", "tokens_used": 3, "cost_usd": 0.0001}
                async with gate:
                    path = f"/api/v1/sessions/{sids[s]}/messages"
                    await call("POST", n, path, params={"user_id": users[s]}, json=body)
                done += 1

            async def sessions_in_postgres() -> bool:
                q = "SELECT count(*) FROM sessions WHERE session_id = ANY($1::text[])"
                return bool(await pg.fetchval(q, sids) == SESSIONS)

            await eventually(sessions_in_postgres, "the sessions in Postgres")
            # A row lock on one session holds the batch that writes it: that worker is mid-batch.
            lock = pg.transaction()
            await lock.start()
            await pg.execute("SELECT 1 FROM sessions WHERE session_id = $1 FOR UPDATE", sids[0])
            load = [asyncio.create_task(append(n)) for n in range(SESSIONS * PER_SESSION)]
            try:
                stuck = await eventually(
                    lambda: _holding(backend, [a, b]), "a worker in the middle of a batch"
                )
                left = await _pending(backend, stuck.name)
                stuck.kill()
                killed_at = time.monotonic()
            finally:
                await lock.rollback()
            await asyncio.gather(*load)

            for i, (user, sid) in enumerate(zip(users, sids, strict=True)):
                page = await call("GET", i, f"/api/v1/sessions/{sid}/messages",
                                  params={"user_id": user, "page_size": "200"})  # fmt: skip
                assert [m["sequence"] for m in page["messages"]] == list(range(1, PER_SESSION + 1))
            stats = await call("GET", 0, "/api/v1/sessions/stats")
            n = SESSIONS * PER_SESSION
            assert (stats["total_messages"], stats["total_tokens"], stats["total_cost"]) == (n, 3 * n, 0.024)

            async def all_in_postgres() -> bool:
                rows = await pg.fetch(
                    "SELECT message_count FROM sessions WHERE session_id = ANY($1::text[])", sids
                )
                count = await pg.fetchval(
                    "SELECT count(*) FROM session_messages WHERE session_id = ANY($1::text[])", sids
                )
                return count == n and sorted(r["message_count"] for r in rows) == [PER_SESSION] * SESSIONS

            await eventually(all_in_postgres, "every message in Postgres", within=60, interval=0.2)
            await eventually(
                lambda: _is_zero(_pending(backend, stuck.name)), "the killed worker's entries taken over"
            )
            taken_over = time.monotonic() - killed_at
            print(f"\nworker SIGKILLed mid-batch ({left} entries pending): taken over and all in "
                  f"Postgres {taken_over:.1f}s later (FLUSH_CLAIM_IDLE_MS=1000)")  # fmt: skip


async def _holding(backend: Backend, workers: list[WorkerProcess]) -> WorkerProcess | None:
    """A worker with entries read but not acknowledged, if there is one."""
    for w in workers:
        if await _pending(backend, w.name):
            return w
    return None


async def _is_zero(n: Any) -> bool:
    return await n == 0
