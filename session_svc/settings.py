"""Service settings: one immutable object, read from the environment only by ``__main__``.

Tests build ``Settings(...)`` explicitly; nothing imports-time reads the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from urllib.parse import unquote, urlsplit

# REDIS_BUCKETS when it is not set. On a cluster, buckets are what spreads the load over masters: 16
# bucket slots land 4/8/4 on 3 masters with equal slot ranges, 64 land 22/24/18 (and can be evened to
# within 10% by moving slots, up to 10 masters); every-bucket reads cost 3x those of 16 (256: 10x).
STANDALONE_BUCKETS = 16
CLUSTER_BUCKETS = 64


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis Cluster: REDIS_URL is then one seed node of the cluster; REDIS_CLUSTER_NODES adds more
    # seeds (``host:port``, comma-separated). arq's queue must then live on ARQ_REDIS_URL (standalone).
    redis_cluster: bool = False
    redis_cluster_nodes: str = ""
    # A write's 2xx waits until this many replicas have it (WAIT), else 503 outcome unknown; 0 = off.
    # REDIS_WAIT_TIMEOUT: seconds WAIT may take (below REDIS_SOCKET_TIMEOUT).
    redis_wait_replicas: int = 0
    redis_wait_timeout: float = 0.2
    database_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    # arq cannot run on Redis Cluster; its queue may live on a separate standalone Redis.
    arq_redis_url: str = ""
    db_schema: str = "dev"
    service_host: str = "0.0.0.0"
    service_port: int = 8205
    # API processes sharing SERVICE_PORT (SO_REUSEPORT) under one supervisor; 0 = one per core.
    service_processes: int = 0
    log_level: str = "INFO"
    # One JSON line per request on stderr (method, route template, status, ms, request id, session id,
    # hashed user id; never content). Off by default: it costs throughput (docs/performance.md).
    access_log: bool = False
    # Request and Redis/Postgres timings and GET /metrics. Off only to measure what they cost.
    metrics: bool = True
    debug: bool = False
    # Every Redis key starts with this prefix; tests give each test its own.
    key_prefix: str = "ss"
    # Sessions are spread over this many hash-slot buckets (by user id). Fixed for the life of the data:
    # the service refuses to start against a Redis that was written with another value. Unset (0): 16 on
    # a standalone Redis, CLUSTER_BUCKETS on Redis Cluster (docs/decisions.md, "Redis Cluster").
    redis_buckets: int = 0
    redis_max_connections: int = 64
    # The API sends the script calls of one event-loop turn to Redis as one pipeline (coalesce.py).
    redis_coalesce: bool = True
    # Seconds a request waits for a free pooled connection / to connect / for Redis to answer before
    # a 503. A hot request takes about a millisecond: a second is already a failure.
    redis_pool_timeout: float = 1.0
    redis_connect_timeout: float = 0.5
    redis_socket_timeout: float = 1.0
    # The worker reads and writes batches of up to FLUSH_BATCH_SIZE entries per bucket: allow longer.
    worker_redis_socket_timeout: float = 10.0
    # Circuit breaker: this many consecutive connection failures or timeouts open it; while open, Redis
    # commands fail at once (503, nothing written) until a probe is let through after this many seconds.
    redis_breaker_failures: int = 3
    redis_breaker_reset: float = 1.0
    # Fraction of Redis maxmemory above which the sweep evicts flushed sessions whatever their idle
    # time (least recently written first) and background jobs that add data skip their round.
    redis_memory_high_water: float = 0.8
    max_body_bytes: int = 1024 * 1024
    # On SIGTERM/SIGINT the API stops accepting connections and gives the requests in flight this many
    # seconds to finish; the worker gives the batch in hand as long to commit and be acknowledged.
    shutdown_timeout: float = 10.0
    # Consul registration of the API (off unless CONSUL_HOST is set): the local agent's address, an ACL
    # token (X-Consul-Token), the service's tags (comma-separated), and the address Consul advertises
    # and health-checks (empty: SERVICE_HOST unless it is a wildcard, else this host's primary IP).
    consul_host: str = ""
    consul_port: int = 8500
    consul_token: str = ""
    consul_tags: str = "api,v1"
    consul_service_address: str = ""
    # Write-through and expiry (workers).
    # A session untouched this long leaves Redis once everything it holds is in Postgres.
    session_hot_ttl: int = 3600
    # Guide housekeeping, off (0) by default: end active sessions idle this many days,
    # archive completed sessions this many days after their last update.
    end_idle_after_days: int = 0
    archive_completed_after_days: int = 0
    flush_batch_size: int = 500
    # An outbox entry delivered this many times without a commit goes to the dead-letter stream.
    flush_max_deliveries: int = 5
    # A pending entry idle this long (ms) is presumed orphaned by a dead worker and reclaimed.
    flush_claim_idle_ms: int = 30_000
    db_pool_size: int = 10
    # Consumer name of this worker in the outbox group; stable names recover their own work at restart.
    worker_name: str = ""
    # Port of the worker's Prometheus endpoint (0 = none).
    worker_metrics_port: int = 0
    # The worker refreshes its heartbeat in Redis this often; /health/detailed counts a worker as gone
    # when its heartbeat is older than WORKER_HEARTBEAT_TIMEOUT.
    worker_heartbeat_interval: float = 2.0
    worker_heartbeat_timeout: float = 10.0
    # /health/detailed says degraded when the oldest write not yet in Postgres is older than this.
    health_max_lag_seconds: float = 60.0
    # Periodic jobs (arq cron): the expiry sweep and reconciliation, every N seconds. N divides a
    # minute, or is a whole number of minutes that divides an hour.
    sweep_every_seconds: int = 30
    reconcile_every_seconds: int = 300
    # Reconciliation re-sends a session only if it was last written at least this long ago.
    reconcile_stale_after_seconds: int = 300

    def __post_init__(self) -> None:
        if self.redis_buckets == 0:
            buckets = CLUSTER_BUCKETS if self.redis_cluster else STANDALONE_BUCKETS
            object.__setattr__(self, "redis_buckets", buckets)
        # Both end up inside SQL identifiers and Redis keys: keep them to a safe alphabet.
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.db_schema):
            raise ValueError(f"DB_SCHEMA must be a lower-case SQL identifier, got {self.db_schema!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.key_prefix):
            raise ValueError(f"KEY_PREFIX must match [A-Za-z0-9_.-]{{1,64}}, got {self.key_prefix!r}")
        if not 1 <= self.redis_buckets <= 1024:
            raise ValueError("REDIS_BUCKETS must be between 1 and 1024")
        if not 0 < self.redis_memory_high_water <= 1:
            raise ValueError("REDIS_MEMORY_HIGH_WATER must be a fraction in (0, 1]")
        if self.service_processes < 0:
            raise ValueError("SERVICE_PROCESSES must be 0 (one per core) or more")
        if self.redis_breaker_failures < 1:
            raise ValueError("REDIS_BREAKER_FAILURES must be at least 1")
        if not self.shutdown_timeout > 0:  # aiohttp takes 0 for "no timeout": wait forever
            raise ValueError("SHUTDOWN_TIMEOUT must be more than 0 seconds")
        if not 0 < self.consul_port < 65536:
            raise ValueError("CONSUL_PORT must be a TCP port (1-65535)")
        if self.redis_wait_replicas < 0:
            raise ValueError("REDIS_WAIT_REPLICAS must be 0 (off) or more")
        if self.redis_wait_replicas and not 0 < self.redis_wait_timeout < self.redis_socket_timeout:
            raise ValueError("REDIS_WAIT_TIMEOUT must be more than 0 and less than REDIS_SOCKET_TIMEOUT")
        if self.redis_cluster:
            self.cluster_seeds  # noqa: B018  (raises on a malformed seed)
            if urlsplit(self.redis_url).path.strip("/") not in ("", "0"):
                raise ValueError("Redis Cluster has only database 0: REDIS_URL must not name another")
        for name in ("sweep_every_seconds", "reconcile_every_seconds"):
            every_schedule(getattr(self, name), name.upper())

    @property
    def cluster_seeds(self) -> list[tuple[str, int]]:
        """(host, port) of REDIS_URL and of every REDIS_CLUSTER_NODES entry."""
        url = urlsplit(self.redis_url)
        seeds = [(url.hostname or "127.0.0.1", url.port or 6379)]
        for item in filter(None, (n.strip() for n in self.redis_cluster_nodes.split(","))):
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"REDIS_CLUSTER_NODES: expected host:port, got {item!r}")
            seeds.append((host.strip("[]"), int(port)))
        return seeds

    @property
    def cluster_username(self) -> str:
        return unquote(urlsplit(self.redis_url).username or "")

    @property
    def cluster_password(self) -> str:
        return unquote(urlsplit(self.redis_url).password or "")

    @property
    def arq_url(self) -> str:
        return self.arq_redis_url or self.redis_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from upper-case environment variables named like the fields."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(getattr(cls(), f.name))
            if kind is bool:
                values[f.name] = raw.strip().lower() in {"1", "true", "yes", "on"}
            elif kind is int:
                values[f.name] = int(raw)
                if f.name == "redis_buckets" and values[f.name] == 0:  # 0 is "unset" only in code
                    raise ValueError("REDIS_BUCKETS must be between 1 and 1024")
            elif kind is float:
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        return cls(**values)  # type: ignore[arg-type]


def every_schedule(seconds: int, name: str = "interval") -> tuple[set[int] | None, set[int]]:
    """``(minutes, seconds)`` sets of a cron that fires every ``seconds`` (arq's ``cron`` fields)."""
    if 0 < seconds < 60 and 60 % seconds == 0:
        return None, set(range(0, 60, seconds))
    if seconds % 60 == 0 and 0 < seconds <= 3600 and 3600 % seconds == 0:
        return set(range(0, 60, seconds // 60)), {0}
    raise ValueError(f"{name} must divide a minute, or be whole minutes dividing an hour; got {seconds}")
