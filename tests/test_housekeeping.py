"""The guide's housekeeping: end active sessions idle for N days, archive completed ones after M days.

Off by default (both settings 0), and each rule is off on its own at 0; when on, it changes only
sessions that are still idle, whether hot or cold, and the change reaches Postgres like any user's
write.

Housekeeping picks its candidates from the whole ``sessions`` table (every user, hot and cold), so each
test here gets its own schema: sessions that other tests left in the run's schema (aged or not) can
neither be counted nor changed here, whatever order the tests run in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from session_svc.record.shapes import now_us
from session_svc.settings import Settings
from session_svc.storage.resources import Backend
from tests import support
from tests.helpers import add_message, get_session, list_sessions, make_session, new_user, update_session
from tests.outbox_drain import drain
from workers import expiry
from workers.flush import Flusher
from workers.main import housekeeping_job

DAY_US = 86_400 * 1_000_000


@pytest.fixture
def db_schema(test_urls: Any) -> Iterator[str]:
    """This test's own schema (overrides the per-run one of conftest)."""
    schema = support.create_schema(test_urls.database_url)
    yield schema
    support.drop_schema(test_urls.database_url, schema)


async def age(b: Backend, redis: Redis, pg: Any, uid: str, sid: str, days: int) -> None:
    """Pretend the session's last activity was ``days`` ago, in Redis and in Postgres."""
    then = now_us() - days * DAY_US
    await redis.hset(b.keys.for_user(uid).session(sid), mapping={"last_activity": then})
    await pg.execute(
        "UPDATE sessions SET last_activity = 'epoch'::timestamptz + $2 * interval '1 microsecond' "
        "WHERE session_id = $1",
        sid,
        then,
    )


async def aged_sessions(
    client: TestClient, backend: Backend, redis: Redis, pg: Any, flusher: Flusher
) -> tuple[str, str, str]:
    """An active session idle for 10 days and a completed one idle for 40, flushed; and its user."""
    uid = new_user()
    idle = (await make_session(client, uid))["session_id"]
    done = (await make_session(client, uid))["session_id"]
    await update_session(client, done, uid, status="completed")
    await drain(flusher)
    await age(backend, redis, pg, uid, idle, days=10)
    await age(backend, redis, pg, uid, done, days=40)
    return uid, idle, done


async def test_housekeeping_is_off_by_default(
    client: TestClient, backend: Backend, redis: Redis, pg: Any, flusher: Flusher, settings: Settings
) -> None:
    defaults = Settings()
    assert (defaults.end_idle_after_days, defaults.archive_completed_after_days) == (0, 0)
    assert Settings.from_env({}) == defaults
    uid, idle, done = await aged_sessions(client, backend, redis, pg, flusher)
    # The cron job as the worker runs it, with the settings tests run with: the defaults.
    assert (settings.end_idle_after_days, settings.archive_completed_after_days) == (0, 0)
    assert await housekeeping_job({"settings": settings, "backend": backend}) == 0
    assert (await get_session(client, idle, uid))["status"] == "active"
    assert (await get_session(client, done, uid))["status"] == "completed"
    assert await drain(flusher) == 0  # nothing was written


@pytest.mark.parametrize(
    ("end_days", "archive_days", "idle_becomes", "done_becomes"),
    [(7, 0, "ended", "completed"), (0, 30, "active", "archived"), (7, 30, "ended", "archived")],
    ids=["only-end", "only-archive", "both"],
)
async def test_each_housekeeping_rule_is_off_at_zero(
    client: TestClient,
    backend: Backend,
    redis: Redis,
    pg: Any,
    flusher: Flusher,
    settings: Settings,
    end_days: int,
    archive_days: int,
    idle_becomes: str,
    done_becomes: str,
) -> None:
    uid, idle, done = await aged_sessions(client, backend, redis, pg, flusher)
    on = dataclasses.replace(
        settings, end_idle_after_days=end_days, archive_completed_after_days=archive_days
    )
    changed = await housekeeping_job({"settings": on, "backend": backend})
    assert changed == (idle_becomes != "active") + (done_becomes != "completed")
    assert (await get_session(client, idle, uid))["status"] == idle_becomes
    assert (await get_session(client, done, uid))["status"] == done_becomes


async def test_housekeeping_changes_only_idle_sessions(
    client: TestClient, backend: Backend, redis: Redis, pg: Any, flusher: Flusher
) -> None:
    uid = new_user()
    idle = (await make_session(client, uid))["session_id"]
    busy = (await make_session(client, uid))["session_id"]
    done = (await make_session(client, uid))["session_id"]
    await update_session(client, done, uid, status="completed")
    await drain(flusher)
    await age(backend, redis, pg, uid, idle, days=10)
    await age(backend, redis, pg, uid, done, days=40)
    await age(backend, redis, pg, uid, busy, days=10)
    # The busy session gets a message now: Postgres does not know yet, Redis does.
    await add_message(client, busy, uid, role="user", content="still here")

    changed = await expiry.housekeeping(backend, end_idle_after_days=7, archive_completed_after_days=30)

    assert changed == 2
    assert (await get_session(client, idle, uid))["status"] == "ended"
    assert (await get_session(client, busy, uid))["status"] == "active"
    assert (await get_session(client, done, uid))["status"] == "archived"
    active = await list_sessions(client, uid, active_only="true")
    assert [s["session_id"] for s in active["sessions"]] == [busy]
    await drain(flusher)
    rows = {r["session_id"]: r["status"] for r in await pg.fetch("SELECT session_id, status FROM sessions")}
    assert rows == {idle: "ended", busy: "active", done: "archived"}
    # Running it again changes nothing.
    assert await expiry.housekeeping(backend, end_idle_after_days=7, archive_completed_after_days=30) == 0


async def test_housekeeping_reaches_cold_sessions(
    client: TestClient, backend: Backend, redis: Redis, pg: Any, flusher: Flusher
) -> None:
    uid = new_user()
    sid = (await make_session(client, uid))["session_id"]
    await drain(flusher)
    await age(backend, redis, pg, uid, sid, days=10)
    # Untouched for 10 days, as the sweep sees it (the hash and the bucket's hot set).
    uk = backend.keys.for_user(uid)
    await redis.hset(uk.session(sid), "updated_at", str(now_us() - 10 * DAY_US))
    await redis.zadd(uk.hot, {sid: now_us() - 10 * DAY_US})
    assert await expiry.sweep(backend, hot_ttl_s=3600) == 1
    assert not await redis.exists(backend.keys.for_user(uid).session(sid))

    assert await expiry.housekeeping(backend, end_idle_after_days=7, archive_completed_after_days=0) == 1

    assert (await get_session(client, sid, uid))["status"] == "ended"
    await drain(flusher)
    assert await pg.fetchval("SELECT status FROM sessions WHERE session_id = $1", sid) == "ended"
