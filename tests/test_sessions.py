"""Sessions: create, get, update, end, the user listing, the summary and the service stats."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from session_svc.domain import store
from tests.helpers import (
    SESSION_FIELDS,
    SESSIONS,
    add_memory,
    add_message,
    end_session,
    get_session,
    list_sessions,
    make_session,
    new_user,
    ok_json,
    parse_iso_z,
    session_url,
    stats,
    update_session,
)


async def test_create_returns_every_session_field(client: Any) -> None:
    user = new_user()
    s = await make_session(
        client, user, title="Test Session", metadata={"source": "web_app", "device": "desktop"}
    )
    assert set(s) == SESSION_FIELDS
    assert str(uuid.UUID(s["session_id"])) == s["session_id"]
    assert s["user_id"] == user
    assert s["title"] == "Test Session"
    assert s["status"] == "active"
    assert s["is_active"] is True
    assert s["conversation_data"] == {}
    assert s["metadata"] == {"source": "web_app", "device": "desktop"}
    assert (s["message_count"], s["total_tokens"], s["total_cost"]) == (0, 0, 0.0)
    assert s["session_summary"] == ""
    created = parse_iso_z(s["created_at"])
    assert parse_iso_z(s["updated_at"]) >= created
    assert parse_iso_z(s["last_activity"]) >= created


async def test_create_defaults_and_get_round_trip(client: Any) -> None:
    user = new_user()
    s = await make_session(client, user)
    assert (s["title"], s["metadata"], s["conversation_data"], s["session_summary"]) == ("", {}, {}, "")
    got = await get_session(client, s["session_id"], user)
    assert got == s


async def test_each_create_is_a_new_session(client: Any) -> None:
    user = new_user()
    a = await make_session(client, user)
    b = await make_session(client, user)
    assert a["session_id"] != b["session_id"]
    assert (await list_sessions(client, user))["total"] == 2


async def test_put_updates_every_editable_field(client: Any) -> None:
    user = new_user()
    s = await make_session(
        client, user, title="old", metadata={"source": "web", "keep": 1}, conversation_data={"turn": 1}
    )
    sid = s["session_id"]
    updated = await update_session(
        client,
        sid,
        user,
        title="Updated Test Session",
        metadata={"updated": True, "version": 2},
        conversation_data={"turn": 2, "topic": "tea"},
        session_summary="talked about tea",
        status="completed",
    )
    assert set(updated) == SESSION_FIELDS
    assert updated["title"] == "Updated Test Session"
    # metadata and conversation_data are replaced, not merged
    assert updated["metadata"] == {"updated": True, "version": 2}
    assert updated["conversation_data"] == {"turn": 2, "topic": "tea"}
    assert updated["session_summary"] == "talked about tea"
    assert updated["status"] == "completed"
    assert updated["is_active"] is False
    assert parse_iso_z(updated["updated_at"]) >= parse_iso_z(s["updated_at"])
    assert updated["created_at"] == s["created_at"]
    assert await get_session(client, sid, user) == updated


async def test_put_leaves_fields_it_does_not_name(client: Any) -> None:
    user = new_user()
    s = await make_session(client, user, title="t", metadata={"a": 1}, conversation_data={"c": 2})
    sid = s["session_id"]
    await add_message(client, sid, user, tokens_used=4, cost_usd=0.5)
    updated = await update_session(client, sid, user, title="renamed")
    assert updated["title"] == "renamed"
    assert updated["metadata"] == {"a": 1}
    assert updated["conversation_data"] == {"c": 2}
    assert updated["status"] == "active"
    assert (updated["message_count"], updated["total_tokens"], updated["total_cost"]) == (1, 4, 0.5)
    # An empty update is accepted and changes nothing visible.
    again = await update_session(client, sid, user)
    assert {k: again[k] for k in ("title", "metadata", "message_count")} == {
        "title": "renamed",
        "metadata": {"a": 1},
        "message_count": 1,
    }


async def test_delete_ends_the_session_and_is_idempotent(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    before = await stats(client)
    assert await end_session(client, sid, user) == {"message": "Session ended successfully"}
    s = await get_session(client, sid, user)
    assert (s["status"], s["is_active"]) == ("ended", False)
    assert (await stats(client))["active_sessions"] == before["active_sessions"] - 1

    assert await end_session(client, sid, user) == {"message": "Session ended successfully"}
    s = await get_session(client, sid, user)
    assert (s["status"], s["is_active"]) == ("ended", False)
    after = await stats(client)
    assert after["active_sessions"] == before["active_sessions"] - 1  # not decremented twice
    assert after["total_sessions"] == before["total_sessions"]


# User listing -----------------------------------------------------------------------------------------


async def test_listing_is_newest_activity_first_and_a_message_moves_a_session_up(client: Any) -> None:
    user = new_user()
    ids = [(await make_session(client, user, title=f"s{i}"))["session_id"] for i in range(3)]
    listing = await list_sessions(client, user)
    assert [s["session_id"] for s in listing["sessions"]] == ids[::-1]

    await add_message(client, ids[0], user)
    listing = await list_sessions(client, user)
    assert [s["session_id"] for s in listing["sessions"]] == [ids[0], ids[2], ids[1]]
    top = listing["sessions"][0]
    assert top["message_count"] == 1
    assert {
        "session_id",
        "user_id",
        "status",
        "is_active",
        "message_count",
        "total_tokens",
        "total_cost",
        "created_at",
        "last_activity",
    } <= set(top)
    assert top["user_id"] == user
    parse_iso_z(top["created_at"])
    parse_iso_z(top["last_activity"])
    activity = [parse_iso_z(s["last_activity"]) for s in listing["sessions"]]
    assert activity == sorted(activity, reverse=True)

    # A memory is activity too; a title change is not.
    await add_memory(client, ids[1], user)
    await update_session(client, ids[0], user, title="renamed")
    listing = await list_sessions(client, user)
    assert [s["session_id"] for s in listing["sessions"]] == [ids[1], ids[0], ids[2]]


async def test_listing_pages_and_total_is_the_overall_count(client: Any) -> None:
    user = new_user()
    ids = [(await make_session(client, user))["session_id"] for _ in range(5)]
    pages = [await list_sessions(client, user, page=p, page_size=2) for p in (1, 2, 3, 4)]
    assert [len(p["sessions"]) for p in pages] == [2, 2, 1, 0]
    assert all(p["total"] == 5 for p in pages)
    assert [(p["page"], p["page_size"]) for p in pages] == [(1, 2), (2, 2), (3, 2), (4, 2)]
    seen = [s["session_id"] for p in pages for s in p["sessions"]]
    assert seen == ids[::-1]


async def test_listing_active_only(client: Any) -> None:
    user = new_user()
    ids = [(await make_session(client, user))["session_id"] for _ in range(4)]
    await end_session(client, ids[0], user)
    await update_session(client, ids[1], user, status="completed")
    active = await list_sessions(client, user, active_only="true")
    assert active["total"] == 2
    assert {s["session_id"] for s in active["sessions"]} == {ids[2], ids[3]}
    assert all(s["is_active"] and s["status"] == "active" for s in active["sessions"])
    everything = await list_sessions(client, user, active_only="false")
    assert everything["total"] == 4
    status_of = {s["session_id"]: (s["status"], s["is_active"]) for s in everything["sessions"]}
    assert status_of[ids[0]] == ("ended", False)
    assert status_of[ids[1]] == ("completed", False)
    # active_only with paging: total stays the overall active count
    page = await list_sessions(client, user, active_only="true", page_size=1)
    assert (page["total"], len(page["sessions"])) == (2, 1)


async def test_listing_of_a_user_without_sessions_is_empty(client: Any) -> None:
    other = new_user()
    await make_session(client, new_user())
    listing = await list_sessions(client, other)
    assert listing == {"sessions": [], "total": 0, "page": 1, "page_size": 50}


# Summary ----------------------------------------------------------------------------------------------


async def test_summary_fields_and_has_memory(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user, title="chat"))["session_id"]
    url = session_url(sid, "/summary")
    summary = await ok_json(await client.get(url, params={"user_id": user}))
    assert {
        "session_id",
        "user_id",
        "status",
        "message_count",
        "total_tokens",
        "total_cost",
        "has_memory",
        "is_active",
        "session_summary",
        "created_at",
        "last_activity",
    } <= set(summary)
    assert summary["has_memory"] is False
    assert (summary["session_id"], summary["user_id"], summary["status"]) == (sid, user, "active")
    assert summary["is_active"] is True
    assert summary["session_summary"] == ""

    await add_message(client, sid, user, tokens_used=7, cost_usd=0.25)
    await add_memory(client, sid, user)
    await update_session(client, sid, user, session_summary="user likes tea")
    summary = await ok_json(await client.get(url, params={"user_id": user}))
    assert summary["has_memory"] is True
    assert summary["session_summary"] == "user likes tea"
    assert (summary["message_count"], summary["total_tokens"], summary["total_cost"]) == (1, 7, 0.25)
    parse_iso_z(summary["created_at"])
    parse_iso_z(summary["last_activity"])


# Stats ------------------------------------------------------------------------------------------------


async def test_stats_route_is_not_taken_for_a_session_id(client: Any) -> None:
    body = await ok_json(await client.get(f"{SESSIONS}/stats"))
    assert set(body) == {
        "total_sessions",
        "active_sessions",
        "total_messages",
        "total_tokens",
        "total_cost",
        "average_messages_per_session",
    }
    assert "detail" not in body


async def test_stats_are_exact(client: Any) -> None:
    assert await stats(client) == {
        "total_sessions": 0,
        "active_sessions": 0,
        "total_messages": 0,
        "total_tokens": 0,
        "total_cost": 0.0,
        "average_messages_per_session": 0.0,
    }
    alice, bob = new_user(), new_user()
    a1 = (await make_session(client, alice))["session_id"]
    a2 = (await make_session(client, alice))["session_id"]
    b1 = (await make_session(client, bob))["session_id"]
    await add_message(client, a1, alice, tokens_used=10, cost_usd=0.25)
    await add_message(client, a1, alice, tokens_used=5, cost_usd=0.000001)
    await add_message(client, a2, alice, tokens_used=0)
    await add_message(client, b1, bob, tokens_used=7, cost_usd=0.1)
    await add_memory(client, b1, bob)  # memories are not messages
    body = await stats(client)
    assert body["total_sessions"] == 3
    assert body["active_sessions"] == 3
    assert body["total_messages"] == 4
    assert body["total_tokens"] == 22
    assert body["total_cost"] == 0.350001
    assert body["average_messages_per_session"] == pytest.approx(4 / 3, abs=0.005)

    await end_session(client, b1, bob)
    await update_session(client, a2, alice, status="completed")
    body = await stats(client)
    assert (body["total_sessions"], body["active_sessions"], body["total_messages"]) == (3, 1, 4)
    await update_session(client, a2, alice, status="archived")
    assert (await stats(client))["active_sessions"] == 1


async def test_stats_are_read_at_most_every_max_age_and_shared_meanwhile(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With STATS_MAX_AGE_MS, a dashboard polling the totals costs Redis one fan-out per period: calls
    within it answer the totals of the last read, concurrent ones share a read, and after the period
    the totals are exact again."""
    reads = 0
    read_stats = store._read_stats

    async def counted(b: Any) -> Any:
        nonlocal reads
        reads += 1
        return await read_stats(b)

    monkeypatch.setattr(store, "_read_stats", counted)
    client = await make_client(stats_max_age_ms=500)
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    before = await stats(client)
    assert reads == 1
    await add_message(client, sid, user, tokens_used=3)
    burst = await asyncio.gather(*(stats(client) for _ in range(20)))
    assert all(b == before for b in burst) and reads == 1  # within the period: the last read's totals
    await asyncio.sleep(0.55)
    burst = await asyncio.gather(*(stats(client) for _ in range(20)))
    assert all(b["total_messages"] == before["total_messages"] + 1 for b in burst)
    assert all(b["total_tokens"] == before["total_tokens"] + 3 for b in burst)
    assert reads == 2  # twenty calls at once: one read, shared


async def test_unicode_and_special_characters_round_trip(client: Any) -> None:
    user = "用户-" + new_user()
    title = '会话 "测试" \\ \u2603 🎉'
    metadata = {"来源": "网页", "nested": {"emoji": "👍", "quote": '"', "list": [1, 2.5, None, True]}}
    s = await make_session(client, user, title=title, metadata=metadata, conversation_data={"k": "\n\t"})
    got = await get_session(client, s["session_id"], user)
    assert (got["user_id"], got["title"], got["metadata"]) == (user, title, metadata)
    assert got["conversation_data"] == {"k": "\n\t"}
    m = await add_message(client, s["session_id"], user, content="你好世界 🌏\nline two")
    assert m["content"] == "你好世界 🌏\nline two"
    listing = await list_sessions(client, user)
    assert [x["title"] for x in listing["sessions"]] == [title]
