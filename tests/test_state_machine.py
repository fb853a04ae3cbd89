"""The guide's status arrows (active -> completed -> archived, active -> ended) and what each allows."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.helpers import (
    add_memory,
    add_message,
    end_session,
    error_json,
    get_session,
    list_sessions,
    make_session,
    new_user,
    ok_json,
    session_url,
    stats,
    update_session,
)

STATUSES = ["active", "completed", "archived", "ended"]
ALLOWED = {("active", "completed"), ("completed", "archived"), ("active", "ended")}


async def session_in(client: Any, user: str, status: str) -> str:
    """A fresh session brought to ``status`` along allowed arrows only."""
    sid = (await make_session(client, user, title="t"))["session_id"]
    if status in ("completed", "archived"):
        await update_session(client, sid, user, status="completed")
    if status == "archived":
        await update_session(client, sid, user, status="archived")
    if status == "ended":
        await end_session(client, sid, user)
    assert (await get_session(client, sid, user))["status"] == status
    return sid


async def observe(client: Any, sid: str, user: str) -> dict[str, Any]:
    return {
        "session": await get_session(client, sid, user),
        "active_listing": await list_sessions(client, user, active_only="true"),
        "stats": await stats(client),
    }


@pytest.mark.parametrize("target", STATUSES)
@pytest.mark.parametrize("start", STATUSES)
async def test_status_changes_follow_the_arrows(client: Any, start: str, target: str) -> None:
    user = new_user()
    sid = await session_in(client, user, start)
    before = await observe(client, sid, user)
    resp = await client.put(
        session_url(sid), params={"user_id": user}, json={"status": target, "title": "new"}
    )

    if (start, target) in ALLOWED or start == target:
        s = await ok_json(resp)
        assert (s["status"], s["is_active"], s["title"]) == (target, target == "active", "new")
        after = await observe(client, sid, user)
        assert after["session"]["status"] == target
        left_active = start == "active" and target != "active"
        expected_active = before["stats"]["active_sessions"] - (1 if left_active else 0)
        assert after["stats"]["active_sessions"] == expected_active
        assert after["stats"]["total_sessions"] == before["stats"]["total_sessions"]
        in_active_listing = sid in {x["session_id"] for x in after["active_listing"]["sessions"]}
        assert in_active_listing is (target == "active")
    else:
        body = await error_json(resp, 409)
        assert body == {"detail": f"Session is {start}: it cannot become {target}"}
        # Neither the status nor the other fields of the refused request were applied.
        assert await observe(client, sid, user) == before


@pytest.mark.parametrize("start", ["completed", "archived"])
async def test_delete_of_a_completed_or_archived_session_is_409(client: Any, start: str) -> None:
    user = new_user()
    sid = await session_in(client, user, start)
    before = await observe(client, sid, user)
    resp = await client.delete(session_url(sid), params={"user_id": user})
    assert await error_json(resp, 409) == {"detail": f"Session is {start}: it cannot become ended"}
    assert await observe(client, sid, user) == before


@pytest.mark.parametrize("status", STATUSES)
async def test_is_active_is_true_exactly_when_active(client: Any, status: str) -> None:
    user = new_user()
    sid = await session_in(client, user, status)
    expected = status == "active"
    assert (await get_session(client, sid, user))["is_active"] is expected
    summary = await ok_json(await client.get(session_url(sid, "/summary"), params={"user_id": user}))
    assert (summary["status"], summary["is_active"]) == (status, expected)
    (item,) = (await list_sessions(client, user))["sessions"]
    assert (item["status"], item["is_active"]) == (status, expected)


@pytest.mark.parametrize("status", ["completed", "archived", "ended"])
async def test_only_an_active_session_takes_messages(client: Any, status: str) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await add_message(client, sid, user, tokens_used=1, cost_usd=0.5)
    if status in ("completed", "archived"):
        await update_session(client, sid, user, status="completed")
    if status == "archived":
        await update_session(client, sid, user, status="archived")
    if status == "ended":
        await end_session(client, sid, user)
    before = await observe(client, sid, user)
    resp = await client.post(
        session_url(sid, "/messages"),
        params={"user_id": user},
        json={"role": "user", "content": "late", "tokens_used": 5, "cost_usd": 1},
    )
    detail = f"Session is {status}: only an active session takes new messages"
    assert await error_json(resp, 409) == {"detail": detail}
    after = await observe(client, sid, user)
    assert after == before
    assert (after["session"]["message_count"], after["session"]["total_cost"]) == (1, 0.5)
    listed = await ok_json(await client.get(session_url(sid, "/messages"), params={"user_id": user}))
    assert [m["content"] for m in listed["messages"]] == ["hello"]


@pytest.mark.parametrize(
    ("status", "allowed"), [("active", True), ("completed", True), ("archived", False), ("ended", False)]
)
async def test_memories_are_taken_until_archived_or_ended(client: Any, status: str, allowed: bool) -> None:
    user = new_user()
    sid = await session_in(client, user, status)
    body = {"memory_type": "summary", "content": "wrap-up"}
    resp = await client.post(session_url(sid, "/memory"), params={"user_id": user}, json=body)
    latest = await client.get(session_url(sid, "/memory"), params={"user_id": user})
    if allowed:
        made = await ok_json(resp)
        assert made["memory_type"] == "summary"
        assert await ok_json(latest) == made
        assert (await get_session(client, sid, user))["status"] == status
    else:
        assert await error_json(resp, 409) == {"detail": f"Session is {status}: it no longer takes memories"}
        assert await error_json(latest, 404) == {"detail": "Memory not found"}


async def test_same_status_update_is_allowed_and_keeps_the_counters(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await add_memory(client, sid, user)
    s = await update_session(client, sid, user, status="active", session_summary="still going")
    assert (s["status"], s["session_summary"]) == ("active", "still going")
    assert (await stats(client))["active_sessions"] == 1


async def test_racing_complete_and_end_exactly_one_wins(client: Any) -> None:
    user = new_user()
    sids = [(await make_session(client, user))["session_id"] for _ in range(15)]

    async def race(sid: str) -> tuple[tuple[int, Any], tuple[int, Any]]:
        put, delete = await asyncio.gather(
            client.put(session_url(sid), params={"user_id": user}, json={"status": "completed"}),
            client.delete(session_url(sid), params={"user_id": user}),
        )
        return (put.status, await put.json()), (delete.status, await delete.json())

    outcomes = await asyncio.gather(*(race(sid) for sid in sids))
    for sid, (put, delete) in zip(sids, outcomes, strict=True):
        if put[0] == 200:  # completed first: the end is refused
            assert delete == (409, {"detail": "Session is completed: it cannot become ended"})
            expected = "completed"
        else:  # ended first: completing is refused
            assert put == (409, {"detail": "Session is ended: it cannot become completed"})
            assert delete == (200, {"message": "Session ended successfully"})
            expected = "ended"
        assert (await get_session(client, sid, user))["status"] == expected
    body = await stats(client)
    assert (body["total_sessions"], body["active_sessions"]) == (15, 0)
    assert (await list_sessions(client, user, active_only="true"))["total"] == 0
