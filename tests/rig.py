"""The one rig of the fault and network tests: a private redis-server (its own for each rig, with the
command-line options the test needs), a fresh schema on the module's private PostgreSQL, the app served
in-process on both, the real worker processes it starts, and the model of acknowledged writes
(``tests/acked.py``) that every write through it is filed in.

``make_rig`` (the fixture in ``conftest.py``) builds them: ``rig = await make_rig(redis_args, **settings)``.
At teardown every worker the test did not kill on purpose is stopped with SIGTERM and must exit cleanly;
then the servers and schemas are removed, even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from session_svc.http.app import create_app
from session_svc.record.keys import Keys
from session_svc.settings import Settings
from session_svc.storage import outbox
from tests import acked, outbox_drain, servers, support
from tests.acked import Acked
from tests.servers import PgServer, RedisServer, WorkerProcess
from tests.support import eventually

# Short timeouts, so that a fault is seen (and recovered from) in seconds; a test overrides what it needs.
DEFAULTS: dict[str, Any] = {
    "flush_claim_idle_ms": 1000,
    "flush_batch_size": 200,
    "redis_socket_timeout": 1.0,
    "redis_pool_timeout": 1.0,
    "redis_connect_timeout": 0.5,
    "worker_redis_socket_timeout": 2.0,
    "worker_heartbeat_interval": 0.5,
    "worker_heartbeat_timeout": 3.0,
}
AOF = ("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction")


@dataclass
class Rig:
    settings: Settings
    client: Any  # the app under test (aiohttp's TestClient)
    redis: Redis  # a raw client on the private Redis (decoded)
    redis_server: RedisServer
    pg_server: PgServer
    pg: asyncpg.Connection  # the test's own connection (``db()`` reopens it after a restart)
    log_dir: Path
    model: Acked = field(default_factory=Acked)
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix, self.settings.redis_buckets)

    @property
    def schema(self) -> str:
        return self.settings.db_schema

    # Processes ------------------------------------------------------------------------------------------

    def start_worker(self, tag: str, **settings: Any) -> WorkerProcess:
        """``python -m workers`` on the rig's settings (``settings`` changed, e.g. a URL through a proxy)."""
        config = dataclasses.replace(self.settings, **settings)
        worker = servers.start_worker(config, f"{self.settings.key_prefix}-{tag}", self.log_dir)
        self.workers.append(worker)
        return worker

    def logs(self) -> str:
        return "\n".join(f"--- worker {w.name} (alive={w.alive}):\n{w.tail()}" for w in self.workers)

    @contextlib.contextmanager
    def api_process(self, port: int, name: str, **env: str) -> Iterator[servers.ApiProcess]:
        """``python -m session_svc`` on the rig's servers, schema and prefix (``env`` added to its
        environment, e.g. another ``REDIS_URL``); stopped on the way out."""
        s = self.settings
        env = {**support.api_settings(s.redis_url, s.database_url, s.db_schema, s.key_prefix, port), **env}
        api = servers.start_api(env, self.log_dir, name)
        try:
            yield api
        finally:
            api.stop()

    async def use_app(self, aiohttp_client: Any, **settings: Any) -> None:
        """The rig's app built again with ``settings`` changed (a URL through a proxy, a name on its Redis
        connections); the worker and the test's own clients keep going straight to the servers."""
        self.client = await aiohttp_client(create_app(dataclasses.replace(self.settings, **settings)))

    # Writes, filed in the model ---------------------------------------------------------------------------

    async def create(self, title: str = "") -> str:
        return await acked.create(self.client, self.model, title)

    async def append(self, sid: str, content: str, cost: float = 0.000125, tokens: int | None = None) -> int:
        return await acked.message(self.client, self.model, sid, content, cost, tokens)

    async def memory(self, sid: str, n: int) -> int:
        return await acked.memory(self.client, self.model, sid, n)

    async def retitle(self, sid: str, title: str) -> int:
        return await acked.retitle(self.client, self.model, sid, title)

    def load(self, sids: list[str], writers: int, **kw: Any) -> acked.Load:
        return acked.Load(self.client, self.model, sids, writers, **kw)

    # Waits and reads -------------------------------------------------------------------------------------

    async def pending(self, worker: WorkerProcess) -> int:
        return (await outbox_drain.pending_per_consumer(self.redis, self.keys)).get(worker.name, 0)

    async def wait_claimable(self, dead: WorkerProcess) -> None:
        """Until every entry the dead worker left pending has been idle past FLUSH_CLAIM_IDLE_MS, so the
        next worker reclaims them at its start rather than at its next maintenance round."""
        idle_ms = self.settings.flush_claim_idle_ms + 100

        async def claimable() -> bool:
            for bucket in range(self.keys.buckets):
                rows = await self.redis.xpending_range(
                    self.keys.outbox(bucket), outbox.GROUP, "-", "+", 10_000, consumername=dead.name
                )
                if any(int(r["time_since_delivered"]) < idle_ms for r in rows):
                    return False
            return True

        await eventually(claimable, "the dead worker's entries to become claimable")

    async def quiescent(self, within: float = 60.0) -> None:
        """The outbox is drained: a consumer group exists, nothing undelivered, nothing pending."""

        async def drained() -> bool:
            backlog = await outbox.backlog(self.redis, self.keys)
            pending = await outbox_drain.pending_per_consumer(self.redis, self.keys)
            return backlog.entries == 0 and not any(pending.values()) and bool(pending)

        try:
            await eventually(drained, "quiescence (empty outbox backlog, nothing pending)", within, 0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    async def db(self) -> asyncpg.Connection:
        """The test's own connection to the private Postgres, opened again after a restart."""
        try:
            await self.pg.fetchval("SELECT 1")
        except (asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
            self.pg.terminate()
            self.pg = await asyncpg.connect(self.pg_server.url)
        return self.pg

    async def count(self, table: str) -> int:
        return await acked.table_count(await self.db(), self.schema, table)

    async def health(self) -> tuple[int, dict[str, Any], float]:
        t0 = time.monotonic()
        resp = await self.client.get("/health/detailed")
        return resp.status, await resp.json(), time.monotonic() - t0

    async def check(self, all_ok: bool = False) -> dict[str, int]:
        """Postgres reconciled with the model (``Acked.reconcile``); ``all_ok``: no write may have been
        answered anything but 200. Returns the figures of the outcomes."""
        if all_ok:
            assert not self.model.not_ok, self.model.not_ok[:5]
        return await self.model.reconcile(self.client, self.redis, self.keys, await self.db(), self.schema)

    async def settle(self, within: float = 60.0) -> dict[str, int]:
        """The worker drains everything; then ``check``."""
        await self.quiescent(within)
        return await self.check()


MakeRig = Callable[..., Awaitable[Rig]]


@contextlib.asynccontextmanager
async def rigs(pg_server: PgServer, aiohttp_client: Any, log_dir: Path) -> AsyncIterator[MakeRig]:
    """``make(redis_args=(), **settings)`` builds a ``Rig`` (``DEFAULTS`` changed by ``settings``)."""
    made: list[Rig] = []
    schemas: list[str] = []

    async def make(redis_args: tuple[str, ...] = (), **over: Any) -> Rig:
        server = servers.start_redis(*redis_args)
        try:
            schema = await asyncio.to_thread(support.create_schema, pg_server.url)  # runs its own loop
        except BaseException:
            server.destroy()
            raise
        schemas.append(schema)
        # The totals as of now (the model compares them with what it wrote), unless a test says otherwise.
        values = {"stats_max_age_ms": 0, **DEFAULTS, **over}
        settings = Settings(
            redis_url=server.url, database_url=pg_server.url, db_schema=schema,
            key_prefix=support.new_name("r"), **values,
        )  # fmt: skip
        redis = Redis.from_url(server.url, decode_responses=True)
        rig = Rig(settings, None, redis, server, pg_server, await asyncpg.connect(pg_server.url), log_dir)
        made.append(rig)
        rig.client = await aiohttp_client(create_app(settings))
        return rig

    try:
        yield make
        for rig in made:  # SIGTERM while their Redis still runs: each must exit cleanly
            await asyncio.to_thread(servers.stop_workers, rig.workers)
    finally:
        for rig in made:
            for worker in rig.workers:
                if worker.alive:
                    worker.kill()
            await rig.redis.aclose()
            rig.pg.terminate()
            rig.redis_server.destroy()
        if not pg_server.running:  # a test failed while its Postgres was down
            await asyncio.to_thread(pg_server.start)
        for schema in schemas:
            await asyncio.to_thread(support.drop_schema, pg_server.url, schema)
