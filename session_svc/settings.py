"""Service settings: one immutable object, read from the environment only by ``__main__``.

Tests build ``Settings(...)`` explicitly; nothing imports-time reads the environment.
"""

from __future__ import annotations

import os
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
