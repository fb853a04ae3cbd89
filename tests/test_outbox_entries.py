"""Outbox entries point at the content they stand for (the message in the session's stream, the memory
in its hash) instead of copying it. What that asks of the rest:

- the sweep may evict a session only once every entry of it has been acknowledged, not merely once
  ``v == fv`` (batches of two workers commit out of order, and a later batch's commit must not let the
  sweep delete content an earlier batch still has to read);
- data written by the previous release, whose entries carried their content, is still flushed and
  evicted as it was (the upgrade path: nothing to migrate, the flusher reads both).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from session_svc.record.fields import Kind
from session_svc.record.keys import Keys, bucket_of
from session_svc.settings import Settings
from session_svc.storage.resources import Backend
from session_svc.storage.scripts import Scripts
from tests import outbox_drain, pg_rows, support
from tests.helpers import add_message, get_session, list_messages, make_session, new_user
from tests.servers import ApiProcess, free_port
from tests.support import ROOT
from workers.expiry import sweep
from workers.flush import Flusher

# The last commit of release 1.0's layout (outbox entries carrying the message or memory whole).
RELEASE_1_0 = "1d8d233"


def _backend(redis: Redis, pool: asyncpg.Pool, keys: Keys, schema: str) -> Backend:
    return Backend(redis, keys, Scripts(redis), pool, schema)


async def test_sweep_waits_for_an_earlier_batch_when_a_later_one_committed_first(
    client: Any, redis: Redis, pool: asyncpg.Pool, keys: Keys, settings: Settings, pg: Any
) -> None:
    """Worker A reads the session's first entries, worker B the later ones and commits first: the
    session is then at ``v == fv`` with A's entries still pending. The sweep must keep it (A reads its
    messages from the stream), and evict it once A has committed, with every message in Postgres."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    first = [await add_message(client, sid, user, content=f"early {i}") for i in range(2)]
    a = outbox_drain.make_flusher(redis, pool, keys, settings.db_schema)
    b = outbox_drain.make_flusher(redis, pool, keys, settings.db_schema)
    await a.ensure_groups()
    early = await a.read()
    assert [e.f["k"] for e in early] == [Kind.session, Kind.message, Kind.message]
    later = await add_message(client, sid, user, content="later")
    late = await b.read()
    assert [e.f["k"] for e in late] == [Kind.message]
    await b.flush(late)  # committed first: fv == v now
    skey = keys.for_user(user).session(sid)
    assert await redis.hget(skey, "fv") == await redis.hget(skey, "v")

    backend = _backend(redis, pool, keys, settings.db_schema)
    await asyncio.sleep(0.01)  # every write is older than the sweep's cutoff
    assert await sweep(backend, hot_ttl_s=0) == 0
    assert await redis.exists(skey) == 1

    await a.flush(early)
    assert await sweep(backend, hot_ttl_s=0) == 1
    rows = await pg_rows.pg_messages(pg, settings.db_schema, sid)
    assert [(r["sequence"], r["content"], r["message_id"]) for r in rows] == [
        (m["sequence"], m["content"], m["message_id"]) for m in [*first, later]
    ]
    assert (await redis.xlen(keys.dead(bucket_of(user, keys.buckets)))) == 0


async def test_data_written_by_release_1_0_is_flushed_read_back_and_evicted(
    client: Any,
    redis: Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    settings: Settings,
    pg: Any,
    flusher: Flusher,
    tmp_path: Path,
) -> None:
    """The previous release's API (its code taken from git) writes a session, messages, a memory and an
    update, and stops before anything is flushed; the outbox then holds its entries, content and all.
    This release's flusher writes them to Postgres as that API answered them, from the entries alone;
    this release's API appends to the same session (a pointer entry), and the sweep evicts it once all
    of it is flushed; read back from Postgres, the conversation is whole."""
    user = new_user()
    sid, answered, memory = await asyncio.to_thread(_write_with_release_1_0, settings, user, tmp_path)
    entries = [f for _id, f in await redis.xrange(keys.for_user(user).outbox) if f["sid"] == sid]
    assert [f["k"] for f in entries] == ["s", "m", "m", "m", "y", "s"]
    assert [f["content"] for f in entries if f["k"] == "m"] == [m["content"] for m in answered]
    assert "doc" in entries[4]  # the layout of 1.0: the entries carry their content
    # 1.0's sweep evicted a session at v == fv even while an earlier batch of its entries was still
    # pending (safe then: those entries carried their content). Stand for that: the session's copy of
    # the content is gone, and the entries must be written from what they carry.
    uk = keys.for_user(user)
    assert await redis.delete(uk.messages(sid), uk.memories(sid)) == 2

    await outbox_drain.drain(flusher)
    rows = await pg_rows.pg_messages(pg, settings.db_schema, sid)
    fields = ("message_id", "sequence", "content", "tokens_used", "cost_usd")
    assert [{k: r[k] for k in fields} for r in rows] == [{k: m[k] for k in fields} for m in answered]
    memories = await pg.fetch(
        f'SELECT memory_id, content FROM "{settings.db_schema}".session_memories WHERE session_id = $1', sid
    )
    assert [(r["memory_id"], r["content"]) for r in memories] == [(memory["memory_id"], "Ada")]

    newer = await add_message(client, sid, user, content="written by this release")
    assert newer["sequence"] == 4
    await outbox_drain.drain(flusher)
    await asyncio.sleep(0.01)
    assert await sweep(_backend(redis, pool, keys, settings.db_schema), hot_ttl_s=0) == 1
    assert await redis.exists(keys.for_user(user).session(sid)) == 0

    back = await get_session(client, sid, user)  # read back from Postgres
    assert (back["title"], back["message_count"], back["total_tokens"]) == ("renamed by 1.0", 4, 6)
    page = await list_messages(client, sid, user)
    assert [m["content"] for m in page["messages"]] == [*(m["content"] for m in answered), newer["content"]]


def _write_with_release_1_0(
    settings: Settings, user: str, tmp_path: Path
) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """Release 1.0's API (its code from git, on this test's prefix and schema) creates a session, three
    messages, a memory and an update, then stops. Returns the session id, the messages and the memory
    as it answered them."""
    old = tmp_path / "release-1.0"
    old.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", RELEASE_1_0, "session_svc"], capture_output=True, check=False
    )
    assert archive.returncode == 0, f"release 1.0 ({RELEASE_1_0}) is not in this clone: {archive.stderr!r}"
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    port = free_port()
    env = support.service_env(
        **support.api_settings(
            settings.redis_url, settings.database_url, settings.db_schema, settings.key_prefix, port
        ),
        PYTHONPATH=str(old),
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "api-1.0.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "session_svc"], cwd=old, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    api = ApiProcess(port, proc, log)
    try:
        api.wait_healthy()
        sid = _call(api, "POST", "/api/v1/sessions", {"user_id": user, "title": "from 1.0"})["session_id"]
        path = f"/api/v1/sessions/{sid}"
        answered = [
            _call(api, "POST", f"{path}/messages?user_id={user}",
                  {"role": "user", "content": f"written by 1.0 #{i}", "tokens_used": i, "cost_usd": 0.25})
            for i in range(1, 4)
        ]  # fmt: skip
        memory = _call(
            api, "POST", f"{path}/memory?user_id={user}", {"memory_type": "entity", "content": "Ada"}
        )
        _call(api, "PUT", f"{path}?user_id={user}", {"title": "renamed by 1.0"})
    finally:
        api.stop()
    return sid, answered, memory


def _call(api: ApiProcess, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        api.url + path, data=orjson.dumps(body), method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        got: dict[str, Any] = orjson.loads(resp.read())
        return got
