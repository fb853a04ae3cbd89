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
# within 10% by moving slots, up to 10 masters); reads that visit every bucket (stats, the drain) cost
# in proportion, so more buckets are not free (docs/scale.md).
STANDALONE_BUCKETS = 16
CLUSTER_BUCKETS = 64

AUTH_MODES = ("none", "api_key", "jwt")
# HS256 keys shorter than the hash output are refused (RFC 7518, 3.2).
MIN_JWT_SECRET_BYTES = 32


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
    # Requests one API process works on at once; past it the next one is answered 503 with Retry-After
    # at once instead of joining a queue that grows without bound. /health, /health/detailed and
    # /metrics are always answered. High enough never to bite a healthy process (docs/decisions.md).
    max_inflight: int = 256
    # Seconds a client has to send a request's headers: counted from the connection's opening, and on a
    # kept-alive connection from the first byte of the next request. Late: 408 and the connection closed.
    header_timeout: float = 10.0
    # Seconds a client has, once the headers arrived, to send the whole body. Late: 408, connection closed.
    body_timeout: float = 30.0
    # Connections one API process keeps open; a new one past it is closed at once (established ones,
    # such as a load balancer's pool, are never sacrificed for it). Keep it below the open-files limit.
    max_connections: int = 1000
    # Seconds an Idempotency-Key's record (the first answer to a write) is kept: a retry with the same
    # key within this time gets that answer again and writes nothing.
    idempotency_ttl: int = 86_400
    # Milliseconds the totals of GET /api/v1/sessions/stats may be old: each API process reads every
    # bucket's counters at most this often and answers the same exact totals meanwhile (0 = every call).
    stats_max_age_ms: int = 1000
    # Writes per minute and user, a token bucket in the user's Redis bucket shared by every API process
    # (0 = no limit). The burst is the bucket's size: how many writes may come at once after a pause
    # (0 = as many as the rate per minute).
    rate_limit_writes_per_minute: int = 0
    rate_limit_burst: int = 0
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
    # Who may call the API (session_svc/http/auth.py, docs/api.md "Authentication"): none (a gateway in front
    # authenticates), api_key (trusted backends, keys from AUTH_API_KEYS and/or AUTH_API_KEYS_FILE) or
    # jwt (HS256 with AUTH_JWT_SECRET, or RS256/ES256 with the keys at AUTH_JWKS_URL).
    auth_mode: str = "none"
    auth_api_keys: str = ""
    auth_api_keys_file: str = ""
    auth_jwt_secret: str = ""
    auth_jwks_url: str = ""
    # Checked only when set: the token's aud must contain it, its iss must equal it.
    auth_jwt_audience: str = ""
    auth_jwt_issuer: str = ""
    # Seconds of clock skew allowed on exp and nbf.
    auth_jwt_leeway: float = 30.0
    # Verified tokens remembered until they expire (0: verify every request).
    auth_jwt_cache_size: int = 4096
    # The JWKS is fetched again in the background once this old; an unknown key id fetches it at once,
    # but never more often than every AUTH_JWKS_MIN_FETCH_INTERVAL seconds.
    auth_jwks_cache_seconds: float = 300.0
    auth_jwks_min_fetch_interval: float = 10.0
    # /health/detailed, /metrics, /docs and /openapi.json open to anyone (true), or only to an API key
    # or a token with the sessions:admin scope (false). /health is always open.
    auth_ops_open: bool = True
    # Write-through and expiry (workers).
    # A session untouched this long leaves Redis once everything it holds is in Postgres.
    session_hot_ttl: int = 3600
    # Guide housekeeping, off (0) by default: end active sessions idle this many days,
    # archive completed sessions this many days after their last update.
    end_idle_after_days: int = 0
    archive_completed_after_days: int = 0
    # A session that left Redis, is not active and was last active this many days ago leaves its user's
    # index in Redis too; the listing then finds it in Postgres (0 = keep every entry in Redis).
    user_index_retention_days: int = 30
    flush_batch_size: int = 500
    # An outbox entry delivered this many times without a commit goes to the dead-letter stream.
    flush_max_deliveries: int = 5
    # A pending entry idle this long (ms) is presumed orphaned by a dead worker and reclaimed.
    flush_claim_idle_ms: int = 30_000
    db_pool_size: int = 10
    # Seconds one PostgreSQL statement may take (asyncpg's command_timeout) before it fails as
    # unavailable: a cold read answers 503, the worker's batch is retried. It also bounds how long a
    # hung or black-holed Postgres holds a request or a batch.
    pg_command_timeout: float = 10.0
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
        if self.max_inflight < 1 or self.max_connections < 1:
            raise ValueError("MAX_INFLIGHT and MAX_CONNECTIONS must be at least 1")
        if not (self.header_timeout > 0 and self.body_timeout > 0):
            raise ValueError("HEADER_TIMEOUT and BODY_TIMEOUT must be more than 0 seconds")
        if not self.shutdown_timeout > 0:  # aiohttp takes 0 for "no timeout": wait forever
            raise ValueError("SHUTDOWN_TIMEOUT must be more than 0 seconds")
        if not self.pg_command_timeout > 0:  # asyncpg takes None/0 for "no timeout": wait forever
            raise ValueError("PG_COMMAND_TIMEOUT must be more than 0 seconds")
        if self.idempotency_ttl < 1:
            raise ValueError("IDEMPOTENCY_TTL must be at least 1 second")
        if self.stats_max_age_ms < 0:
            raise ValueError("STATS_MAX_AGE_MS must be 0 (read every time) or more")
        if self.rate_limit_writes_per_minute < 0 or self.rate_limit_burst < 0:
            raise ValueError(
                "RATE_LIMIT_WRITES_PER_MINUTE and RATE_LIMIT_BURST must be 0 (off/default) or more"
            )
        if not 0 < self.consul_port < 65536:
            raise ValueError("CONSUL_PORT must be a TCP port (1-65535)")
        self._check_auth()
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

    def _check_auth(self) -> None:
        """What can be told without I/O; the keys file is read (and refused if it holds no key) at
        start-up, by ``auth``."""
        if self.auth_mode not in AUTH_MODES:
            raise ValueError(f"AUTH_MODE must be one of {', '.join(AUTH_MODES)}, got {self.auth_mode!r}")
        if self.auth_mode == "api_key" and not (self.auth_api_keys.strip(", ") or self.auth_api_keys_file):
            raise ValueError("AUTH_MODE=api_key needs AUTH_API_KEYS or AUTH_API_KEYS_FILE")
        if self.auth_mode == "jwt":
            if bool(self.auth_jwt_secret) == bool(self.auth_jwks_url):
                raise ValueError(
                    "AUTH_MODE=jwt needs exactly one of AUTH_JWT_SECRET (HS256) and AUTH_JWKS_URL "
                    "(RS256/ES256)"
                )
            if self.auth_jwt_secret and len(self.auth_jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
                raise ValueError(f"AUTH_JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes (RFC 7518)")
            if self.auth_jwks_url and not self.auth_jwks_url.startswith(("https://", "http://")):
                raise ValueError("AUTH_JWKS_URL must be an http(s) URL")
        if self.auth_mode == "none" and not self.auth_ops_open:
            raise ValueError("AUTH_OPS_OPEN=false needs AUTH_MODE=api_key or jwt (nobody could be let in)")
        if not 0 <= self.auth_jwt_leeway <= 300:
            raise ValueError("AUTH_JWT_LEEWAY must be between 0 and 300 seconds")
        if self.auth_jwt_cache_size < 0:
            raise ValueError("AUTH_JWT_CACHE_SIZE must be 0 (off) or more")
        if not self.auth_jwks_min_fetch_interval > 0 or not self.auth_jwks_cache_seconds > 0:
            raise ValueError("AUTH_JWKS_CACHE_SECONDS and AUTH_JWKS_MIN_FETCH_INTERVAL must be above 0")

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
