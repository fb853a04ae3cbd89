"""``create_app(settings)``: the whole service, built without I/O; resources open in cleanup contexts."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable
from typing import cast

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from session_svc import openapi
from session_svc.keys import Keys
from session_svc.middleware import error_middleware
from session_svc.redis_client import REDIS_DOWN, redis_client
from session_svc.settings import Settings
from session_svc.store import Backend, Scripts
from session_svc.typedefs import BACKEND, SETTINGS
from session_svc.views import setup_routes

log = logging.getLogger("session_svc")


def configure_logging(settings: Settings) -> None:
    """For the process entry points (API and worker) only."""
    logging.basicConfig(
        level=logging.DEBUG if settings.debug else settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


async def check_layout(redis: Redis, keys: Keys) -> None:
    """Refuse to run against data written with another bucket count: every key would move."""
    await cast("Awaitable[bool]", redis.hsetnx(keys.meta, "buckets", str(keys.buckets)))
    stored = int(await cast("Awaitable[str | None]", redis.hget(keys.meta, "buckets")) or keys.buckets)
    if stored != keys.buckets:
        raise RuntimeError(
            f"REDIS_BUCKETS={keys.buckets}, but the data under prefix {keys.prefix!r} "
            f"was written with {stored}"
        )


async def pg_pool(settings: Settings) -> asyncpg.Pool | None:
    if not settings.database_url:
        return None
    # min_size=0: the API starts (and serves from Redis) even while Postgres is down.
    return await asyncpg.create_pool(
        settings.database_url, min_size=0, max_size=settings.db_pool_size, timeout=3, command_timeout=10
    )


async def _check_layout_when_redis_answers(redis: Redis, keys: Keys) -> None:
    """Started without Redis: check the layout as soon as it answers; a mismatch stops the process."""
    while True:
        await asyncio.sleep(1)
        try:
            await check_layout(redis, keys)
            log.info("Redis answers; key layout checked")
            return
        except REDIS_DOWN:
            continue
        except RuntimeError:
            log.critical("stopping: wrong key layout", exc_info=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return


async def _backend_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = redis_client(settings)
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    pg = None
    later: asyncio.Task[None] | None = None
    try:
        try:
            await check_layout(redis, keys)
        except REDIS_DOWN as exc:
            # Serve anyway (503s that say nothing was written) so that the API comes up with Redis,
            # not only after it: a restart during a Redis outage must not need a second restart.
            log.warning("Redis unreachable at start (%r); answering 503 until it is back", exc)
            later = asyncio.create_task(_check_layout_when_redis_answers(redis, keys))
        pg = await pg_pool(settings)
        app[BACKEND] = Backend(redis, keys, Scripts.register(redis), pg, settings.db_schema)
        yield
    finally:
        if later is not None:
            later.cancel()
        if pg is not None:
            await pg.close()
        await redis.aclose()


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_backend_ctx)
    setup_routes(app)
    openapi.setup(app)
    return app
