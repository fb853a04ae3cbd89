"""The arq worker: runs the outbox drain as a long-lived task, and the periodic jobs as cron jobs.

arq gives us the process, signals, cron scheduling and job retries. The drain is not an arq job per
write (an enqueue costs about 4x an XADD); it is one loop reading the outbox streams. arq's own queue
lives on ``ARQ_REDIS_URL`` (it does not run on Redis Cluster), which defaults to ``REDIS_URL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from arq import cron
from arq.connections import RedisSettings
from prometheus_client import start_http_server

from session_svc.app import pg_pool, redis_client
from session_svc.keys import Keys
from session_svc.settings import Settings
from session_svc.store import Backend, Scripts
from workers import expiry
from workers.flush import Flusher

log = logging.getLogger("workers")

Ctx = dict[str, Any]


def consumer_name(settings: Settings) -> str:
    # A stable name (WORKER_NAME) lets a restarted worker pick up its own pending entries at once;
    # otherwise they are reclaimed by XAUTOCLAIM after FLUSH_CLAIM_IDLE_MS.
    return settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"


async def startup(ctx: Ctx) -> None:
    settings: Settings = ctx["settings"]
    redis = redis_client(settings)
    pg = await pg_pool(settings)
    if pg is None:
        raise RuntimeError("DATABASE_URL is required by the worker")
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    ctx["backend"] = Backend(redis, keys, Scripts.register(redis), pg, settings.db_schema)
    flusher = Flusher(
        redis, pg, keys, settings.db_schema, consumer_name(settings), batch_size=settings.flush_batch_size,
        max_deliveries=settings.flush_max_deliveries, claim_idle_ms=settings.flush_claim_idle_ms,
    )  # fmt: skip
    ctx["stop"] = stop = asyncio.Event()
    ctx["drain"] = asyncio.create_task(flusher.run(stop), name="outbox-drain")
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port)
    log.info("worker %s draining %d outbox buckets", flusher.consumer, keys.buckets)


async def shutdown(ctx: Ctx) -> None:
    ctx["stop"].set()
    drain: asyncio.Task[None] = ctx["drain"]
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(drain), timeout=10)
    drain.cancel()
    b: Backend = ctx["backend"]
    if b.pg is not None:
        await b.pg.close()
    await b.redis.aclose()


async def sweep_job(ctx: Ctx) -> int:
    return await expiry.sweep(ctx["backend"], ctx["settings"].session_hot_ttl)


async def reconcile_job(ctx: Ctx) -> int:
    return await expiry.reconcile(ctx["backend"])


async def housekeeping_job(ctx: Ctx) -> int:
    s: Settings = ctx["settings"]
    return await expiry.housekeeping(ctx["backend"], s.end_idle_after_days, s.archive_completed_after_days)


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``arq.run_worker``/``arq.Worker``."""
    return {
        "functions": [],
        "cron_jobs": [
            cron(sweep_job, second={0, 30}, run_at_startup=True, timeout=300),
            cron(reconcile_job, minute=set(range(2, 60, 5)), second={15}, timeout=300),
            cron(housekeeping_job, minute={7}, second={0}, timeout=600),
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "ctx": {"settings": settings},
        "redis_settings": RedisSettings.from_dsn(settings.arq_url),
        "queue_name": f"{settings.key_prefix}:arq:queue",
        "handle_signals": True,
    }
