"""The cold path: sessions that left Redis (idle expiry, or keys lost) are served from Postgres, exactly.

Shared Redis and Postgres, this module's own schema and each test's own key prefix. Writes go through the
HTTP API, the outbox is drained in-process, and ``workers.expiry.sweep(backend, 0)`` evicts every idle,
fully flushed session, so the same requests can be compared before and after.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from session_svc.domain import store
from session_svc.record.fields import LIST_FIELDS, MemoryType
from session_svc.record.keys import Keys, bucket_of
from session_svc.storage import cold
from session_svc.storage.resources import Backend, pg_pool
from tests import outbox_drain, pg_rows, support
from tests.helpers import (
    SESSIONS,
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
from workers.expiry import sweep
from workers.flush import Flusher

MEMORY_TYPES = tuple(MemoryType)


@pytest.fixture(scope="module")
def db_schema(test_urls: Any) -> Iterator[str]:
    """This module's own schema (overrides the per-run one of conftest)."""
    schema = support.create_schema(test_urls.database_url)
    yield schema
    support.drop_schema(test_urls.database_url, schema)


async def answer(client: Any, path: str, **params: Any) -> tuple[int, Any]:
    resp = await client.get(path, params=params)
    return resp.status, await resp.json()


async def every_read(client: Any, user: str, sids: list[str]) -> dict[str, tuple[int, Any]]:
    """Every read the API offers on these sessions, their user's listing and the stats."""
    out: dict[str, tuple[int, Any]] = {}
    for sid in sids:
        p = {"user_id": user}
        out[f"get {sid}"] = await answer(client, session_url(sid), **p)
        out[f"summary {sid}"] = await answer(client, session_url(sid, "/summary"), **p)
        out[f"messages {sid}"] = await answer(client, session_url(sid, "/messages"), **p)
        for page in (1, 2, 3, 4):
            out[f"messages {sid} p{page}"] = await answer(
                client, session_url(sid, "/messages"), page=page, page_size=2, **p
            )
        out[f"memory {sid}"] = await answer(client, session_url(sid, "/memory"), **p)
        out[f"memories {sid}"] = await answer(client, session_url(sid, "/memories"), **p)
        out[f"memories {sid} p2"] = await answer(
            client, session_url(sid, "/memories"), page=2, page_size=1, **p
        )
        for t in MEMORY_TYPES:
            out[f"memory {sid} {t}"] = await answer(client, session_url(sid, "/memory"), memory_type=t, **p)
            out[f"memories {sid} {t}"] = await answer(
                client, session_url(sid, "/memories"), memory_type=t, **p
            )
    listing = f"/api/v1/users/{user}/sessions"
    out["listing"] = await answer(client, listing)
    out["listing active"] = await answer(client, listing, active_only="true")
    out["listing p2"] = await answer(client, listing, page=2, page_size=2)
    out["stats"] = await answer(client, f"{SESSIONS}/stats")
    return out


async def session_keys_left(redis: Redis, keys: Keys, user: str, sid: str) -> list[str]:
    uk = keys.for_user(user)
    names = [uk.session(sid), uk.messages(sid), uk.memories(sid)]
    names += [uk.memory_index(sid, t) for t in ("*", *MEMORY_TYPES)]
    return [n for n in names if await redis.exists(n)]


async def make_history(client: Any, user: str) -> dict[str, str]:
    """Four sessions of one user in every state: active with messages and memories, ended, completed
    with a memory, and empty."""
    a = await make_session(
        client,
        user,
        title="Trip to Lisbon",
        metadata={"n": 1, "f": 1.5, "big": 1e20, "s": "ü✓", "list": [1, {"x": None}], "zeta": 0, "a": 1},
        conversation_data={"turns": [{"role": "user", "text": "hi"}], "flag": True},
        session_summary="planning",
    )
    sid = a["session_id"]
    for i, cost in enumerate((0.1, 0.2, 0.000001, 3, 0, 12.345678, 0.7)):
        role = ("user", "assistant")[i % 2]
        await add_message(
            client, sid, user, role=role, content=f"message {i} ✓", tokens_used=i * 3, cost_usd=cost
        )
    for t, content in (("preference", "window seat"), ("entity", "Lisbon"), ("preference", "aisle seat")):
        await add_memory(client, sid, user, memory_type=t, content=content, metadata={"c": content})
    await update_session(client, sid, user, metadata={"n": 2, "nested": {"b": [1.25, "x"]}})

    b = (await make_session(client, user, title="ended one"))["session_id"]
    await add_message(client, b, user, content="bye", cost_usd=0.5)
    await end_session(client, b, user)
    c = (await make_session(client, user, title="completed one"))["session_id"]
    await add_message(client, c, user, content="done", tokens_used=9)
    await update_session(client, c, user, status="completed")
    await add_memory(client, c, user, memory_type="summary", content="it went well")
    d = (await make_session(client, user, title="empty"))["session_id"]
    return {"active": sid, "ended": b, "completed": c, "empty": d}


async def test_evicted_sessions_answer_exactly_as_before(
    client: Any, redis: Redis, keys: Keys, flusher: Flusher, backend: Backend
) -> None:
    user = new_user()
    sids = await make_history(client, user)
    before = await every_read(client, user, list(sids.values()))
    assert before["listing"][1]["total"] == 4 and before["stats"][1]["total_sessions"] == 4

    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 4
    uk = keys.for_user(user)
    for sid in sids.values():
        assert await session_keys_left(redis, keys, user, sid) == []
        assert await redis.zscore(uk.sessions, sid) is not None  # still indexed: listed and found

    after = await every_read(client, user, list(sids.values()))
    assert after.keys() == before.keys()
    for name, got in after.items():
        assert got == before[name], name
    # Still cold: reading does not bring a session back into Redis.
    assert await session_keys_left(redis, keys, user, sids["active"]) == []


async def test_append_to_a_cold_session_continues_its_sequence(
    client: Any, redis: Redis, pg: Any, keys: Keys, flusher: Flusher, backend: Backend, db_schema: str
) -> None:
    user = new_user()
    sid = (await make_session(client, user, title="old"))["session_id"]
    sent = [await add_message(client, sid, user, content=f"m{i}", cost_usd=0.1) for i in range(1, 4)]
    mem = await add_memory(client, sid, user, memory_type="entity", content="Ada")
    newer = (await make_session(client, user, title="newer"))["session_id"]
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 2
    assert [s["session_id"] for s in (await list_sessions(client, user))["sessions"]] == [newer, sid]

    m4 = await add_message(client, sid, user, content="m4", tokens_used=4, cost_usd=0.2)
    assert m4["sequence"] == 4
    s = await get_session(client, sid, user)
    assert (s["message_count"], s["total_cost"], s["last_activity"]) == (4, 0.5, m4["created_at"])
    listing = await list_sessions(client, user)
    assert [x["session_id"] for x in listing["sessions"]] == [sid, newer] and listing["total"] == 2
    assert listing["sessions"][0]["message_count"] == 4
    assert (await list_messages(client, sid, user))["messages"] == [*sent, m4]
    paged = await list_messages(client, sid, user, page=2, page_size=3)
    assert (paged["messages"], paged["total"]) == ([m4], 4)
    memories = await client.get(session_url(sid, "/memories"), params={"user_id": user})
    assert (await memories.json())["memories"] == [mem]
    m5 = await add_message(client, sid, user, content="m5")
    assert m5["sequence"] == 5

    await outbox_drain.drain(flusher)
    stored = await pg_rows.pg_messages(pg, db_schema, sid)
    assert stored == [pg_rows.api_message(m) for m in [*sent, m4, m5]]
    final = await get_session(client, sid, user)
    v = int(await redis.hget(keys.for_user(user).session(sid), "v"))
    assert (await pg_rows.pg_sessions(pg, db_schema, [sid]))[sid] == pg_rows.api_session(final, 1, v)


async def test_a_session_created_a_moment_ago_is_listed_among_cold_ones(
    client: Any, flusher: Flusher, backend: Backend
) -> None:
    user = new_user()
    old = [(await make_session(client, user, title=f"old {i}"))["session_id"] for i in range(3)]
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 3
    fresh = await make_session(client, user, title="fresh")
    listing = await list_sessions(client, user)
    assert listing["total"] == 4
    assert [s["session_id"] for s in listing["sessions"]] == [fresh["session_id"], *reversed(old)]
    first = listing["sessions"][0]
    assert {k: first[k] for k in ("title", "created_at", "message_count")} == {
        "title": "fresh",
        "created_at": fresh["created_at"],
        "message_count": 0,
    }
    active = await list_sessions(client, user, active_only="true")
    assert active["total"] == 4 and active["sessions"][0]["session_id"] == fresh["session_id"]


async def test_another_user_gets_404_for_a_cold_session(
    client: Any, redis: Redis, keys: Keys, flusher: Flusher, backend: Backend
) -> None:
    owner, other = new_user(), new_user()
    sid = (await make_session(client, owner))["session_id"]
    await add_message(client, sid, owner, content="private")
    await add_memory(client, sid, owner, memory_type="custom", content="secret")
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1

    p = {"user_id": other}
    for suffix in ("", "/summary", "/messages", "/memory", "/memories"):
        resp = await client.get(session_url(sid, suffix), params=p)
        assert await error_json(resp, 404) == {"detail": "Session not found"}, suffix
    writes = [
        client.post(session_url(sid, "/messages"), params=p, json={"role": "user", "content": "x"}),
        client.post(session_url(sid, "/memory"), params=p, json={"memory_type": "custom", "content": "x"}),
        client.put(session_url(sid), params=p, json={"title": "mine"}),
        client.delete(session_url(sid), params=p),
    ]
    for request in writes:
        assert await error_json(await request, 404) == {"detail": "Session not found"}
    assert await session_keys_left(redis, keys, owner, sid) == []  # nothing was brought back
    assert (await get_session(client, sid, owner))["title"] == ""
    assert (await list_sessions(client, other))["total"] == 0


async def test_sweep_keeps_a_session_with_an_unflushed_write(
    client: Any, redis: Redis, keys: Keys, flusher: Flusher, backend: Backend
) -> None:
    user = new_user()
    flushed = (await make_session(client, user))["session_id"]
    dirty = (await make_session(client, user))["session_id"]
    await outbox_drain.drain(flusher)
    m = await add_message(client, dirty, user, content="not yet in Postgres")  # v > fv now
    assert await sweep(backend, 0) == 1
    assert await session_keys_left(redis, keys, user, flushed) == []
    assert await redis.exists(keys.for_user(user).session(dirty))
    assert (await list_messages(client, dirty, user))["messages"] == [m]

    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1
    assert await session_keys_left(redis, keys, user, dirty) == []
    assert (await list_messages(client, dirty, user))["messages"] == [m]


async def test_a_write_landing_between_candidate_selection_and_eviction_wins(
    client: Any, redis: Redis, keys: Keys, flusher: Flusher, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep picks idle candidates, then evicts them in a script that checks again. A session
    written in between (and even flushed already, so v == fv again) is no longer idle: it stays."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await outbox_drain.drain(flusher)

    candidates = backend.redis.zrangebyscore
    raced: list[dict[str, Any]] = []

    async def candidates_then_a_write(*args: Any, **kw: Any) -> Any:
        sids = await candidates(*args, **kw)
        if sid in sids and not raced:
            raced.append(await add_message(client, sid, user, content="raced the sweep"))
            await outbox_drain.drain(flusher)
        return sids

    monkeypatch.setattr(backend.redis, "zrangebyscore", candidates_then_a_write)
    assert await sweep(backend, 0) == 0
    assert raced, "the write did not land in the window"
    monkeypatch.undo()
    skey = keys.for_user(user).session(sid)
    assert await redis.exists(skey)
    assert (await redis.hget(skey, "v")) == (await redis.hget(skey, "fv"))
    assert (await list_messages(client, sid, user))["messages"] == raced
    assert await sweep(backend, 0) == 1  # idle from now on: the next sweep takes it


async def test_keys_deleted_by_hand_are_read_back_from_postgres(
    client: Any, redis: Redis, keys: Keys, flusher: Flusher
) -> None:
    user = new_user()
    sids = await make_history(client, user)
    sid = sids["active"]
    p = {"user_id": user}
    paths = [session_url(sid, x) for x in ("", "/summary", "/messages", "/memory", "/memories")]
    before = [await answer(client, path, **p) for path in paths]
    await outbox_drain.drain(flusher)

    uk = keys.for_user(user)
    await redis.delete(uk.session(sid), uk.messages(sid), uk.memories(sid))
    await redis.delete(*[uk.memory_index(sid, t) for t in ("*", *MEMORY_TYPES)])
    await redis.zrem(uk.sessions, sid)
    await redis.zrem(uk.active, sid)
    await redis.zrem(keys.hot(bucket_of(user, keys.buckets)), sid)

    assert [await answer(client, path, **p) for path in paths] == before
    m8 = await add_message(client, sid, user, content="back again")
    assert m8["sequence"] == 8
    assert (await list_messages(client, sid, user))["messages"][-2:] == [
        before[2][1]["messages"][-1],
        m8,
    ]
    assert (await list_sessions(client, user))["sessions"][0]["session_id"] == sid


async def test_a_session_with_a_dead_lettered_write_stays_in_redis(
    client: Any, redis: Redis, keys: Keys, flusher: Flusher, backend: Backend
) -> None:
    """An entry that cannot be written marks its session ``stuck``: the sweep keeps it in Redis (where
    the only copy of that write lives besides the dead letter) until an operator has looked."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await add_message(client, sid, user, content="fine")
    skey = keys.for_user(user).session(sid)
    v = await redis.hget(skey, "v")
    poison = {
        "k": "m", "sid": sid, "uid": user, "v": v, "seq": "2", "id": str(uuid.uuid4()),
        "role": "r" * 60,  # longer than the column: Postgres refuses it
        "content": "x", "type": "chat", "tokens": "0", "cost": "0", "meta": "{}", "ts": "1",
    }  # fmt: skip
    await redis.xadd(keys.outbox(bucket_of(user, keys.buckets)), poison)  # type: ignore[arg-type]  # redis-py: invariant dict
    await outbox_drain.drain(flusher)
    assert len(await outbox_drain.dead_letters(redis, keys)) == 1
    h = await redis.hgetall(skey)
    assert h["fv"] == h["v"] and h.get("stuck")
    assert await sweep(backend, 0) == 0
    assert await redis.exists(skey)


async def test_append_to_a_cold_session_survives_a_sweep_right_after_rehydration(
    client: Any, flusher: Flusher, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rehydrated session carries its old ``updated_at`` and ``fv == v``: to the sweep it looks idle
    and flushed. A sweep that runs between the rehydration and the write it was made for must not turn
    that write into a 404 (seen under load in test_fault's sweep race)."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    m1 = await add_message(client, sid, user, content="one")
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1

    rehydrate = store._rehydrate
    swept: list[int] = []

    async def rehydrate_then_sweep(*args: Any) -> None:
        await rehydrate(*args)
        if not swept:  # the expiry job lands in the window, once
            swept.append(await sweep(backend, 0))

    monkeypatch.setattr(store, "_rehydrate", rehydrate_then_sweep)
    resp = await client.post(
        session_url(sid, "/messages"), params={"user_id": user}, json={"role": "user", "content": "two"}
    )
    body = await resp.json()
    assert swept, "the sweep did not run in the window"
    assert resp.status == 200, body
    assert body["sequence"] == 2
    assert (await list_messages(client, sid, user))["messages"] == [m1, body]


async def test_a_stale_rehydration_does_not_reuse_a_sequence_number(
    client: Any, pg: Any, flusher: Flusher, backend: Backend, db_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Request A reads a cold session from Postgres to rehydrate it; before its REHYDRATE runs, request
    B rehydrates it, appends, is flushed and the session is evicted again (a short SESSION_HOT_TTL, or a
    slow A). A's rehydration from its stale read must not bring back the old counters: its message would
    take B's sequence number and be dropped by the worker (ON CONFLICT DO NOTHING) although acknowledged."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    m1 = await add_message(client, sid, user, content="one")
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1

    load_memory_docs = cold.load_memory_docs
    others: list[dict[str, Any]] = []
    interfered: list[bool] = []

    async def slow_load(*args: Any) -> Any:
        docs = await load_memory_docs(*args)
        if not interfered:  # A only: B's own rehydration goes straight through
            interfered.append(True)
            others.append(await add_message(client, sid, user, content="B"))
            await outbox_drain.drain(flusher)
            assert await sweep(backend, 0) == 1
        return docs

    monkeypatch.setattr(cold, "load_memory_docs", slow_load)
    resp = await client.post(
        session_url(sid, "/messages"), params={"user_id": user}, json={"role": "user", "content": "A"}
    )
    a = await resp.json()
    assert resp.status == 200, a
    monkeypatch.undo()
    assert others and others[0]["sequence"] == 2
    assert a["sequence"] == 3
    await outbox_drain.drain(flusher)
    stored = await pg_rows.pg_messages(pg, db_schema, sid)
    assert [m["content"] for m in stored] == ["one", "B", "A"]
    assert (await list_messages(client, sid, user))["messages"] == [m1, others[0], a]


async def test_rehydration_gives_up_after_its_retries_with_a_503(
    client: Any, pg: Any, flusher: Flusher, backend: Backend, db_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the session keeps changing: every time request A has read Postgres, another
    rehydrate-append-flush-evict cycle has happened. A reads again, a bounded number of times, then
    answers 503 "changing too fast" and writes nothing; the other writes all stand, and A's retry lands
    after them."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    m1 = await add_message(client, sid, user, content="one")
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1

    load_memory_docs = cold.load_memory_docs
    others: list[dict[str, Any]] = []
    busy = False

    async def always_stale(*args: Any) -> Any:
        nonlocal busy
        docs = await load_memory_docs(*args)
        # A's reads (the other request's own rehydration goes straight through), and at most 10: a
        # service that retried without end would then succeed, and fail this test rather than hang it.
        if not busy and len(others) < 10:
            busy = True
            try:
                others.append(await add_message(client, sid, user, content=f"B{len(others)}"))
                await outbox_drain.drain(flusher)
                assert await sweep(backend, 0) == 1
            finally:
                busy = False
        return docs

    monkeypatch.setattr(cold, "load_memory_docs", always_stale)
    resp = await client.post(
        session_url(sid, "/messages"), params={"user_id": user}, json={"role": "user", "content": "A"}
    )
    assert await error_json(resp, 503) == {"detail": "Session is changing too fast to load; retry"}
    monkeypatch.undo()
    assert len(others) == store._ATTEMPTS == 3  # one Postgres read per attempt, then it gave up
    assert [m["sequence"] for m in others] == [2, 3, 4]
    assert (await get_session(client, sid, user))["message_count"] == 4  # A wrote nothing

    retry = await add_message(client, sid, user, content="A")
    assert retry["sequence"] == 5
    await outbox_drain.drain(flusher)
    stored = await pg_rows.pg_messages(pg, db_schema, sid)
    assert [m["content"] for m in stored] == ["one", "B0", "B1", "B2", "A"]
    assert (await list_messages(client, sid, user))["messages"] == [m1, *others, retry]


async def test_a_cold_listing_reads_only_the_fields_it_shows(
    client: Any, flusher: Flusher, backend: Backend
) -> None:
    """A listing never shows ``conversation_data`` or ``metadata``, so a cold one does not read them
    from Postgres (up to 256 KiB each), and answers exactly as the hot one did."""
    user = new_user()
    big = {"history": "x" * 200_000}
    sid = (await make_session(client, user, conversation_data=big, metadata={"m": 1}))["session_id"]
    listing = f"/api/v1/users/{user}/sessions"
    before = await answer(client, listing)
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1

    assert backend.pg is not None
    rows = await cold.load_sessions(backend.pg, backend.schema, user, [sid])
    assert set(rows[sid]) == {"session_id", *LIST_FIELDS}
    assert await answer(client, listing) == before


async def test_a_pooled_query_is_one_round_trip_and_an_open_transaction_is_still_rolled_back(
    make_settings: Any,
) -> None:
    """The pool sends no reset query when a connection comes back (asyncpg's default one doubled the
    cost of every cold read), yet a transaction left open is rolled back before the next acquirer."""
    pool = await pg_pool(make_settings(db_pool_size=1))
    assert pool is not None
    seen: list[str] = []
    try:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda q: seen.append(q.query))
            await conn.fetchval("SELECT 1")
        async with pool.acquire() as conn:  # the same connection (pool of one)
            await conn.fetchval("SELECT 2")
        assert seen == ["SELECT 1", "SELECT 2"]

        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()  # left open on purpose (not a managed transaction)
            await conn.execute("SET LOCAL statement_timeout = 1234")
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SHOW statement_timeout") != "1234ms"
    finally:
        await pool.close()
