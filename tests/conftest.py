"""Shared fixtures: the real Redis and PostgreSQL, isolated per test (Redis) and per run (Postgres).

- Redis: each test gets its own ``KEY_PREFIX``; every key under a prefix the test used is deleted after
  it (SCAN + DEL, never FLUSHDB). ``make_settings(key_prefix=...)`` registers extra prefixes for cleanup.
- PostgreSQL: one schema per pytest run, built by the project's own migrations and dropped at the end.
- Servers default to 127.0.0.1:6379 and postgres@127.0.0.1:5432/test; override them with
  ``TEST_REDIS_URL`` / ``TEST_DATABASE_URL``.

Fixtures meant for every test module (API, workers, faults): ``test_urls``, ``db_schema``, ``key_prefix``,
``make_settings``, ``settings``, ``app``, ``client``, ``make_client``, ``redis``, ``pg``,
``private_redis``, ``make_rig`` (the fault tests' rig, ``tests/rig.py``). Request helpers
(``make_session`` ...) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from redis.asyncio import Redis

from session_svc.http.app import create_app
from session_svc.http.appkeys import BACKEND
from session_svc.record.keys import Keys
from session_svc.settings import Settings
from session_svc.storage import heartbeat
from session_svc.storage.resources import Backend
from tests.helpers import Client
from tests.outbox_drain import make_flusher
from tests.rig import MakeRig, rigs
from tests.servers import LocalCluster, PgServer, RedisServer, start_cluster, start_postgres, start_redis
from tests.support import create_schema, delete_prefix, drop_schema
from workers.flush import Flusher


@dataclass(frozen=True)
class ServerUrls:
    redis_url: str
    database_url: str


@pytest.fixture(scope="session")
def test_urls() -> ServerUrls:
    return ServerUrls(
        redis_url=os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/0",
        database_url=os.environ.get("TEST_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test",
    )


@pytest.fixture(scope="session")
def db_schema(test_urls: ServerUrls) -> Iterator[str]:
    """A fresh schema for this pytest run, migrated to head; dropped (CASCADE) at the end.

    Synchronous on purpose: ``migrate.upgrade`` runs its own event loop (``asyncio.run``).
    """
    schema = create_schema(test_urls.database_url, "t_")
    try:
        yield schema
    finally:
        drop_schema(test_urls.database_url, schema)


@dataclass
class PrefixRegistry:
    """Key prefixes a test used on the shared Redis; all are wiped after the test."""

    redis_url: str
    prefixes: set[str] = field(default_factory=set)

    def new(self) -> str:
        prefix = "t" + uuid.uuid4().hex[:12]
        self.prefixes.add(prefix)
        return prefix


@pytest.fixture
def prefix_registry(test_urls: ServerUrls) -> Iterator[PrefixRegistry]:
    registry = PrefixRegistry(test_urls.redis_url)
    yield registry
    for prefix in registry.prefixes:
        delete_prefix(registry.redis_url, prefix)


@pytest.fixture
def key_prefix(prefix_registry: PrefixRegistry) -> str:
    """This test's own Redis key prefix."""
    return prefix_registry.new()


MakeSettings = Callable[..., Settings]


@pytest.fixture
def make_settings(
    test_urls: ServerUrls, db_schema: str, key_prefix: str, prefix_registry: PrefixRegistry
) -> MakeSettings:
    """``make_settings(**overrides)``: Settings on the test servers, this test's prefix and the run's schema.

    A ``key_prefix`` override is cleaned up after the test too (when it lives on the shared Redis).
    """

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": test_urls.redis_url,
            "database_url": test_urls.database_url,
            "db_schema": db_schema,
            "key_prefix": key_prefix,
            "stats_max_age_ms": 0,  # the totals as of now: tests compare them with what they wrote
        }
        values.update(overrides)
        if values["redis_url"] == test_urls.redis_url:
            prefix_registry.prefixes.add(values["key_prefix"])
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: MakeSettings) -> Settings:
    return make_settings()


@pytest.fixture
def app(settings: Settings) -> web.Application:
    return create_app(settings)


@pytest.fixture
async def client(aiohttp_client: Any, app: web.Application) -> Client:
    got: Client = await aiohttp_client(app)
    return got


MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def make_client(aiohttp_client: Any, make_settings: MakeSettings) -> MakeClient:
    """``await make_client(**settings_overrides)``: another app (and server) built with other settings."""

    async def make(**overrides: Any) -> Client:
        got: Client = await aiohttp_client(create_app(make_settings(**overrides)))
        return got

    return make


@pytest.fixture
async def redis(test_urls: ServerUrls) -> AsyncIterator[Redis]:
    """A raw client on the shared test Redis (decoded strings) for inspecting keys."""
    client = Redis.from_url(test_urls.redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def pg(test_urls: ServerUrls, db_schema: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection whose search_path is the run's schema."""
    conn = await asyncpg.connect(test_urls.database_url, server_settings={"search_path": db_schema})
    try:
        yield conn
    finally:
        await conn.close()


# The write-through side -------------------------------------------------------------------------------


@pytest.fixture
async def pool(test_urls: ServerUrls) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(test_urls.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix, settings.redis_buckets)


@pytest.fixture
def flusher(redis: Redis, pool: asyncpg.Pool, keys: Keys, settings: Settings) -> Flusher:
    """An in-process outbox drain over this test's prefix and schema (``outbox_drain.drain`` runs it)."""
    return make_flusher(redis, pool, keys, settings.db_schema)


@pytest.fixture
def backend(client: Client) -> Backend:
    return client.app[BACKEND]


@pytest.fixture
async def live_worker(backend: Backend) -> heartbeat.Heartbeat:
    """A fresh heartbeat on record, as a running worker writes it (``/health/detailed`` needs one to say
    ``operational``; tests of the API alone have no worker process behind them)."""
    hb = heartbeat.Heartbeat("test-worker", time.time(), os.getpid(), 0.0, "ok")
    await heartbeat.beat(backend.scripts, backend.keys, hb)
    return hb


# Private servers for fault injection ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    """A private PostgreSQL cluster (tests.support) for the module's fault tests, removed afterwards."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def private_redis() -> Iterator[Callable[[], RedisServer]]:
    """``private_redis(*args)`` starts a private redis-server (tests.support) with extra command-line
    ``args`` (e.g. persistence); all are removed afterwards."""
    started: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = start_redis(*args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.destroy()


@pytest.fixture
async def make_rig(pg_server: PgServer, aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[MakeRig]:
    """``await make_rig(redis_args, **settings)``: the fault tests' rig (``tests/rig.py``): a private
    Redis of its own, a fresh schema on the module's private Postgres, the app on both, the model of
    acknowledged writes; removed afterwards, its workers stopped (SIGTERM, clean exit required)."""
    async with rigs(pg_server, aiohttp_client, tmp_path) as make:
        yield make


# Redis Cluster --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A local 3-master, 3-replica cluster (``scripts/cluster.sh up`` on spare ports) for the whole run,
    stopped (``down --purge``) at its end. Tests that kill a node start their own (``start_cluster``)."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture
def cluster_settings(
    make_settings: MakeSettings, redis_cluster: LocalCluster, key_prefix: str, test_urls: ServerUrls
) -> Iterator[Settings]:
    """Settings on the cluster (arq's queue on the shared standalone Redis); this test's keys are
    deleted from every master afterwards."""
    yield make_settings(redis_url=redis_cluster.url, redis_cluster=True, arq_redis_url=test_urls.redis_url)
    redis_cluster.delete_prefix(key_prefix)
