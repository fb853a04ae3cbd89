"""How the service uses Redis: one round trip on the hot paths, no KEYS/SCAN, a listing that does not
read other users' sessions, and counters that stay exact under concurrent writes of every kind."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis as redis_sync

from session_svc.storage.redis_client import GuardedConnection
from tests.helpers import (
    add_memory,
    add_message,
    get_session,
    list_messages,
    list_sessions,
    make_session,
    new_user,
    ok_json,
    session_url,
    stats,
)


def count_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts what the service's Redis connections write: each write is one round trip, a pipeline
    (a coalesced batch of script calls) included. Each entry: the commands in that write."""
    writes: list[int] = []
    original = GuardedConnection.send_packed_command

    async def counting(self: GuardedConnection, command: Any, check_health: bool = True) -> None:
        writes.append(1 if isinstance(command, (bytes, str)) else len(list(command)))
        await original(self, command, check_health)

    monkeypatch.setattr(GuardedConnection, "send_packed_command", counting)
    return writes


async def test_hot_paths_are_one_round_trip(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    # Warm up: the first call of each script may have to load it.
    await add_message(client, sid, user)
    await get_session(client, sid, user)
    await list_messages(client, sid, user)
    writes = count_writes(monkeypatch)

    for call in (
        add_message(client, sid, user, content="second"),
        get_session(client, sid, user),
        list_messages(client, sid, user, page_size=2),
    ):
        writes.clear()
        await call
        assert len(writes) == 1, writes


def _private_stats(url: str) -> dict[str, int]:
    with redis_sync.Redis.from_url(url) as r:
        info = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


def _reset_stats(url: str) -> None:
    with redis_sync.Redis.from_url(url) as r:
        r.config_resetstat()


async def test_no_keys_or_scan_and_listing_does_not_read_other_sessions(
    make_client: Any, private_redis: Any
) -> None:
    """On a private Redis, so that INFO commandstats (which counts commands run by scripts) is ours."""
    server = private_redis()
    client = await make_client(redis_url=server.url, redis_buckets=1)  # everyone shares one bucket
    user = new_user()
    mine = [(await make_session(client, user))["session_id"] for _ in range(2)]

    async def listing_cost(others: int) -> int:
        for _ in range(others):
            await make_session(client, new_user())
        await list_sessions(client, user)  # warm
        _reset_stats(server.url)
        page = await list_sessions(client, user)
        assert {s["session_id"] for s in page["sessions"]} == set(mine)
        return sum(_private_stats(server.url).values())

    assert await listing_cost(5) == await listing_cost(60)

    # Every route once: none may enumerate the keyspace.
    _reset_stats(server.url)
    sid = mine[0]
    params = {"user_id": user}
    await add_message(client, sid, user)
    await add_memory(client, sid, user)
    for url in (
        session_url(sid),
        session_url(sid, "/summary"),
        session_url(sid, "/messages"),
        session_url(sid, "/memory"),
        session_url(sid, "/memories"),
    ):
        await ok_json(await client.get(url, params=params))
    await list_sessions(client, user, active_only="true")
    await stats(client)
    await ok_json(await client.get("/health/detailed"))
    await ok_json(await client.put(session_url(sid), params=params, json={"title": "x"}))
    await ok_json(await client.delete(session_url(sid), params=params))
    used = _private_stats(server.url)
    assert "evalsha" in used  # the counters are really ours
    assert not {"keys", "scan", "flushdb", "flushall"} & set(used), used


# Concurrency of the other writes ----------------------------------------------------------------------


async def test_concurrent_deletes_end_the_session_once(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await make_session(client, user)
    replies = await asyncio.gather(
        *(client.delete(session_url(sid), params={"user_id": user}) for _ in range(20))
    )
    bodies = [await ok_json(r) for r in replies]
    assert all(b == {"message": "Session ended successfully"} for b in bodies)
    body = await stats(client)
    assert (body["total_sessions"], body["active_sessions"]) == (2, 1)
    assert (await list_sessions(client, user, active_only="true"))["total"] == 1


async def test_concurrent_creates_and_memories_are_all_kept(client: Any) -> None:
    user = new_user()
    created = await asyncio.gather(*(make_session(client, user, title=f"s{i}") for i in range(40)))
    assert len({s["session_id"] for s in created}) == 40
    assert (await list_sessions(client, user, page_size=100))["total"] == 40
    assert (await stats(client))["total_sessions"] == 40

    sid = created[0]["session_id"]
    memories = await asyncio.gather(
        *(add_memory(client, sid, user, memory_type="entity", content=f"m{i}") for i in range(50))
    )
    listed = await ok_json(
        await client.get(session_url(sid, "/memories"), params={"user_id": user, "page_size": 200})
    )
    assert listed["total"] == 50
    assert {m["memory_id"] for m in listed["memories"]} == {m["memory_id"] for m in memories}
