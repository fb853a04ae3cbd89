"""Memories: create, the most recent one (optionally of one type), and the paged list."""

from __future__ import annotations

import uuid
from typing import Any

from session_svc.record.fields import MemoryType
from tests.helpers import (
    MEMORY_FIELDS,
    add_memory,
    error_json,
    make_session,
    new_user,
    ok_json,
    parse_iso_z,
    session_url,
)


async def test_create_memory_keeps_the_type_as_sent(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    m = await add_memory(
        client,
        sid,
        user,
        memory_type="preference",
        content="User prefers dark mode UI",
        metadata={"category": "settings", "priority": "high"},
    )
    assert set(m) == MEMORY_FIELDS
    assert str(uuid.UUID(m["memory_id"])) == m["memory_id"]
    assert (m["session_id"], m["user_id"]) == (sid, user)
    assert m["memory_type"] == "preference"
    assert m["content"] == "User prefers dark mode UI"
    assert m["metadata"] == {"category": "settings", "priority": "high"}
    parse_iso_z(m["created_at"])

    got = await ok_json(await client.get(session_url(sid, "/memory"), params={"user_id": user}))
    assert got == m


async def test_every_memory_type_round_trips(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    for mtype in MemoryType:
        m = await add_memory(client, sid, user, memory_type=mtype, content=f"about {mtype}")
        got = await ok_json(
            await client.get(session_url(sid, "/memory"), params={"user_id": user, "memory_type": mtype})
        )
        assert (m["memory_type"], got["memory_type"], got["memory_id"]) == (mtype, mtype, m["memory_id"])


async def test_get_memory_returns_the_most_recent_overall_and_per_type(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    url = session_url(sid, "/memory")
    p1 = await add_memory(client, sid, user, memory_type="preference", content="p1")
    e1 = await add_memory(client, sid, user, memory_type="entity", content="e1")
    p2 = await add_memory(client, sid, user, memory_type="preference", content="p2")
    c1 = await add_memory(client, sid, user, memory_type="conversation", content="c1")
    assert len({p1["memory_id"], e1["memory_id"], p2["memory_id"], c1["memory_id"]}) == 4

    assert await ok_json(await client.get(url, params={"user_id": user})) == c1
    pref = await ok_json(await client.get(url, params={"user_id": user, "memory_type": "preference"}))
    assert pref == p2
    ent = await ok_json(await client.get(url, params={"user_id": user, "memory_type": "entity"}))
    assert ent == e1

    none = await client.get(url, params={"user_id": user, "memory_type": "summary"})
    assert await error_json(none, 404) == {"detail": "Memory not found"}


async def test_memory_not_found_when_the_session_has_none(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    resp = await client.get(session_url(sid, "/memory"), params={"user_id": user})
    assert await error_json(resp, 404) == {"detail": "Memory not found"}
    listing = await ok_json(await client.get(session_url(sid, "/memories"), params={"user_id": user}))
    assert listing == {"memories": [], "total": 0, "page": 1, "page_size": 50}


async def test_memories_list_is_newest_first_paged_and_filtered(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    url = session_url(sid, "/memories")
    kinds = ["preference", "entity", "preference", "custom", "preference"]
    made = [
        await add_memory(client, sid, user, memory_type=k, content=f"{k}{i}") for i, k in enumerate(kinds)
    ]

    everything = await ok_json(await client.get(url, params={"user_id": user}))
    assert [m["memory_id"] for m in everything["memories"]] == [m["memory_id"] for m in made[::-1]]
    assert everything["total"] == 5
    assert all(set(m) == MEMORY_FIELDS for m in everything["memories"])

    pages = [
        await ok_json(await client.get(url, params={"user_id": user, "page": p, "page_size": 2}))
        for p in (1, 2, 3)
    ]
    assert [[m["content"] for m in p["memories"]] for p in pages] == [
        ["preference4", "custom3"],
        ["preference2", "entity1"],
        ["preference0"],
    ]
    assert [(p["total"], p["page"], p["page_size"]) for p in pages] == [(5, 1, 2), (5, 2, 2), (5, 3, 2)]

    prefs = await ok_json(
        await client.get(url, params={"user_id": user, "memory_type": "preference", "page_size": 2})
    )
    assert [m["content"] for m in prefs["memories"]] == ["preference4", "preference2"]
    assert prefs["total"] == 3
    assert all(m["memory_type"] == "preference" for m in prefs["memories"])
