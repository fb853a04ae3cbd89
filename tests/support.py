"""Test plumbing shared by every module: polling, names, schemas and key prefixes of a test's own.

Private servers are in ``tests/servers.py``, the fault tests' rig of them in ``tests/rig.py``, the
in-process outbox drain in ``tests/outbox_drain.py``, Postgres row shapes in ``tests/pg_rows.py`` and
the model of acknowledged writes in ``tests/acked.py``. Nothing here touches
the shared servers beyond the schema and key prefix a test owns.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg
import redis as redis_sync

from session_svc import migrate
from session_svc.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_ENV = {name.upper() for name in Settings.__dataclass_fields__}

T = TypeVar("T")


# Polling -----------------------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T]], what: str, within: float = 20.0, interval: float = 0.02
) -> T:
    """Poll ``check`` until it returns something truthy; fail (AssertionError) after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what} (last: {result!r})")
        await asyncio.sleep(interval)


def wait_sync(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


# Schemas and key prefixes ------------------------------------------------------------------------------


def service_env(**settings: str) -> dict[str, str]:
    """The environment of a service subprocess: this process's, less every setting of the service (so a
    developer's exported REDIS_URL cannot leak into a test), plus ``settings`` (``REDIS_URL=...``)."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    env.update(settings)
    return env


def api_settings(redis_url: str, database_url: str, schema: str, prefix: str, port: int) -> dict[str, str]:
    """The settings of an API subprocess on loopback with a test's own schema and key prefix."""
    return {
        "REDIS_URL": redis_url, "DATABASE_URL": database_url, "DB_SCHEMA": schema, "KEY_PREFIX": prefix,
        "SERVICE_HOST": "127.0.0.1", "SERVICE_PORT": str(port), "SERVICE_PROCESSES": "1",
        "STATS_MAX_AGE_MS": "0",
    }  # fmt: skip


def new_name(stem: str) -> str:
    return f"{stem}{uuid.uuid4().hex[:10]}"


def create_schema(database_url: str, stem: str = "wt_") -> str:
    """A fresh schema migrated to head. Synchronous: ``migrate.upgrade`` runs its own event loop."""
    schema = new_name(stem)
    migrate.upgrade(Settings(database_url=database_url, db_schema=schema))
    return schema


def drop_schema(database_url: str, schema: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def delete_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key under ``prefix:`` (SCAN MATCH + DEL, never FLUSHDB: the server is shared);
    returns how many were deleted."""
    deleted = 0
    with redis_sync.Redis.from_url(redis_url) as r:
        batch: list[bytes] = []
        for key in r.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += r.delete(*batch)
                batch = []
        if batch:
            deleted += r.delete(*batch)
    return deleted
