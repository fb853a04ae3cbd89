"""``session-svc``, the console script installed with the package: each command does what its help
says, against the shared servers with this test's own prefix and schema."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis as redis_sync

from tests import servers, support

CLI = str(Path(sys.executable).parent / "session-svc")


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], env=support.service_env(**env), capture_output=True, text=True, timeout=60
    )


def test_help_names_every_command() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("api", "worker", "migrate", "health", "check-config"):
        assert command in out.stdout
    assert "SERVICE_PORT" in run("api", "--help").stdout


def test_check_config_prints_the_effective_settings_with_secrets_masked() -> None:
    out = run(
        "check-config",
        REDIS_URL="redis://:s3cret@127.0.0.1:6379/0",
        DATABASE_URL="postgresql://app:hunter2@db:5432/sessions",
        SERVICE_PORT="9000",
        CONSUL_TOKEN="b1946ac9-2c6c-4ff1-8b1e-d9e8e1b2b0f4",
    )
    assert out.returncode == 0, out.stderr
    lines = {
        name: value.strip() for name, _, value in (line.partition(" ") for line in out.stdout.splitlines())
    }
    assert lines["REDIS_URL"] == "redis://:***@127.0.0.1:6379/0"
    assert lines["DATABASE_URL"] == "postgresql://app:***@db:5432/sessions"
    assert lines["SERVICE_PORT"] == "9000" and lines["REDIS_BUCKETS"] == "16"
    assert lines["CONSUL_TOKEN"] == "***" and lines["CONSUL_HOST"] == ""  # unset: shown empty
    assert "s3cret" not in out.stdout and "hunter2" not in out.stdout and "b1946ac9" not in out.stdout


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("REDIS_BUCKETS", "0", "REDIS_BUCKETS must be between 1 and 1024"),
        ("SERVICE_PORT", "eighty", "invalid literal for int()"),
        ("SWEEP_EVERY_SECONDS", "7", "SWEEP_EVERY_SECONDS must divide a minute"),
    ],
)
def test_check_config_refuses_an_invalid_environment(name: str, value: str, why: str) -> None:
    out = run("check-config", **{name: value})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("session-svc: invalid configuration:") and why in out.stderr


def test_migrate_then_api_then_health_then_sigterm(test_urls: Any, prefix_registry: Any) -> None:
    schema, prefix, port = support.new_name("cli_"), prefix_registry.new(), servers.free_port()
    env = support.api_settings(test_urls.redis_url, test_urls.database_url, schema, prefix, port)
    try:
        assert run("migrate", **env).returncode == 0
        assert run("migrate", **env).returncode == 0  # again: a no-op

        async def tables() -> set[str]:
            conn = await asyncpg.connect(test_urls.database_url)
            try:
                rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
            finally:
                await conn.close()
            return {r["tablename"] for r in rows}

        assert {"sessions", "session_messages", "session_memories"} <= asyncio.run(tables())
        assert run("health", **env).returncode == 1  # nothing listens yet
        api = subprocess.Popen([CLI, "api"], env=support.service_env(**env), stdout=subprocess.DEVNULL)
        try:
            support.wait_sync(lambda: run("health", **env).returncode == 0, "the API to answer /health", 30)
            assert run("health", "--url", f"http://127.0.0.1:{port}").returncode == 0
            api.send_signal(signal.SIGTERM)
            assert api.wait(timeout=20) == 0
        finally:
            if api.poll() is None:
                api.kill()
                api.wait()
        assert run("health", **env).returncode == 1
    finally:
        support.drop_schema(test_urls.database_url, schema)


def test_worker_command_runs_the_worker(test_urls: Any, prefix_registry: Any) -> None:
    """The worker it starts is the real one: it refuses data of another bucket count, with the reason."""
    prefix = prefix_registry.new()
    with redis_sync.Redis.from_url(test_urls.redis_url) as r:
        r.hset(f"{prefix}:meta", "buckets", "8")
    out = run("worker", REDIS_URL=test_urls.redis_url, DATABASE_URL=test_urls.database_url, KEY_PREFIX=prefix)
    assert out.returncode != 0
    assert f"REDIS_BUCKETS=16, but the data under prefix '{prefix}' was written with 8" in out.stderr
