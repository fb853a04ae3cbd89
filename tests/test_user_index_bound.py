"""The user index in Redis is bounded: old sessions that left Redis leave it too, and are still listed,
found and written to, from Postgres.

Shared Redis and Postgres, the run's schema and each test's own key prefix. Writes go through the HTTP
API, the outbox is drained in-process, ``sweep(backend, 0)`` evicts every flushed session and
``trim_user_indexes(backend, 0)`` trims every evicted, non-active session (a retention of 0 s), so
that the listing before and after can be compared exactly.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from session_svc.record.shapes import now_us
from session_svc.storage.resources import Backend
from tests import outbox_drain
from tests.helpers import (
    add_memory,
    add_message,
    end_session,
    error_json,
    get_session,
    list_messages,
    list_sessions,
    make_session,
    new_user,
    session_url,
    update_session,
)
from workers.expiry import sweep, trim_user_indexes
from workers.flush import Flusher


async def _everything(client: Any, user: str, **params: Any) -> dict[str, Any]:
    return await list_sessions(client, user, page=1, page_size=100, **params)


async def _paged(client: Any, user: str, page_size: int, **params: Any) -> list[dict[str, Any]]:
    """Every page of the listing at ``page_size``, concatenated; each page's total must agree."""
    items: list[dict[str, Any]] = []
    total = (await _everything(client, user, **params))["total"]
    page = 1
    while True:
        got = await list_sessions(client, user, page=page, page_size=page_size, **params)
        assert got["total"] == total, (page, page_size)
        if not got["sessions"]:
            return items
        assert len(got["sessions"]) == min(page_size, total - len(items)), (page, page_size)
        items += got["sessions"]
        page += 1


async def _old_and_new(client: Any, flusher: Flusher, backend: Backend, user: str) -> dict[str, str]:
    """Sessions of ``user``, named by role, oldest activity first: four old ones (three trimmed, one kept
    because it is active) and two recent ones still in Redis."""
    s: dict[str, str] = {}
    s["old_completed"] = (await make_session(client, user, title="old completed"))["session_id"]
    await add_message(client, s["old_completed"], user, content="first", tokens_used=3, cost_usd=0.25)
    await update_session(client, s["old_completed"], user, status="completed")
    s["old_active"] = (await make_session(client, user, title="old active"))["session_id"]
    s["old_archived"] = (await make_session(client, user, title="old archived"))["session_id"]
    await update_session(client, s["old_archived"], user, status="completed")
    await update_session(client, s["old_archived"], user, status="archived")
    s["old_ended"] = (await make_session(client, user, title="old ended"))["session_id"]
    await end_session(client, s["old_ended"], user)
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 4
    assert await trim_user_indexes(backend, 0) == 3
    s["new_active"] = (await make_session(client, user, title="new active"))["session_id"]
    s["new_completed"] = (await make_session(client, user, title="new completed"))["session_id"]
    await update_session(client, s["new_completed"], user, status="completed")
    return s


async def test_a_trimmed_index_lists_exactly_as_before_across_redis_and_postgres(
    client: Any, flusher: Flusher, backend: Backend, redis: Redis
) -> None:
    """Order (last activity, newest first), every page at every page size, total and active_only are
    what they were before the trim; the active old session stays in the index, the others leave it."""
    user = new_user()
    untrimmed = new_user()  # the same history, never trimmed: the reference
    s = await _old_and_new(client, flusher, backend, user)
    listing = await _everything(client, user)
    titles = [x["title"] for x in listing["sessions"]]
    assert titles == [
        "new completed",
        "new active",
        "old ended",
        "old archived",
        "old active",
        "old completed",
    ]
    assert listing["total"] == 6
    old = [x for x in listing["sessions"] if x["title"].startswith("old")]
    assert (
        old[-1]["message_count"] == 1 and old[-1]["total_cost"] == 0.25 and old[-1]["status"] == "completed"
    )

    uk = backend.keys.for_user(user)
    assert set(await redis.zrange(uk.sessions, 0, -1)) == {
        s["old_active"],
        s["new_active"],
        s["new_completed"],
    }
    assert await redis.hget(uk.trimmed, "n") == "3"

    for size in (1, 2, 3, 4, 5, 6, 7):
        assert await _paged(client, user, size) == listing["sessions"], size
    beyond = await list_sessions(client, user, page=3, page_size=3)
    assert beyond == {"sessions": [], "total": 6, "page": 3, "page_size": 3}

    active = await _everything(client, user, active_only="true")
    assert [x["title"] for x in active["sessions"]] == ["new active", "old active"]
    assert active["total"] == 2
    assert await _paged(client, user, 1, active_only="true") == active["sessions"]

    # The same requests on a user whose index was never trimmed give the same shapes.
    await make_session(client, untrimmed, title="x")
    assert (await _everything(client, untrimmed))["total"] == 1


async def test_listing_matches_the_untrimmed_listing_item_for_item(
    client: Any, flusher: Flusher, backend: Backend
) -> None:
    """The very same listing JSON before the trim (every session in the index, cold ones read from
    Postgres by id) and after it (the old ones read by keyset from Postgres)."""
    user = new_user()
    sids = []
    for i in range(5):
        sid = (await make_session(client, user, title=f"t{i}"))["session_id"]
        await add_message(client, sid, user, content=f"m{i}", tokens_used=i)
        if i % 2 == 0:
            await update_session(client, sid, user, status="completed")
        sids.append(sid)
    await outbox_drain.drain(flusher)
    await sweep(backend, 0)
    before = await _everything(client, user)
    pages_before = await _paged(client, user, 2)
    assert await trim_user_indexes(backend, 0) == 3
    assert await _everything(client, user) == before
    assert await _paged(client, user, 2) == pages_before == before["sessions"]


async def test_a_trimmed_session_is_read_and_written_from_postgres_and_counted_once(
    client: Any, flusher: Flusher, backend: Backend, redis: Redis
) -> None:
    user = new_user()
    s = await _old_and_new(client, flusher, backend, user)
    sid = s["old_completed"]
    uk = backend.keys.for_user(user)
    assert await redis.zscore(uk.sessions, sid) is None  # trimmed: Redis no longer knows it at all

    got = await get_session(client, sid, user)
    assert (got["title"], got["status"], got["message_count"]) == ("old completed", "completed", 1)
    assert [m["content"] for m in (await list_messages(client, sid, user))["messages"]] == ["first"]
    summary = await client.get(session_url(sid, "/summary"), params={"user_id": user})
    assert summary.status == 200
    # Writes: a completed session refuses messages (409, not 404: it was found) and takes memories.
    refused = await client.post(
        session_url(sid, "/messages"), params={"user_id": user}, json={"role": "user", "content": "x"}
    )
    assert await error_json(refused, 409)
    await add_memory(client, sid, user, memory_type="summary", content="looked back")

    # Back in Redis and in the index, no longer counted as trimmed: listed first, total unchanged.
    listing = await _everything(client, user)
    assert listing["total"] == 6
    assert listing["sessions"][0]["session_id"] == sid
    assert len({x["session_id"] for x in listing["sessions"]}) == 6
    assert await redis.hget(uk.trimmed, "n") == "2"
    for size in (1, 4):
        assert await _paged(client, user, size) == listing["sessions"]
    # Flushed and evicted again: the same listing, and the mark that kept its old row out is gone.
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 3
    assert await _everything(client, user) == listing
    assert sorted(await redis.hkeys(uk.trimmed)) == ["n", "w"]


async def test_another_users_trimmed_session_is_not_found(
    client: Any, flusher: Flusher, backend: Backend
) -> None:
    user, other = new_user(), new_user()
    s = await _old_and_new(client, flusher, backend, user)
    sid = s["old_completed"]
    for method, suffix, body in (
        ("GET", "", None),
        ("GET", "/messages", None),
        ("GET", "/memories", None),
        ("PUT", "", {"title": "mine"}),
        ("POST", "/memory", {"memory_type": "entity", "content": "mine"}),
    ):
        resp = await client.request(method, session_url(sid, suffix), params={"user_id": other}, json=body)
        assert await error_json(resp, 404) == {"detail": "Session not found"}, (method, suffix)
    assert (await get_session(client, sid, user))["title"] == "old completed"
    assert (await _everything(client, other))["total"] == 0


async def test_active_sessions_and_recent_ones_are_never_trimmed(
    client: Any, flusher: Flusher, backend: Backend, redis: Redis
) -> None:
    user = new_user()
    active = (await make_session(client, user))["session_id"]
    done = (await make_session(client, user))["session_id"]
    await update_session(client, done, user, status="completed")
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 2
    assert await trim_user_indexes(backend, 3600) == 0  # last active a moment ago: within retention
    assert await trim_user_indexes(backend, 0) == 1
    uk = backend.keys.for_user(user)
    assert await redis.zrange(uk.sessions, 0, -1) == [active]
    assert await redis.zrange(uk.active, 0, -1) == [active]
    assert await trim_user_indexes(backend, 0) == 0  # nothing left to look at
    assert [x["session_id"] for x in (await _everything(client, user))["sessions"]] == [done, active]


async def test_a_session_back_in_redis_is_not_trimmed(
    client: Any, flusher: Flusher, backend: Backend, redis: Redis
) -> None:
    """Left Redis, then written again before the trim ran: Redis holds what Postgres may not have yet,
    so it stays in the index (and listed); once it has left Redis again, a later trim takes it."""
    user = new_user()
    sid = (await make_session(client, user, title="back"))["session_id"]
    await update_session(client, sid, user, status="completed")
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1
    await add_memory(client, sid, user, memory_type="entity", content="again")  # rehydrates it
    await outbox_drain.drain(flusher)
    assert await trim_user_indexes(backend, 0) == 0
    uk = backend.keys.for_user(user)
    assert await redis.zscore(uk.sessions, sid) is not None
    listing = await _everything(client, user)
    assert ([x["session_id"] for x in listing["sessions"]], listing["total"]) == ([sid], 1)
    await add_memory(client, sid, user, memory_type="entity", content="and again")
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1
    assert await trim_user_indexes(backend, 0) == 1
    assert await redis.zscore(uk.sessions, sid) is None
    again = await _everything(client, user)
    assert ([x["session_id"] for x in again["sessions"]], again["total"]) == ([sid], 1)


async def test_a_long_backlog_is_trimmed_over_several_runs(
    client: Any, flusher: Flusher, backend: Backend, redis: Redis
) -> None:
    """Each run looks at a bounded number of pages and the next one goes on where it stopped (the
    first run after an upgrade has every older session to go through)."""
    user = new_user()
    # The run's schema holds the sessions of earlier tests too: start the window at this test's.
    await redis.set(backend.keys.trimmed_until, f"{now_us()}/")
    for i in range(3):
        sid = (await make_session(client, user, title=f"t{i}"))["session_id"]
        await end_session(client, sid, user)
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 3
    uk = backend.keys.for_user(user)
    for left in (2, 1, 0):
        assert await trim_user_indexes(backend, 0, page=1, pages=1) == 1
        assert await redis.zcard(uk.sessions) == left
    assert await trim_user_indexes(backend, 0, page=1, pages=1) == 0
    assert await redis.hget(uk.trimmed, "n") == "3"
    listing = await _everything(client, user)
    assert ([x["title"] for x in listing["sessions"]], listing["total"]) == (["t2", "t1", "t0"], 3)
