"""Without PostgreSQL (``Settings(database_url="")``): the app opens no pool at all and serves every
route from Redis. Nothing is ever cold: nothing is flushed, so the sweep evicts nothing, and a session
Redis does not know is simply not found (404, where with Postgres configured but down it is a 503).
Housekeeping has no candidates, and the worker refuses to start (it exists to write to Postgres).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from session_svc.http.appkeys import BACKEND
from tests.helpers import (
    add_memory,
    add_message,
    error_json,
    get_session,
    list_messages,
    list_sessions,
    make_session,
    new_user,
    ok_json,
    session_url,
    stats,
    update_session,
)
from workers import expiry
from workers.main import serve

NOT_FOUND = {"detail": "Session not found"}


async def test_without_postgres_the_api_serves_from_redis_and_nothing_is_cold(
    make_client: Any, redis: Redis
) -> None:
    client = await make_client(database_url="")
    backend = client.app[BACKEND]
    assert backend.pg is None
    user = new_user()
    sid = (await make_session(client, user, title="redis only"))["session_id"]
    m1 = await add_message(client, sid, user, content="one", tokens_used=3, cost_usd=0.25)
    m2 = await add_message(client, sid, user, content="two", tokens_used=4, cost_usd=0.5)
    memory = await add_memory(client, sid, user, memory_type="entity", content="Ada")
    s = await update_session(client, sid, user, session_summary="so far")
    assert (s["message_count"], s["total_tokens"], s["total_cost"]) == (2, 7, 0.75)
    assert (await list_messages(client, sid, user))["messages"] == [m1, m2]
    p = {"user_id": user}
    assert await ok_json(await client.get(session_url(sid, "/memory"), params=p)) == memory
    summary = await ok_json(await client.get(session_url(sid, "/summary"), params=p))
    assert (summary["has_memory"], summary["session_summary"]) == (True, "so far")
    assert [x["session_id"] for x in (await list_sessions(client, user))["sessions"]] == [sid]
    assert (await stats(client))["total_messages"] == 2

    health = await client.get("/health/detailed")
    body = await health.json()
    assert health.status == 200 and body["accepting_writes"] is True, body  # writes are safe in Redis
    assert (body["database_connected"], body["status"]) == (False, "degraded")
    assert "PostgreSQL unreachable: not configured" in body["reasons"]

    # Nothing is ever flushed, so nothing is evictable: the data stays in Redis.
    assert await expiry.sweep(backend, 0) == 0
    assert await get_session(client, sid, user) == s
    assert await expiry.housekeeping(backend, end_idle_after_days=1, archive_completed_after_days=1) == 0

    # A session Redis does not know cannot be cold: a 404, never a 503, for reads and writes alike.
    for target in (str(uuid.uuid4()), sid):
        if target == sid:  # its keys deleted by hand: without Postgres it is gone
            uk = backend.keys.for_user(user)
            await redis.delete(uk.session(sid), uk.messages(sid), uk.memories(sid))
        for method, suffix, body_ in (
            ("GET", "", None),
            ("GET", "/messages", None),
            ("GET", "/memories", None),
            ("POST", "/messages", {"role": "user", "content": "x"}),
            ("PUT", "", {"title": "x"}),
        ):
            resp = await client.request(method, session_url(target, suffix), params=p, json=body_)
            assert await error_json(resp, 404) == NOT_FOUND, (target, method, suffix)


async def test_the_worker_refuses_to_run_without_postgres(make_settings: Any) -> None:
    with pytest.raises(RuntimeError, match="DATABASE_URL is required by the worker"):
        await asyncio.wait_for(serve(make_settings(database_url=""), asyncio.Event()), 10)
