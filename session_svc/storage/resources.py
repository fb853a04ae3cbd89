"""What a process holds open: the Redis client, the Postgres pool, the registered scripts, opened and
closed in one place for the API (``app.py``) and the worker (``workers/main.py``) alike.

``open_backend`` also checks the key layout: the bucket count is fixed for the life of the data, and a
process configured with another ``REDIS_BUCKETS`` would look for every session in the wrong place. If
Redis does not answer at start, the process starts anyway (its Redis calls fail fast, with 503s in
the API) and runs the check as soon as Redis answers; a mismatch then stops it, as it would at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
from asyncpg.pool import PoolAcquireContext
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from session_svc.record.keys import Keys
from session_svc.settings import Settings
from session_svc.storage.redis_client import REDIS_FAILURES, AnyRedis, redis_client
from session_svc.storage.scripts import Scripts

log = logging.getLogger("session_svc")

# Seconds between layout checks while Redis has not answered since the process started.
LAYOUT_RETRY_S = 1.0
# asyncpg: seconds to connect (a statement's own limit is PG_COMMAND_TIMEOUT); seconds a stopping
# process waits for its connections to be released before closing them anyway (a statement hung on
# Postgres would hold it).
PG_CONNECT_TIMEOUT_S = 3
PG_CLOSE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Backend:
    redis: AnyRedis
    keys: Keys
    scripts: Scripts
    # None when the service runs without Postgres: nothing is ever cold then.
    pg: asyncpg.Pool | None = None
    schema: str = "dev"
    # Writes (``store.py``): how long an Idempotency-Key's answer is kept; the per-user rate limit.
    idempotency_ttl: int = 86_400
    rate_per_minute: int = 0
    rate_burst: int = 0
    # REDIS_WAIT_REPLICAS and REDIS_WAIT_TIMEOUT (in ms): (0, 0) when off.
    wait: tuple[int, int] = (0, 0)
    # STATS_MAX_AGE_MS in seconds: how old the totals of ``GET /api/v1/sessions/stats`` may be (0: read
    # every time); ``memo`` holds this process's latest read (``domain/store.stats``).
    stats_max_age: float = 0.0
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def cluster(self) -> bool:
        """Redis Cluster (REDIS_CLUSTER): no command may span buckets, not even in a pipeline, and
        commands without a key (INFO) go to each master."""
        return isinstance(self.redis, RedisCluster)


async def check_layout(redis: AnyRedis, keys: Keys) -> None:
    """Refuse to run against data written with another bucket count: every key would move.

    Reads first: only the very first process of a deployment writes (a full Redis refuses writes)."""
    stored_raw = await cast("Awaitable[str | None]", redis.hget(keys.meta, "buckets"))
    if stored_raw is None:
        await cast("Awaitable[bool]", redis.hsetnx(keys.meta, "buckets", str(keys.buckets)))
        stored_raw = await cast("Awaitable[str | None]", redis.hget(keys.meta, "buckets"))
    stored = int(stored_raw or keys.buckets)
    if stored != keys.buckets:
        raise RuntimeError(
            f"REDIS_BUCKETS={keys.buckets}, but the data under prefix {keys.prefix!r} "
            f"was written with {stored}"
        )


async def _check_layout_when_redis_answers(redis: AnyRedis, keys: Keys) -> None:
    while True:
        await asyncio.sleep(LAYOUT_RETRY_S)
        try:
            await check_layout(redis, keys)
            log.info("Redis answers; key layout checked")
            return
        except (*REDIS_FAILURES, RedisClusterException):
            continue
        except RuntimeError:
            log.critical("stopping: wrong key layout", exc_info=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return


async def _no_session_state(_: asyncpg.Connection) -> None:
    """What the pool runs when a connection comes back, instead of asyncpg's default reset query
    (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``): a second round trip to
    Postgres after every pooled query, which made a cold read cost two. Nothing here leaves session
    state behind (no advisory lock, LISTEN, cursor or SET: single statements and managed
    transactions only), and asyncpg still rolls back a transaction left open before calling this."""


class BoundedPool(asyncpg.Pool):
    """A pool whose ``acquire()`` gives up after ``PG_CONNECT_TIMEOUT_S`` unless told otherwise, and so
    do the queries run on the pool itself (``pool.fetchrow`` acquires without a timeout). The connect
    timeout bounds one connection attempt, but not the wait for a free connection: with Postgres
    black-holed, 24 concurrent cold reads on a pool of 10 queued behind each other's connection
    attempts and answered after up to 9 s, three connect timeouts in a row. Now a request waits at
    most this long for a connection (free or new) and ``PG_COMMAND_TIMEOUT`` for its statement, like
    ``REDIS_POOL_TIMEOUT`` on the Redis side; a timeout is "unavailable" (503, or a retried batch)."""

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext[asyncpg.Record]:
        return super().acquire(timeout=PG_CONNECT_TIMEOUT_S if timeout is None else timeout)


async def pg_pool(settings: Settings) -> asyncpg.Pool | None:
    if not settings.database_url:
        return None
    # min_size=0: no connection is opened now, so the process starts (and serves from Redis) even
    # while Postgres is down. The other arguments are asyncpg.create_pool's defaults.
    pool = BoundedPool(
        settings.database_url,
        min_size=0,
        max_size=settings.db_pool_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        timeout=PG_CONNECT_TIMEOUT_S,
        command_timeout=settings.pg_command_timeout,
        reset=_no_session_state,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
    )
    return await pool


@contextlib.asynccontextmanager
async def open_backend(
    settings: Settings, socket_timeout: float | None = None, coalesce: bool = False
) -> AsyncIterator[Backend]:
    """The process's ``Backend``; ``socket_timeout`` overrides REDIS_SOCKET_TIMEOUT (the worker's);
    ``coalesce``: script calls of one loop turn share a pipeline (the API's, REDIS_COALESCE)."""
    redis = redis_client(settings, socket_timeout)
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    wait = (settings.redis_wait_replicas, int(settings.redis_wait_timeout * 1000))
    scripts = Scripts(redis, coalesce, wait)
    pg = None
    later: asyncio.Task[None] | None = None
    try:
        try:
            if isinstance(redis, RedisCluster):
                _ = await redis.initialize()  # the slot map, from the first seed that answers
            await check_layout(redis, keys)
        except (*REDIS_FAILURES, RedisClusterException) as exc:  # down, or full and this is the first write
            log.warning("Redis unavailable at start (%r); the layout is checked once it answers", exc)
            later = asyncio.create_task(_check_layout_when_redis_answers(redis, keys))
        pg = await pg_pool(settings)
        yield Backend(
            redis,
            keys,
            scripts,
            pg,
            settings.db_schema,
            settings.idempotency_ttl,
            settings.rate_limit_writes_per_minute,
            settings.rate_limit_burst or settings.rate_limit_writes_per_minute,
            wait if wait[0] else (0, 0),
            settings.stats_max_age_ms / 1000,
        )
    finally:
        if later is not None:
            later.cancel()
        if pg is not None:
            try:
                await asyncio.wait_for(pg.close(), PG_CLOSE_TIMEOUT_S)  # terminates the pool on timeout
            except TimeoutError:
                log.warning("PostgreSQL connections still busy after %gs; closed anyway", PG_CLOSE_TIMEOUT_S)
        if scripts.coalescer is not None:
            await scripts.coalescer.aclose()
        await redis.aclose()
