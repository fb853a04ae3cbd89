"""Service-wide figures for ``/metrics``, read from Redis at scrape time, never counted per process.

The business counters (sessions by status, messages by role, tokens, cost, memories by type,
rehydrations) are the exact counters the API's scripts keep in each bucket's ``stats`` hash
(``record.py``), so every API process, on every host, reports the same true figure whichever process
answers: aggregate them with ``max`` in PromQL, never ``sum``. They are read in one pipelined round trip
(every bucket's stats hash and hot-set size, the workers' heartbeats, Redis memory), beside a ``SELECT
1`` to Postgres, and the result is kept for ``CACHE_S`` so that several scrapers cost one read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from session_svc import __version__
from session_svc.errors import PG_UNAVAILABLE
from session_svc.record.fields import MEMORY_STAT, MICROS, ROLE_STAT, MemoryType, SessionStatus
from session_svc.record.models import Role
from session_svc.storage import heartbeat, redis_client
from session_svc.storage.redis_client import REDIS_FAILURES
from session_svc.storage.resources import Backend

# Seconds a reading is reused; and the most a reading may take before Redis or Postgres counts as down.
CACHE_S = 1.0
TIMEOUT_S = 1.0
_PG_DOWN: tuple[type[BaseException], ...] = (*PG_UNAVAILABLE, TimeoutError)


@dataclass(frozen=True, slots=True)
class Snapshot:
    redis_up: bool
    postgres_up: bool
    stats: dict[str, int] = field(default_factory=dict)  # summed over the buckets
    hot_sessions: int = 0
    workers_alive: int = 0
    memory_used: int = 0
    memory_max: int = 0


async def _redis_figures(b: Backend, heartbeat_timeout: float) -> Snapshot:
    keys = b.keys
    async with asyncio.timeout(TIMEOUT_S):
        async with b.redis.pipeline(transaction=False) as pipe:
            for bucket in range(keys.buckets):
                pipe.hgetall(keys.stats(bucket))
                pipe.zcard(keys.hot(bucket))
            pipe.hgetall(keys.workers)
            if not b.cluster:
                pipe.info("memory")
            replies = await pipe.execute()
        if b.cluster:  # INFO has no key: asked of every master (the fullest one is reported)
            mem = await redis_client.memory(b.redis)
            replies.append({"used_memory": mem.used, "maxmemory": mem.limit})
    *per_bucket, workers, memory = replies
    stats: dict[str, int] = {}
    for h in per_bucket[0::2]:
        for name, value in h.items():
            stats[name] = stats.get(name, 0) + int(value)
    now = time.time()
    alive = sum(1 for h in heartbeat.parse(workers) if now - h.at <= heartbeat_timeout)
    return Snapshot(
        redis_up=True,
        postgres_up=False,
        stats=stats,
        hot_sessions=sum(int(n) for n in per_bucket[1::2]),
        workers_alive=alive,
        memory_used=int(memory["used_memory"]),
        memory_max=int(memory.get("maxmemory", 0)),
    )


async def postgres_up(b: Backend) -> bool:
    """``SELECT 1`` answered within ``TIMEOUT_S`` (False without a Postgres)."""
    if b.pg is None:
        return False
    try:
        async with asyncio.timeout(TIMEOUT_S):
            return bool(await b.pg.fetchval("SELECT 1") == 1)
    except _PG_DOWN:
        return False


class Totals:
    """The latest ``Snapshot``, read again when older than ``CACHE_S``; concurrent scrapes share a read."""

    def __init__(self, backend: Backend, heartbeat_timeout: float) -> None:
        self._backend = backend
        self._heartbeat_timeout = heartbeat_timeout
        self._at = -CACHE_S
        self._snapshot = Snapshot(redis_up=False, postgres_up=False)
        self._lock = asyncio.Lock()

    async def snapshot(self) -> Snapshot:
        async with self._lock:
            if time.monotonic() - self._at >= CACHE_S:
                self._snapshot = await self._read()
                self._at = time.monotonic()
            return self._snapshot

    async def _read(self) -> Snapshot:
        figures, pg_up = await asyncio.gather(
            _redis_figures(self._backend, self._heartbeat_timeout),
            postgres_up(self._backend),
            return_exceptions=True,
        )
        up = pg_up is True
        if isinstance(figures, (*REDIS_FAILURES, TimeoutError)):
            return Snapshot(redis_up=False, postgres_up=up)
        if isinstance(figures, BaseException):
            raise figures
        return dataclasses.replace(figures, postgres_up=up)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class TotalsCollector(Collector):
    """One ``Snapshot`` as Prometheus metrics. Without Redis only ``*_up`` and build info are exported:
    a missing series is honest, a zero would be a lie."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        s = self.snap
        info = GaugeMetricFamily("session_build_info", "The running version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield _gauge("session_redis_up", "1 when Redis answered the last scrape's read", int(s.redis_up))
        yield _gauge("session_postgres_up", "1 when PostgreSQL answered SELECT 1", int(s.postgres_up))
        if not s.redis_up:
            return
        st = s.stats
        by_status = GaugeMetricFamily(
            "session_sessions", "Sessions by status, service-wide (aggregate with max)", labels=["status"]
        )
        for status in SessionStatus:
            by_status.add_metric([status.value], st.get(status.value, 0))
        yield by_status
        yield CounterMetricFamily(
            "session_sessions_created", "Sessions created, service-wide", value=st.get("sessions", 0)
        )
        roles = CounterMetricFamily(
            "session_messages", "Messages appended by role, service-wide", labels=["role"]
        )
        for role in Role:
            roles.add_metric([role.value], st.get(ROLE_STAT + role.value, 0))
        yield roles
        yield CounterMetricFamily("session_tokens", "Tokens used, service-wide", value=st.get("tokens", 0))
        yield CounterMetricFamily(
            "session_cost_dollars",
            "Cost in US dollars, service-wide (kept exactly in micro-dollars)",
            value=st.get("cost_micros", 0) / MICROS,
        )
        memories = CounterMetricFamily(
            "session_memories", "Memories created by type, service-wide", labels=["type"]
        )
        for mtype in MemoryType:
            memories.add_metric([mtype.value], st.get(MEMORY_STAT + mtype.value, 0))
        yield memories
        yield CounterMetricFamily(
            "session_rehydrations",
            "Sessions read back from PostgreSQL into Redis, service-wide",
            value=st.get("rehydrations", 0),
        )
        yield _gauge("session_hot_sessions", "Sessions held in Redis, service-wide", s.hot_sessions)
        yield _gauge(
            "session_workers_alive", "Workers whose heartbeat is recent, service-wide", s.workers_alive
        )
        yield _gauge("session_redis_memory_used_bytes", "Redis used_memory", s.memory_used)
        yield _gauge("session_redis_memory_max_bytes", "Redis maxmemory (0: no limit)", s.memory_max)
