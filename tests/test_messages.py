"""Messages: append, sequence numbers, paging, atomic counters under concurrency, exact money."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from session_svc.record.keys import Keys
from tests.helpers import (
    MESSAGE_FIELDS,
    add_message,
    get_session,
    list_messages,
    make_session,
    new_user,
    ok_json,
    parse_iso_z,
    session_url,
    stats,
    validation_locs,
)


async def test_append_returns_the_message_in_the_guide_shape(client: Any) -> None:
    user = new_user()
    s = await make_session(client, user)
    sid = s["session_id"]
    m = await add_message(
        client,
        sid,
        user,
        role="user",
        content="Hello, this is a test message",
        message_type="chat",
        tokens_used=5,
        cost_usd=0.0001,
        metadata={"model": "gpt-4"},
    )
    assert set(m) == MESSAGE_FIELDS
    assert str(uuid.UUID(m["message_id"])) == m["message_id"]
    assert (m["session_id"], m["user_id"], m["sequence"]) == (sid, user, 1)
    assert (m["role"], m["content"], m["message_type"]) == ("user", "Hello, this is a test message", "chat")
    assert (m["tokens_used"], m["cost_usd"], m["metadata"]) == (5, 0.0001, {"model": "gpt-4"})
    parse_iso_z(m["created_at"])

    after = await get_session(client, sid, user)
    assert (after["message_count"], after["total_tokens"], after["total_cost"]) == (1, 5, 0.0001)
    assert parse_iso_z(after["last_activity"]) >= parse_iso_z(s["last_activity"])

    listed = await list_messages(client, sid, user)
    assert listed == {"messages": [m], "total": 1, "page": 1, "page_size": 100}


async def test_append_defaults(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    resp = await client.post(
        session_url(sid, "/messages"), params={"user_id": user}, json={"role": "assistant", "content": "hi"}
    )
    m = await ok_json(resp)
    assert (m["message_type"], m["tokens_used"], m["cost_usd"], m["metadata"]) == ("chat", 0, 0.0, {})


async def test_every_role_and_message_type_is_accepted(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    roles = ["user", "assistant", "system", "tool_call", "tool_result"]
    types = ["chat", "system", "tool_call", "tool_result", "notification"]
    for role, mtype in zip(roles, types, strict=True):
        m = await add_message(client, sid, user, role=role, message_type=mtype, content=f"{role}/{mtype}")
        assert (m["role"], m["message_type"]) == (role, mtype)
    listed = await list_messages(client, sid, user)
    pairs = [(m["role"], m["message_type"]) for m in listed["messages"]]
    assert pairs == list(zip(roles, types, strict=True))


async def test_messages_are_oldest_first_with_increasing_sequences_and_pages(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    sent = [await add_message(client, sid, user, content=f"m{i}") for i in range(1, 6)]
    assert [m["sequence"] for m in sent] == [1, 2, 3, 4, 5]

    everything = await list_messages(client, sid, user)
    assert [m["content"] for m in everything["messages"]] == ["m1", "m2", "m3", "m4", "m5"]
    assert [m["sequence"] for m in everything["messages"]] == [1, 2, 3, 4, 5]
    assert everything["total"] == 5

    pages = [await list_messages(client, sid, user, page=p, page_size=2) for p in (1, 2, 3, 4)]
    assert [[m["sequence"] for m in p["messages"]] for p in pages] == [[1, 2], [3, 4], [5], []]
    assert [p["total"] for p in pages] == [5, 5, 5, 5]
    assert [(p["page"], p["page_size"]) for p in pages] == [(1, 2), (2, 2), (3, 2), (4, 2)]


async def test_largest_allowed_page_sizes(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await add_message(client, sid, user)
    assert (await list_messages(client, sid, user, page_size=200))["page_size"] == 200
    resp = await client.get(f"/api/v1/users/{user}/sessions", params={"page_size": 100})
    assert (await ok_json(resp))["page_size"] == 100


async def test_counters_are_exact_under_200_concurrent_appends(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    url = session_url(sid, "/messages")

    async def post(i: int) -> Any:
        body = {"role": "user", "content": f"msg {i}", "tokens_used": 3, "cost_usd": 0.0001}
        return await ok_json(await client.post(url, params={"user_id": user}, json=body))

    replies = await asyncio.gather(*(post(i) for i in range(200)))
    assert sorted(r["sequence"] for r in replies) == list(range(1, 201))

    s = await get_session(client, sid, user)
    assert s["message_count"] == 200
    assert s["total_tokens"] == 600
    assert s["total_cost"] == 0.02

    listed = await list_messages(client, sid, user, page_size=200)
    assert listed["total"] == 200
    assert [m["sequence"] for m in listed["messages"]] == list(range(1, 201))
    # each stored message is the one that was acknowledged with that sequence number
    by_seq = {r["sequence"]: r["content"] for r in replies}
    assert all(m["content"] == by_seq[m["sequence"]] for m in listed["messages"])

    body = await stats(client)
    assert (body["total_messages"], body["total_tokens"], body["total_cost"]) == (200, 600, 0.02)
    assert body["average_messages_per_session"] == 200.0


ENDED = "Session is ended: only an active session takes new messages"


@dataclass(frozen=True)
class Race:
    """One round: appends accepted in all, and of those in flight while the DELETE was, how many ran
    before the end (won) and after it (lost)."""

    accepted: int
    won: int
    lost: int


async def race_appends_with_the_end(client: Any, redis: Redis, keys: Keys) -> Race:
    """One round on a fresh session: 8 writers append in a loop; after 20 acknowledged appends the
    session is ended while they go on; each writer stops at its first refusal. Asserts that every
    outcome is consistent, and returns what happened to the appends that overlapped the DELETE."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    url = session_url(sid, "/messages")
    body = {"role": "user", "content": "x", "tokens_used": 2, "cost_usd": 0.000003}
    appends: list[tuple[float, float, int, Any]] = []  # sent, answered, status, answer
    enough = asyncio.Event()

    async def writer() -> None:
        while len(appends) < 400:  # a bound, should the end never be seen
            sent = time.monotonic()
            resp = await client.post(url, params={"user_id": user}, json=body)
            appends.append((sent, time.monotonic(), resp.status, await resp.json()))
            if resp.status != 200:
                return
            if len(appends) >= 20:
                enough.set()

    async def end() -> tuple[float, float]:
        await enough.wait()
        sent = time.monotonic()
        resp = await client.delete(session_url(sid), params={"user_id": user})
        assert (resp.status, await resp.json()) == (200, {"message": "Session ended successfully"})
        return sent, time.monotonic()

    *_, (end_sent, end_answered) = await asyncio.gather(*(writer() for _ in range(8)), end())
    accepted = [answer for _s, _a, status, answer in appends if status == 200]
    refused = [(status, answer) for _s, _a, status, answer in appends if status != 200]
    # A refused append is a 409 saying why, and leaves no trace (the counts below).
    assert refused == [(409, {"detail": ENDED})] * 8  # each writer's last
    # Answered before the end was sent: landed. Sent after the end was answered: refused.
    assert all(status == 200 for _s, answered, status, _ in appends if answered < end_sent)
    assert all(status == 409 for sent, _a, status, _ in appends if sent > end_answered)
    n = len(accepted)
    assert sorted(m["sequence"] for m in accepted) == list(range(1, n + 1))

    s = await get_session(client, sid, user)
    assert (s["status"], s["is_active"]) == ("ended", False)
    assert (s["message_count"], s["total_tokens"]) == (n, 2 * n)
    assert s["total_cost"] == n * 3 / 1_000_000  # exact: 3 micro-dollars each
    listed = await list_messages(client, sid, user, page_size=200)
    assert listed["total"] == n
    assert [m["message_id"] for m in listed["messages"]] == [
        m["message_id"] for m in sorted(accepted, key=lambda m: m["sequence"])
    ]
    # The order Redis ran them in, as the outbox recorded it: the creation, every accepted append (and
    # only those) in sequence order, then the end, with versions counting up one per write.
    entries = [f for _id, f in await redis.xrange(keys.for_user(user).outbox) if f["sid"] == sid]
    assert [(f["k"], f.get("seq"), int(f["v"])) for f in entries] == [
        ("s", None, 1),
        *[("m", str(i), i + 1) for i in range(1, n + 1)],
        ("s", None, n + 2),
    ]
    # Each entry points at its message in the session's stream (the entry does not copy it).
    stream = dict(await redis.xrange(keys.for_user(user).messages(sid)))
    assert [stream[f"{f['seq']}-0"]["id"] for f in entries if f["k"] == "m"] == [
        m["message_id"] for m in sorted(accepted, key=lambda m: m["sequence"])
    ]
    racing = [status for sent, answered, status, _ in appends if sent < end_answered and answered > end_sent]
    return Race(accepted=n, won=racing.count(200), lost=racing.count(409))


async def test_appends_racing_the_end_of_the_session_are_all_or_nothing(
    client: Any, redis: Redis, keys: Keys
) -> None:
    """Each append either lands (200, counted, listed, in the outbox before the end) or is refused (409,
    no trace): never half. Among the appends in flight while the DELETE was, both orders must have been
    seen: some ran before the end and some after. At least 5 rounds, more (up to 20) until both were.
    (Here every round sees both, a few of each.)"""
    rounds: list[Race] = []
    while len(rounds) < 20:
        if len(rounds) >= 5 and any(r.won for r in rounds) and any(r.lost for r in rounds):
            break
        rounds.append(await race_appends_with_the_end(client, redis, keys))
    print(f"\nappend/end race rounds: {rounds}")
    won, lost = sum(r.won for r in rounds), sum(r.lost for r in rounds)
    assert won > 0 and lost > 0, f"only one order was observed in {len(rounds)} rounds: {rounds}"
    st = await stats(client)
    assert (st["total_sessions"], st["active_sessions"]) == (len(rounds), 0)
    n = sum(r.accepted for r in rounds)
    assert (st["total_messages"], st["total_tokens"]) == (n, 2 * n)


async def test_money_adds_up_exactly(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await add_message(client, sid, user, cost_usd=0.1)
    await add_message(client, sid, user, cost_usd=0.2)
    assert (await get_session(client, sid, user))["total_cost"] == 0.3
    assert (await stats(client))["total_cost"] == 0.3
    listed = await list_messages(client, sid, user)
    assert [m["cost_usd"] for m in listed["messages"]] == [0.1, 0.2]

    other = (await make_session(client, user))["session_id"]
    for cost in (0.000001, 1.234567, 5, 0.7):
        await add_message(client, other, user, cost_usd=cost)
    assert (await get_session(client, other, user))["total_cost"] == 6.934568
    assert (await stats(client))["total_cost"] == 7.234568


async def test_token_counts_written_as_integral_floats_are_integers(client: Any) -> None:
    """JSON has one number type: ``5.0`` and ``1e3`` are the integers JSON Schema's ``integer`` allows (and
    what Python's json.dumps writes for a float). A fraction, a string or a boolean is still a 400."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    url, params = session_url(sid, "/messages"), {"user_id": user}
    for raw, tokens in ((b"5.0", 5), (b"1e3", 1000)):
        body = b'{"role": "user", "content": "hi", "tokens_used": ' + raw + b"}"
        resp = await client.post(url, params=params, data=body, headers={"Content-Type": "application/json"})
        assert (await ok_json(resp))["tokens_used"] == tokens
    for raw in (b"5.5", b'"5"', b"true"):
        body = b'{"role": "user", "content": "hi", "tokens_used": ' + raw + b"}"
        resp = await client.post(url, params=params, data=body, headers={"Content-Type": "application/json"})
        assert await validation_locs(resp) == [["body", "tokens_used"]]
    assert (await get_session(client, sid, user))["total_tokens"] == 1005


async def test_session_totals_stay_exact_past_what_a_lua_number_holds(
    client: Any, redis: Redis, keys: Keys
) -> None:
    """The append adds tokens and cost in its script with Lua numbers (doubles) while the totals are
    below 2^53, and with Redis' 64-bit HINCRBY past it: a session near 2^53 still counts to the unit."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    skey = keys.for_user(user).session(sid)
    await redis.hset(skey, mapping={"total_tokens": 2**53 - 5, "cost_micros": 2**53 - 3})
    await add_message(client, sid, user, tokens_used=10, cost_usd=0.000007)
    await add_message(client, sid, user, tokens_used=1, cost_usd=0.000001)
    assert await redis.hmget(skey, ["total_tokens", "cost_micros"]) == [str(2**53 + 6), str(2**53 + 5)]
