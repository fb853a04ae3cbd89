"""The guide's housekeeping: end active sessions idle for N days, archive completed ones after M days.

Off by default; when on, it changes only sessions that are still idle, whether hot or cold, and the
change reaches Postgres like any user's write.
"""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from session_svc.resources import Backend
from session_svc.shapes import now_us
from tests.helpers import add_message, get_session, list_sessions, make_session, new_user, update_session
from tests.support import drain
from workers import expiry
from workers.flush import Flusher

DAY_US = 86_400 * 1_000_000


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


async def test_housekeeping_is_off_by_default_and_changes_only_idle_sessions(
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

    assert await expiry.housekeeping(backend, 0, 0) == 0
    assert (await get_session(client, idle, uid))["status"] == "active"

    changed = await expiry.housekeeping(backend, end_idle_after_days=7, archive_completed_after_days=30)

    assert changed == 2
    assert (await get_session(client, idle, uid))["status"] == "ended"
    assert (await get_session(client, busy, uid))["status"] == "active"
    assert (await get_session(client, done, uid))["status"] == "archived"
    active = await list_sessions(client, uid, active_only="true")
    assert [s["session_id"] for s in active["sessions"]] == [busy]
    await drain(flusher)
    rows = {r["session_id"]: r["status"] for r in await pg.fetch("SELECT session_id, status FROM sessions "
                                                                  "WHERE user_id = $1", uid)}  # fmt: skip
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
    await redis.hset(uk.session(sid), "updated_at", now_us() - 10 * DAY_US)
    await redis.zadd(uk.hot, {sid: now_us() - 10 * DAY_US})
    assert await expiry.sweep(backend, hot_ttl_s=3600) == 1
    assert not await redis.exists(backend.keys.for_user(uid).session(sid))

    assert await expiry.housekeeping(backend, end_idle_after_days=7, archive_completed_after_days=0) == 1

    assert (await get_session(client, sid, uid))["status"] == "ended"
    await drain(flusher)
    assert await pg.fetchval("SELECT status FROM sessions WHERE session_id = $1", sid) == "ended"
