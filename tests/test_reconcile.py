"""Reconciliation: a session whose outbox entries were lost (say, a Redis failover dropped the tail of
the stream) is re-sent, so it still reaches Postgres and can still leave Redis."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from session_svc.storage.resources import Backend
from tests.helpers import add_memory, add_message, make_session, new_user
from tests.outbox_drain import drain
from tests.pg_rows import pg_messages
from workers import expiry
from workers.flush import Flusher


async def test_lost_outbox_entries_are_resent_and_reach_postgres(
    client: TestClient, backend: Backend, redis: Redis, pg: Any, flusher: Flusher, db_schema: str
) -> None:
    uid = new_user()
    sid = (await make_session(client, uid, title="t"))["session_id"]
    first = await add_message(client, sid, uid, role="user", content="flushed normally")
    await drain(flusher)
    outbox_key = backend.keys.for_user(uid).outbox
    before_loss = (await redis.xinfo_stream(outbox_key))["last-generated-id"]
    second = await add_message(client, sid, uid, role="assistant", content="its entry is lost", cost_usd=0.25)
    await add_memory(client, sid, uid, memory_type="entity", content="so is this one")
    lost = [eid for eid, _ in await redis.xrange(outbox_key, min="(" + before_loss)]
    assert len(lost) == 2
    await redis.xdel(outbox_key, *lost)
    await drain(flusher)
    assert [m["content"] for m in await pg_messages(pg, db_schema, sid)] == ["flushed normally"]

    # Sessions written recently are left alone: their entries may simply not be flushed yet.
    assert await expiry.reconcile(backend, stale_after_s=3600) == 0
    assert await expiry.reconcile(backend, stale_after_s=0) == 1
    await drain(flusher)

    rows = await pg_messages(pg, db_schema, sid)
    assert [(m["content"], m["sequence"]) for m in rows] == [(first["content"], 1), (second["content"], 2)]
    session = await pg.fetchrow(
        "SELECT message_count, total_cost, memory_count FROM sessions WHERE session_id = $1", sid
    )
    assert (session["message_count"], str(session["total_cost"]), session["memory_count"]) == (
        2,
        "0.250000",
        1,
    )
    assert (
        await pg.fetchval("SELECT memory_type FROM session_memories WHERE session_id = $1", sid) == "entity"
    )
    # Flushed now, so nothing more to re-send, and the session may leave Redis.
    assert await expiry.reconcile(backend, stale_after_s=0) == 0
    assert await expiry.sweep(backend, hot_ttl_s=0) == 1
