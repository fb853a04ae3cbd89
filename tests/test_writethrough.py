"""Write-through, end to end: HTTP writes -> outbox -> ``workers.flush.Flusher`` -> rows in Postgres.

Shared Redis and Postgres, this module's own schema (made by the migrations, dropped afterwards) and each
test's own key prefix. The flusher runs in-process, driven step by step (read / reclaim / flush) so that
replays, reordering and dead letters are exact rather than timed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from session_svc.record.keys import Keys, bucket_of
from session_svc.settings import Settings
from session_svc.storage import outbox
from session_svc.storage.outbox import GROUP
from tests import outbox_drain, pg_rows, support
from tests.helpers import (
    add_memory,
    add_message,
    end_session,
    get_session,
    make_session,
    new_user,
    ok_json,
    session_url,
    update_session,
)
from workers.expiry import sweep
from workers.flush import Flusher


@pytest.fixture(scope="module")
def db_schema(test_urls: Any) -> Iterator[str]:
    """This module's own schema (overrides the per-run one of conftest)."""
    schema = support.create_schema(test_urls.database_url)
    yield schema
    support.drop_schema(test_urls.database_url, schema)


async def health(client: Any) -> dict[str, Any]:
    return await ok_json(await client.get("/health/detailed"))


def message_entry(sid: str, uid: str, **over: str) -> dict[str, str]:
    """An outbox message entry as APPEND_MESSAGE writes it (fields as strings)."""
    entry = {
        "k": "m",
        "sid": sid,
        "uid": uid,
        "v": "2",
        "seq": "1",
        "id": str(uuid.uuid4()),
        "role": "user",
        "content": "injected",
        "type": "chat",
        "tokens": "1",
        "cost": "0",
        "meta": "{}",
        "ts": "1700000000000000",
    }
    entry.update(over)
    return entry


async def test_http_writes_reach_postgres_as_the_api_answered(
    client: Any, redis: Redis, pg: Any, keys: Keys, flusher: Flusher, db_schema: str
) -> None:
    user = new_user()
    writes = 0
    s = await make_session(
        client,
        user,
        title="First title",
        metadata={"source": "e2e"},
        conversation_data={"turns": [1, 2], "nested": {"a": None, "b": 2.5}},
        session_summary="nothing yet",
    )
    sid = s["session_id"]
    await update_session(
        client, sid, user, title="Renamed", metadata={"model": "gpt-4", "temperature": 0.7, "tags": ["a"]}
    )
    writes += 2
    sent = [
        ("user", "chat", "Hello", 5, 0.1),
        ("assistant", "chat", "Hi there", 7, 0.2),
        ("system", "system", "be nice", 0, 0),
        ("tool_call", "tool_call", '{"q": 1}', 11, 0.000001),
        ("tool_result", "tool_result", "ünïcödé ✓ 🚀", 3, 12.345678),
    ]
    msgs = []
    for i, (role, mtype, content, tokens, cost) in enumerate(sent):
        msgs.append(
            await add_message(
                client,
                sid,
                user,
                role=role,
                message_type=mtype,
                content=content,
                tokens_used=tokens,
                cost_usd=cost,
                metadata={"i": i},
            )
        )
    mtypes = ("preference", "entity", "summary", "custom", "conversation", "preference")
    mems = [
        await add_memory(client, sid, user, memory_type=t, content=f"{t} {i}", metadata={"i": i})
        for i, t in enumerate(mtypes)
    ]
    writes += len(sent) + len(mtypes)

    ended = (await make_session(client, user, title="to end"))["session_id"]
    ended_msg = await add_message(client, ended, user, content="bye", tokens_used=1, cost_usd=0.5)
    await end_session(client, ended, user)
    await end_session(client, ended, user)  # a no-op: writes nothing
    done = (await make_session(client, user, title="to complete"))["session_id"]
    await update_session(client, done, user, status="completed")
    done_mem = await add_memory(client, done, user, memory_type="summary", content="it went well")
    writes += 6

    h = await health(client)
    assert h["outbox_backlog"] == writes  # one outbox entry per acknowledged write, no more
    assert h["dead_letters"] == 0

    async def lag() -> float:
        return float((await health(client))["outbox_lag_seconds"])

    assert await support.eventually(lag, "a positive outbox lag") > 0

    final = {x: await get_session(client, x, user) for x in (sid, ended, done)}
    assert final[sid]["total_cost"] == 12.645679  # exact: 0.1 + 0.2 summed as micro-dollars
    assert await outbox_drain.drain(flusher) == writes

    h = await health(client)
    assert (h["outbox_backlog"], h["outbox_lag_seconds"], h["dead_letters"]) == (0, 0, 0)
    assert h["database_connected"] is True

    versions = {}
    for x in final:
        stored = await redis.hgetall(keys.for_user(user).session(x))
        assert stored["fv"] == stored["v"]
        versions[x] = int(stored["v"])
    rows = await pg_rows.pg_sessions(pg, db_schema, list(final))
    memory_counts = {sid: len(mems), ended: 0, done: 1}
    assert rows == {x: pg_rows.api_session(final[x], memory_counts[x], versions[x]) for x in final}
    assert rows[sid]["total_cost"] == Decimal("12.645679")
    assert (rows[ended]["status"], rows[ended]["is_active"]) == ("ended", False)
    assert (rows[done]["status"], rows[done]["is_active"]) == ("completed", False)
    assert rows[sid]["title"] == "Renamed"

    stored_msgs = await pg_rows.pg_messages(pg, db_schema, sid)
    assert stored_msgs == [pg_rows.api_message(m) for m in msgs]
    assert [m["sequence"] for m in stored_msgs] == [1, 2, 3, 4, 5]
    assert [m["cost_usd"] for m in stored_msgs] == [
        Decimal(x) for x in ("0.1", "0.2", "0", "0.000001", "12.345678")
    ]
    assert await pg_rows.pg_messages(pg, db_schema, ended) == [pg_rows.api_message(ended_msg)]

    stored_mems = await pg_rows.pg_memories(pg, db_schema, sid)
    assert stored_mems == [pg_rows.api_memory(m, i) for i, m in enumerate(mems, 1)]
    assert [m["memory_type"] for m in stored_mems] == list(mtypes)
    assert await pg_rows.pg_memories(pg, db_schema, done) == [pg_rows.api_memory(done_mem, 1)]


async def test_replayed_and_reordered_batches_leave_the_same_rows(
    client: Any,
    redis: Redis,
    pg: Any,
    keys: Keys,
    flusher: Flusher,
    db_schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = new_user()
    sid = (await make_session(client, user, title="v1"))["session_id"]
    await add_message(client, sid, user, content="one", cost_usd=0.25)
    await add_message(client, sid, user, content="two")
    await add_memory(client, sid, user, memory_type="entity", content="Ada")
    skey = keys.for_user(user).session(sid)

    await flusher.ensure_groups()
    first = await flusher.read()
    assert len(first) == 4
    stale = await redis.hgetall(skey)  # the session as a slow worker saw it with the first batch
    await flusher.flush(first)

    await update_session(client, sid, user, title="v2", metadata={"x": 1})
    await add_message(client, sid, user, content="three", cost_usd=0.75)
    await add_memory(client, sid, user, memory_type="summary", content="short")
    second = await flusher.read()
    assert len(second) == 3
    await flusher.flush(second)
    want = await pg_rows.pg_snapshot(pg, db_schema)
    current = await get_session(client, sid, user)

    # Replays (a worker killed between COMMIT and XACK) and reordering (newest batch first).
    await flusher.flush(second)
    await flusher.flush(first)
    await flusher.flush(list(reversed(first + second)))
    assert await pg_rows.pg_snapshot(pg, db_schema) == want

    # An older version of the session written after a newer one: the version guard keeps the newer.
    read_records = flusher._read_records

    async def stale_snapshots(versions: Any, entries: Any) -> Any:
        _snapshots, content = await read_records(versions, entries)
        return [stale], content

    monkeypatch.setattr(flusher, "_read_records", stale_snapshots)
    await flusher.flush(first)
    assert await pg_rows.pg_snapshot(pg, db_schema) == want

    row = (await pg_rows.pg_sessions(pg, db_schema, [sid]))[sid]
    v = int(await redis.hget(skey, "v"))
    assert row == pg_rows.api_session(current, 2, v)
    assert row["title"] == "v2" and row["total_cost"] == Decimal("1")
    assert [m["sequence"] for m in await pg_rows.pg_messages(pg, db_schema, sid)] == [1, 2, 3]
    assert [m["seq"] for m in await pg_rows.pg_memories(pg, db_schema, sid)] == [1, 2]
    assert await redis.hget(skey, "fv") == str(v)  # a replay of older entries never lowers fv
    assert (await outbox.backlog(redis, keys)).entries == 0


async def test_malformed_entry_is_dead_lettered_and_the_rest_is_written(
    client: Any, redis: Redis, pg: Any, keys: Keys, flusher: Flusher, db_schema: str
) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    m1 = await add_message(client, sid, user, content="before")
    bad_id = await redis.xadd(keys.outbox(bucket_of(user, keys.buckets)), {"k": "m", "sid": sid})
    m2 = await add_message(client, sid, user, content="after")

    await outbox_drain.drain(flusher)

    dead = await outbox_drain.dead_letters(redis, keys)
    assert [d["outbox_id"] for d in dead] == [bad_id]
    assert await pg_rows.pg_messages(pg, db_schema, sid) == [pg_rows.api_message(m) for m in (m1, m2)]
    h = await health(client)
    assert (h["dead_letters"], h["outbox_backlog"]) == (1, 0)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"seq": "not-a-number"}, id="message-seq-not-an-integer"),
        pytest.param({"v": "x"}, id="message-version-not-an-integer"),
        pytest.param({"k": "y", "doc": "not json"}, id="memory-doc-not-json"),
        pytest.param({"k": "y", "doc": '{"content": "no id"}'}, id="memory-doc-without-fields"),
    ],
)
async def test_entry_with_unparsable_values_is_dead_lettered_not_fatal(
    client: Any, redis: Redis, pg: Any, keys: Keys, flusher: Flusher, db_schema: str, bad: dict[str, str]
) -> None:
    """An entry with every field present but a value the worker cannot parse is a dead letter too: it
    must neither stop the batch it is in nor escape ``flush`` (which would end the worker's loop)."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    m1 = await add_message(client, sid, user, content="before")
    bad_id = await redis.xadd(keys.outbox(bucket_of(user, keys.buckets)), message_entry(sid, user, **bad))  # type: ignore[arg-type]  # redis-py: invariant dict
    m2 = await add_message(client, sid, user, content="after")

    await outbox_drain.drain(flusher)

    assert [d["outbox_id"] for d in await outbox_drain.dead_letters(redis, keys)] == [bad_id]
    assert await pg_rows.pg_messages(pg, db_schema, sid) == [pg_rows.api_message(m) for m in (m1, m2)]
    assert (await health(client))["outbox_backlog"] == 0


async def test_unwritable_entry_is_dead_lettered_after_max_deliveries(
    client: Any, redis: Redis, pg: Any, keys: Keys, flusher: Flusher, db_schema: str
) -> None:
    """A message for a session that exists neither in Postgres nor in Redis fails on its own (foreign
    key). It is retried on redelivery, dead-lettered after ``max_deliveries``, and blocks nothing."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    m1 = await add_message(client, sid, user, content="first", cost_usd=0.3)
    ghost = str(uuid.uuid4())
    ghost_id = await redis.xadd(keys.outbox(bucket_of(user, keys.buckets)), message_entry(ghost, user))  # type: ignore[arg-type]  # redis-py: invariant dict
    m2 = await add_message(client, sid, user, content="second")

    await flusher.ensure_groups()
    rounds = 0
    while rounds < 10:
        entries = await flusher.read() or await flusher.reclaim()
        if not entries:
            break
        await flusher.flush(entries)
        rounds += 1
    assert rounds == flusher.max_deliveries  # first delivery, then one redelivery per failure

    dead = await outbox_drain.dead_letters(redis, keys)
    assert [(d["outbox_id"], d["sid"]) for d in dead] == [(ghost_id, ghost)]
    assert dead[0]["error"]
    assert await pg_rows.pg_messages(pg, db_schema, sid) == [pg_rows.api_message(m) for m in (m1, m2)]
    h = await health(client)
    assert h["dead_letters"] >= 1 and h["outbox_backlog"] == 0
    # Dead-lettering must leave no trace of the unknown session in Redis (no half-made session hash).
    assert await redis.exists(keys.for_user(user).session(ghost)) == 0


async def test_worker_loop_survives_an_unwritable_entry(
    client: Any, redis: Redis, pool: asyncpg.Pool, pg: Any, keys: Keys, db_schema: str
) -> None:
    """``Flusher.run`` (the worker's loop): a poison entry ends up dead-lettered, the loop keeps going
    and writes what comes after it."""
    flusher = outbox_drain.make_flusher(redis, pool, keys, db_schema)
    stop = asyncio.Event()
    task = asyncio.create_task(flusher.run(stop, maintenance_every=0.3))
    try:
        user = new_user()
        sid = (await make_session(client, user))["session_id"]
        ghost_id = await redis.xadd(
            keys.outbox(bucket_of(user, keys.buckets)),
            message_entry(str(uuid.uuid4()), user),  # type: ignore[arg-type]  # redis-py: invariant dict
        )
        msgs = [await add_message(client, sid, user, content=f"m{i}") for i in range(3)]

        async def settled() -> bool:
            if task.done():
                return True
            b = await outbox.backlog(redis, keys)
            return b.entries == 0 and b.dead_letters == 1

        await support.eventually(settled, "the poison entry dead-lettered and the rest flushed")
        assert not task.done(), f"the flush loop died: {task.exception()!r}"
        more = await add_message(client, sid, user, content="later")

        async def flushed() -> bool:
            return len(await pg_rows.pg_messages(pg, db_schema, sid)) == 4 or task.done()

        await support.eventually(flushed, "the message after the poison entry flushed")
        assert not task.done(), f"the flush loop died: {task.exception()!r}"
        assert [d["outbox_id"] for d in await outbox_drain.dead_letters(redis, keys)] == [ghost_id]
        assert await pg_rows.pg_messages(pg, db_schema, sid) == [
            pg_rows.api_message(m) for m in [*msgs, more]
        ]
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), timeout=10)


NUL = "before\x00after"
NUL_REFUSED = "Value error, must not contain NUL characters (PostgreSQL cannot store them)"


@pytest.mark.parametrize(
    ("method", "suffix", "body", "field"),
    [
        pytest.param("POST", "/messages", {"role": "user", "content": NUL}, "content", id="message-content"),
        pytest.param(
            "POST",
            "/messages",
            {"role": "user", "content": "x", "metadata": {"k": [NUL]}},
            "metadata",
            id="message-metadata-value",
        ),
        pytest.param(
            "POST",
            "/messages",
            {"role": "user", "content": "x", "metadata": {NUL: 1}},
            "metadata",
            id="message-metadata-key",
        ),
        pytest.param(
            "POST", "/memory", {"memory_type": "custom", "content": NUL}, "content", id="memory-content"
        ),
        pytest.param(
            "POST",
            "/memory",
            {"memory_type": "custom", "content": "x", "metadata": {"k": NUL}},
            "metadata",
            id="memory-metadata",
        ),
        pytest.param("PUT", "", {"title": NUL}, "title", id="session-title"),
        pytest.param("PUT", "", {"session_summary": NUL}, "session_summary", id="session-summary"),
        pytest.param(
            "PUT", "", {"conversation_data": {"a": {"b": NUL}}}, "conversation_data", id="conversation-data"
        ),
        pytest.param("POST", "create", {"title": NUL}, "title", id="create-title"),
    ],
)
async def test_a_nul_character_is_refused_up_front_and_nothing_is_written(
    client: Any, redis: Redis, keys: Keys, method: str, suffix: str, body: dict[str, Any], field: str
) -> None:
    """PostgreSQL text and jsonb cannot hold U+0000, so a write carrying one could never reach Postgres:
    it is a 400 naming the field, and nothing reaches Redis or the outbox."""
    user = new_user()
    sid = (await make_session(client, user, title="kept"))["session_id"]
    params = {"user_id": user}

    async def observed() -> dict[str, Any]:
        return {
            "session": await get_session(client, sid, user),
            "messages": await ok_json(await client.get(session_url(sid, "/messages"), params=params)),
            "memories": await ok_json(await client.get(session_url(sid, "/memories"), params=params)),
            "listing": await ok_json(await client.get(f"/api/v1/users/{user}/sessions")),
            "outbox": await outbox.backlog(redis, keys),
        }

    before = await observed()
    assert before["outbox"].entries == 1  # the creation, not yet flushed
    if suffix == "create":
        resp = await client.post("/api/v1/sessions", json={"user_id": user, **body})
    else:
        resp = await client.request(method, session_url(sid, suffix), params=params, json=body)
    assert resp.status == 400, await resp.text()
    assert await resp.json() == {
        "detail": [{"type": "value_error", "loc": ["body", field], "msg": NUL_REFUSED}]
    }
    after = await observed()
    assert after["outbox"].entries == before["outbox"].entries
    assert {k: v for k, v in after.items() if k != "outbox"} == {
        k: v for k, v in before.items() if k != "outbox"
    }


@pytest.mark.parametrize("where", ["message content", "message metadata", "memory content", "session title"])
async def test_an_outbox_entry_with_a_nul_character_is_dead_lettered_and_blocks_nothing(
    client: Any,
    backend: Any,
    redis: Redis,
    pg: Any,
    keys: Keys,
    flusher: Flusher,
    db_schema: str,
    where: str,
) -> None:
    """The API refuses NUL (above), but the outbox may still hold one (written by an older version, or
    by hand into the session's hash). Postgres refuses it: that entry alone fails, is redelivered, and
    after ``max_deliveries`` goes to the dead-letter stream with Postgres' error; its session is marked
    ``stuck`` so the sweep keeps it in Redis, and the writes around it all reach Postgres."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    m1 = await add_message(client, sid, user, content="before")
    uk = keys.for_user(user)
    bad_sid = sid
    if where == "message content":
        bad_id = await redis.xadd(uk.outbox, message_entry(sid, user, seq="1000", content=NUL))  # type: ignore[arg-type]  # redis-py: invariant dict
    elif where == "message metadata":
        meta = orjson.dumps({"k": NUL}).decode()
        bad_id = await redis.xadd(uk.outbox, message_entry(sid, user, seq="1000", meta=meta))  # type: ignore[arg-type]  # redis-py: invariant dict
    elif where == "memory content":
        doc = {
            "memory_id": str(uuid.uuid4()),
            "memory_type": "custom",
            "content": NUL,
            "metadata": {},
            "created_at": "2026-01-01T00:00:00.000000Z",
        }
        entry = {
            "k": "y",
            "sid": sid,
            "uid": user,
            "v": "3",
            "seq": "1000",
            "doc": orjson.dumps(doc).decode(),
        }
        bad_id = await redis.xadd(uk.outbox, entry)  # type: ignore[arg-type]  # redis-py: invariant dict
    else:  # the session's own hash holds it: its creation entry cannot be flushed
        bad_sid = (await make_session(client, user))["session_id"]
        [(bad_id, _)] = await redis.xrevrange(uk.outbox, count=1)
        await redis.hset(uk.session(bad_sid), "title", NUL)
    m2 = await add_message(client, sid, user, content="after")

    await outbox_drain.drain(flusher)

    dead = await outbox_drain.dead_letters(redis, keys)
    assert [(d["outbox_id"], d["sid"]) for d in dead] == [(bad_id, bad_sid)]
    # Postgres' own refusal: the batch reaches it as JSON, and neither text nor jsonb can take the
    # escape \u0000 (a text parameter holding the byte 0x00 was CharacterNotInRepertoireError).
    assert dead[0]["error"].startswith("UntranslatableCharacterError("), dead[0]["error"]
    assert await pg_rows.pg_messages(pg, db_schema, sid) == [pg_rows.api_message(m) for m in (m1, m2)]
    assert await pg_rows.pg_memories(pg, db_schema, sid) == []
    assert await redis.hget(uk.session(bad_sid), "stuck") == bad_id
    h = await health(client)
    assert (h["dead_letters"], h["outbox_backlog"]) == (1, 0)
    # The sweep keeps the stuck session in Redis (its write is nowhere else); the others may go.
    await sweep(backend, 0)
    assert await redis.exists(uk.session(bad_sid)) == 1
    if bad_sid != sid:
        assert await redis.exists(uk.session(sid)) == 0
    if where == "session title":
        assert await pg_rows.pg_sessions(pg, db_schema, [bad_sid]) == {}


async def test_trim_drops_only_acknowledged_entries(
    client: Any, redis: Redis, pool: asyncpg.Pool, keys: Keys, db_schema: str
) -> None:
    """Never by length: pending (delivered, not acknowledged) and undelivered entries stay, even when
    the oldest pending entry is younger than acknowledged ones that may go. (Trimming is approximate:
    whole stream nodes below the floor go, so a few acknowledged entries may stay a while.)"""
    flusher = outbox_drain.make_flusher(redis, pool, keys, db_schema)
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    for i in range(80):
        await add_message(client, sid, user, content=f"m{i}")
    stream = keys.outbox(bucket_of(user, keys.buckets))
    await flusher.ensure_groups()
    delivered = await flusher.read()
    assert len(delivered) == 81
    slow = delivered[60]
    await flusher.flush([e for e in delivered if e is not slow])  # ``slow`` stays pending
    for i in range(2):
        await add_message(client, sid, user, content=f"late {i}")  # not delivered yet
    ids = [eid for eid, _ in await redis.xrange(stream)]

    await flusher.trim()
    kept = [eid for eid, _ in await redis.xrange(stream)]
    assert kept == ids[len(ids) - len(kept) :]  # a prefix went, nothing else
    assert slow.id in kept and len(kept) >= len(ids) - 60  # the pending one and all after it stay
    assert len(kept) < len(ids)  # acknowledged entries below the floor did go
    assert (await outbox.backlog(redis, keys)).entries == 3  # 1 pending + 2 undelivered

    await outbox_drain.drain(flusher)
    await flusher.trim()
    left = [eid for eid, _ in await redis.xrange(stream)]
    assert left == ids[len(ids) - len(left) :] and len(left) < len(kept)
    assert (await outbox.backlog(redis, keys)).entries == 0
    assert len(await pg_rows.pg_messages(pool, db_schema, sid)) == 82


async def test_trim_forgets_idle_consumers_with_nothing_pending(
    client: Any, redis: Redis, keys: Keys, pool: asyncpg.Pool, settings: Settings
) -> None:
    """Each worker start adds a consumer name to the group; names that have been idle long enough with
    nothing pending are dropped. Those still holding entries, those not idle long enough, and the
    worker's own name are kept.

    Every consumer here really exists in the group: on Redis 7.0 an XREADGROUP that delivers nothing
    creates no consumer, so one that has nothing pending is made by XGROUP CREATECONSUMER or by a read
    that delivered an entry which was then acknowledged."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await add_message(client, sid, user)
    stream = keys.for_user(user).outbox
    await outbox_drain.make_flusher(redis, pool, keys, settings.db_schema).ensure_groups()
    [[_, [(held, _)]]] = await redis.xreadgroup(GROUP, "dead-holding", {stream: ">"}, count=1)
    [[_, [(done, _)]]] = await redis.xreadgroup(GROUP, "dead-acked", {stream: ">"}, count=1)
    assert await redis.xack(stream, GROUP, done) == 1
    assert await redis.xgroup_createconsumer(stream, GROUP, "dead-empty") == 1

    async def consumers() -> dict[str, int]:
        return {c["name"]: int(c["pending"]) for c in await redis.xinfo_consumers(stream, GROUP)}

    made = {"dead-holding": 1, "dead-acked": 0, "dead-empty": 0}
    assert await consumers() == made

    # Idle for less than the default day: nobody goes.
    await outbox_drain.make_flusher(redis, pool, keys, settings.db_schema).trim()
    assert await consumers() == made

    pruner = outbox_drain.make_flusher(redis, pool, keys, settings.db_schema, consumer_idle_ms=0)
    assert await redis.xgroup_createconsumer(stream, GROUP, pruner.consumer) == 1  # its own name stays
    await pruner.trim()
    assert await consumers() == {"dead-holding": 1, pruner.consumer: 0}
    assert [r["message_id"] for r in await redis.xpending_range(stream, GROUP, "-", "+", 10)] == [held]
