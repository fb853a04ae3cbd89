"""Unit tests: settings from the environment, and the Redis key layout (one hash slot per user bucket)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import socket
import subprocess
import sys
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis as redis_sync
from redis.crc import key_slot

from session_svc import migrate
from session_svc.http.app import create_app
from session_svc.record.fields import MEMORY_ALL
from session_svc.record.keys import Keys, bucket_of
from session_svc.settings import Settings, every_schedule
from tests.helpers import add_memory, add_message, make_session, new_user
from tests.servers import free_port
from tests.support import service_env
from workers.main import consumer_name

ROOT = Path(__file__).resolve().parent.parent


def test_from_env_reads_typed_values() -> None:
    s = Settings.from_env(
        {
            "REDIS_URL": "redis://example:6380/2",
            "DATABASE_URL": "postgresql://u@db:5433/x",
            "SERVICE_PORT": "9001",
            "LOG_LEVEL": "DEBUG",
            "DEBUG": "true",
            "KEY_PREFIX": "svc.a-1",
            "DB_SCHEMA": "prod_1",
            "REDIS_BUCKETS": "64",
            "REDIS_POOL_TIMEOUT": "1.5",
            "MAX_BODY_BYTES": "4096",
            "UNRELATED": "ignored",
        }
    )
    assert s.redis_url == "redis://example:6380/2"
    assert s.database_url == "postgresql://u@db:5433/x"
    assert s.service_port == 9001
    assert s.log_level == "DEBUG"
    assert s.debug is True
    assert s.key_prefix == "svc.a-1"
    assert s.db_schema == "prod_1"
    assert s.redis_buckets == 64
    assert s.redis_pool_timeout == 1.5
    assert s.max_body_bytes == 4096
    assert s.arq_url == "redis://example:6380/2"  # no ARQ_REDIS_URL: the queue shares REDIS_URL


def test_from_env_defaults_and_empty_values() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"SERVICE_PORT": "", "DEBUG": ""}) == Settings()
    defaults = Settings()
    assert (defaults.service_port, defaults.max_body_bytes, defaults.debug) == (8205, 1024 * 1024, False)


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("yes", True), ("ON", True), ("0", False), ("no", False)]
)
def test_from_env_booleans(raw: str, expected: bool) -> None:
    assert Settings.from_env({"DEBUG": raw}).debug is expected


def test_arq_url_can_be_separate() -> None:
    s = Settings.from_env({"REDIS_URL": "redis://a:1/0", "ARQ_REDIS_URL": "redis://b:2/0"})
    assert s.arq_url == "redis://b:2/0"


@pytest.mark.parametrize(
    "env",
    [
        {"SERVICE_PORT": "eighty"},
        {"DB_SCHEMA": "Robert'); DROP TABLE"},
        {"DB_SCHEMA": "UPPER"},
        {"KEY_PREFIX": "has space"},
        {"KEY_PREFIX": "a*b"},
        {"REDIS_BUCKETS": "0"},
        {"REDIS_BUCKETS": "1025"},
        {"SHUTDOWN_TIMEOUT": "0"},
        {"CONSUL_PORT": "0"},
        {"CONSUL_PORT": "65536"},
    ],
)
def test_from_env_refuses_bad_values(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Settings.from_env(env)


# Key layout -------------------------------------------------------------------------------------------


def test_every_key_of_a_users_session_shares_one_slot() -> None:
    keys = Keys("ss", 16)
    for _ in range(50):
        user = new_user()
        sid = str(uuid.uuid4())
        uk = keys.for_user(user)
        bucket = bucket_of(user, 16)
        names = [
            uk.session(sid),
            uk.messages(sid),
            uk.memories(sid),
            uk.memory_index(sid, MEMORY_ALL),
            uk.memory_index(sid, "preference"),
            uk.sessions,
            uk.active,
            uk.stats,
            uk.outbox,
            keys.stats(bucket),
            keys.outbox(bucket),
        ]
        assert len(set(names)) == len(names) - 2  # the last two are the bucket-level names of the same keys
        assert {key_slot(n.encode()) for n in names} == {key_slot(names[0].encode())}
        assert uk.stats == keys.stats(bucket) and uk.outbox == keys.outbox(bucket)
        assert uk.memory_index(sid) == uk.memory_index(sid, MEMORY_ALL)
        # Keys the Lua scripts build themselves from a prefix land on the same names.
        assert uk.tag + ":s:" + sid == uk.session(sid)
        assert uk.tag + ":yi:" + sid + ":" + "entity" == uk.memory_index(sid, "entity")


def test_users_spread_over_buckets_and_slots() -> None:
    keys = Keys("ss", 16)
    users = [new_user() for _ in range(400)]
    buckets = {bucket_of(u, 16) for u in users}
    assert buckets == set(range(16))
    slots = {key_slot(keys.for_user(u).sessions.encode()) for u in users}
    assert len(slots) == 16
    # Tricky user ids cannot move their keys out of the bucket's slot: the tag comes first.
    for odd in ("{b03}", "a}b{c", "x:{y}", "ü{}"):
        uk = keys.for_user(odd)
        assert key_slot(uk.sessions.encode()) == key_slot(uk.session("s").encode())
        assert key_slot(uk.active.encode()) == key_slot(uk.stats.encode())


async def test_keys_written_by_the_service_share_the_users_slot(
    client: Any, redis: Any, settings: Any
) -> None:
    users = [new_user() for _ in range(3)]
    for user in users:
        sid = (await make_session(client, user))["session_id"]
        await add_message(client, sid, user)
        await add_memory(client, sid, user, memory_type="entity")
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    written = [k async for k in redis.scan_iter(match=f"{settings.key_prefix}:*")]
    assert f"{settings.key_prefix}:meta" in written
    for user in users:
        tag = keys.for_user(user).tag
        mine = [k for k in written if k.startswith(tag + ":")]
        # session, messages, memories, two memory indexes, user index, active index, stats, outbox
        assert len(mine) >= 9, mine
        assert {key_slot(k.encode()) for k in mine} == {key_slot(tag.encode())}


async def test_the_api_refuses_to_start_on_data_written_with_another_bucket_count(
    aiohttp_client: Any, make_settings: Any, redis: Any, key_prefix: str
) -> None:
    """Every key's bucket is crc32(user_id) mod REDIS_BUCKETS: with another count, every user's data
    would be looked for under other keys. The first start records the count; a start with another one
    fails (and records nothing), a start with the same one goes on."""
    meta = f"{key_prefix}:meta"
    assert await redis.hget(meta, "buckets") is None
    await aiohttp_client(create_app(make_settings()))
    assert await redis.hget(meta, "buckets") == "16"

    wrong = f"REDIS_BUCKETS=8, but the data under prefix '{key_prefix}' was written with 16"
    with pytest.raises(RuntimeError, match=re.escape(wrong)):
        await aiohttp_client(create_app(make_settings(redis_buckets=8)))
    assert await redis.hget(meta, "buckets") == "16"
    client = await aiohttp_client(create_app(make_settings()))
    assert (await client.get("/health")).status == 200


def test_the_api_process_exits_on_data_written_with_another_bucket_count(
    settings: Settings, tmp_path: Path
) -> None:
    """The same as the process an operator starts (``python -m session_svc``): it stops at once with the
    reason, and never serves."""
    with redis_sync.Redis.from_url(settings.redis_url) as r:
        r.hset(f"{settings.key_prefix}:meta", "buckets", "16")
    port = free_port()
    env = service_env(
        REDIS_URL=settings.redis_url,
        DATABASE_URL=settings.database_url,
        DB_SCHEMA=settings.db_schema,
        KEY_PREFIX=settings.key_prefix,
        REDIS_BUCKETS="8",
        SERVICE_HOST="127.0.0.1",
        SERVICE_PORT=str(port),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "session_svc"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0, proc.stderr[-2000:]
    wrong = f"REDIS_BUCKETS=8, but the data under prefix '{settings.key_prefix}' was written with 16"
    assert wrong in proc.stderr, proc.stderr[-2000:]


# The run's Postgres schema ------------------------------------------------------------------------------


async def test_run_schema_has_the_guides_tables(pg: Any, db_schema: str) -> None:
    rows = await pg.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", db_schema
    )
    assert {"sessions", "session_messages", "session_memories"} <= {r["table_name"] for r in rows}
    assert await pg.fetchval("SELECT current_schema()") == db_schema


def test_migrations_applied_again_are_a_no_op(settings: Settings) -> None:
    migrate.upgrade(settings)  # the run's schema is already at head: must not fail or duplicate
    migrate.upgrade(settings)

    async def versions() -> list[str]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            rows = await conn.fetch(f'SELECT version_num FROM "{settings.db_schema}".alembic_version')
            return [r["version_num"] for r in rows]
        finally:
            await conn.close()

    assert len(asyncio.run(versions())) == 1


def test_every_setting_is_documented_in_the_env_example_and_the_configuration_page() -> None:
    root = Path(__file__).resolve().parent.parent
    example = (root / "config" / "session_svc.env.example").read_text()
    page = (root / "docs" / "configuration.md").read_text()
    names = [f.name.upper() for f in fields(Settings)]
    assert [n for n in names if not re.search(rf"^{n}=", example, re.M)] == []
    assert [n for n in names if f"`{n}`" not in page] == []


def _documented_defaults() -> dict[str, str]:
    """docs/configuration.md's tables (one per group of settings): variable -> default, where the
    default is a literal value."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    header = "| variable | default | meaning |"
    tables = [part.split("\n\n")[0] for part in page.split(header)[1:]]
    assert len(tables) >= 2, "docs/configuration.md: one table per group of settings"
    out: dict[str, str] = {}
    for table in tables:
        for row in table.splitlines()[2:]:
            _, names, default, *_ = row.split("|")
            if not default.strip().startswith("`"):  # "(= `REDIS_URL`)", "host-pid": said in words
                continue
            values = re.findall(r"`([^`]*)`", default)
            out.update(zip(re.findall(r"`([A-Z_]+)`", names), values, strict=True))
    return out


def test_documented_defaults_are_the_defaults() -> None:
    """The env example ("every variable with its default") and docs/configuration.md say what a setting
    is when it is not set; read the way the service reads its environment, each is the code's default."""
    defaults = Settings()
    example = dict(
        re.findall(r"^([A-Z_]+)=(.*)$", (ROOT / "config" / "session_svc.env.example").read_text(), re.M)
    )
    page = _documented_defaults()
    assert {"END_IDLE_AFTER_DAYS", "WORKER_METRICS_PORT", "SERVICE_PORT", "DEBUG", "AUTH_MODE"} <= set(page)
    for f in fields(Settings):
        name = f.name.upper()
        for where, documented in (("env example", example), ("docs/configuration.md", page)):
            if name in documented:
                value = getattr(Settings.from_env({name: documented[name]}), f.name)
                assert value == getattr(defaults, f.name), (where, name, documented[name])


def test_settings_that_are_off_by_default() -> None:
    """What is off (or derived) unless set. That 0 really means off is tested where it acts: the
    housekeeping job (test_housekeeping) and the worker's metrics endpoint (test_worker_process)."""
    d = Settings()
    assert (d.end_idle_after_days, d.archive_completed_after_days, d.worker_metrics_port) == (0, 0, 0)
    assert d.debug is False
    # Empty means "derived": arq's queue on REDIS_URL, the consumer named after host and pid.
    assert d.arq_redis_url == "" and d.arq_url == d.redis_url
    assert d.worker_name == "" and consumer_name(d) == f"{socket.gethostname()}-{os.getpid()}"
    assert consumer_name(dataclasses.replace(d, worker_name="w7")) == "w7"


def test_job_periods_become_cron_fields_or_are_refused() -> None:
    assert every_schedule(30) == (None, {0, 30})
    assert every_schedule(300) == ({0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55}, {0})
    for bad in (0, 7, 90, 7200):
        with pytest.raises(ValueError, match="SWEEP_EVERY_SECONDS"):
            Settings(sweep_every_seconds=bad)
    with pytest.raises(ValueError, match="REDIS_MEMORY_HIGH_WATER"):
        Settings(redis_memory_high_water=1.5)
