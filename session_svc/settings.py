"""Service settings: one immutable object, read from the environment only by ``__main__``.

Tests build ``Settings(...)`` explicitly; nothing imports-time reads the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    # arq cannot run on Redis Cluster; its queue may live on a separate standalone Redis.
    arq_redis_url: str = ""
    db_schema: str = "dev"
    service_host: str = "0.0.0.0"
    service_port: int = 8205
    log_level: str = "INFO"
    debug: bool = False
    # Every Redis key starts with this prefix; tests give each test its own.
    key_prefix: str = "ss"
    # Sessions are spread over this many hash-slot buckets (by user id). Fixed for the life of the data:
    # the service refuses to start against a Redis that was written with another value.
    redis_buckets: int = 16
    redis_max_connections: int = 64
    # Seconds a request waits for a free pooled connection / for Redis to answer before a 503.
    redis_pool_timeout: float = 5.0
    redis_socket_timeout: float = 5.0
    max_body_bytes: int = 1024 * 1024
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

    def __post_init__(self) -> None:
        # Both end up inside SQL identifiers and Redis keys: keep them to a safe alphabet.
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.db_schema):
            raise ValueError(f"DB_SCHEMA must be a lower-case SQL identifier, got {self.db_schema!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.key_prefix):
            raise ValueError(f"KEY_PREFIX must match [A-Za-z0-9_.-]{{1,64}}, got {self.key_prefix!r}")
        if not 1 <= self.redis_buckets <= 1024:
            raise ValueError("REDIS_BUCKETS must be between 1 and 1024")

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
            elif kind is float:
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        return cls(**values)  # type: ignore[arg-type]
