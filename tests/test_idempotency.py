"""Idempotency-Key: a retried write answers the first answer again, byte for byte, and writes nothing more.

Real Redis and Postgres, each test its own key prefix. Every write route takes the header (POST, PUT,
DELETE); the record lives in the user's bucket and is checked in the write's own script.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from session_svc.record.keys import Keys, bucket_of
from session_svc.storage.redis_client import REDIS_UNKNOWN_DETAIL
from session_svc.storage.resources import Backend
from tests import outbox_drain
from tests.helpers import (
    SESSIONS,
    error_json,
    get_session,
    list_messages,
    list_sessions,
    make_session,
    new_user,
    ok_object,
    session_url,
    stats,
)
from tests.support import eventually
from workers.expiry import sweep
from workers.flush import Flusher

KEY = "Idempotency-Key"


async def post(
    client: Any, path: str, key: str | None, user: str | None, body: Any
) -> tuple[int, bytes, Any]:
    """POST a raw JSON body (bytes or an object); (status, body bytes, headers)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers[KEY] = key
    data = body if isinstance(body, bytes) else None
    params = {"user_id": user} if user is not None else None
    resp = await client.post(path, params=params, headers=headers, data=data, json=None if data else body)
    return resp.status, await resp.read(), resp.headers


async def count(client: Any, sid: str, user: str) -> int:
    return int((await get_session(client, sid, user))["message_count"])


async def test_a_retried_append_answers_the_first_answer_and_writes_nothing(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    body = {"role": "user", "content": "hello", "tokens_used": 5, "cost_usd": 0.0001, "metadata": {"a": 1}}
    first = await post(client, session_url(sid, "/messages"), "k-1", user, body)
    again = await post(client, session_url(sid, "/messages"), "k-1", user, body)
    assert first[0] == again[0] == 200
    assert again[1] == first[1]
    assert "Idempotent-Replayed" not in first[2] and again[2]["Idempotent-Replayed"] == "true"
    assert await count(client, sid, user) == 1
    assert (await list_messages(client, sid, user))["total"] == 1
    totals = await stats(client)
    assert totals["total_messages"] == 1 and totals["total_tokens"] == 5
    # A new key is a new message.
    third = await post(client, session_url(sid, "/messages"), "k-2", user, body)
    assert third[0] == 200 and third[1] != first[1]
    assert await count(client, sid, user) == 2


async def test_the_same_body_serialised_in_another_key_order_is_the_same_request(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    one = b'{"role":"user","content":"hi","metadata":{"x":1,"y":{"b":2,"a":1}},"cost_usd":0.0001}'
    two = b'{"cost_usd":0.00010, "metadata":{"y":{"a":1,"b":2},"x":1},"content":"hi","role":"user"}'
    first = await post(client, session_url(sid, "/messages"), "order", user, one)
    again = await post(client, session_url(sid, "/messages"), "order", user, two)
    assert first[0] == again[0] == 200
    assert again[1] == first[1]
    assert await count(client, sid, user) == 1


async def test_the_same_key_with_another_request_is_a_422_and_writes_nothing(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    other = (await make_session(client, user))["session_id"]
    msg = {"role": "user", "content": "hello"}
    assert (await post(client, session_url(sid, "/messages"), "k", user, msg))[0] == 200
    for path, body in (
        (session_url(sid, "/messages"), {**msg, "content": "hello!"}),  # another body
        (session_url(other, "/messages"), msg),  # another session
        (session_url(sid, "/memory"), {"memory_type": "preference", "content": "hello"}),  # another route
    ):
        resp = await client.post(path, params={"user_id": user}, json=body, headers={KEY: "k"})
        detail = (await error_json(resp, 422))["detail"]
        assert "Idempotency-Key" in detail and "different request" in detail
    assert await count(client, sid, user) == 1
    assert await count(client, other, user) == 0
    assert (await get_session(client, sid, user))["status"] == "active"


async def test_keys_are_per_user(client: Any, settings: Any) -> None:
    alice = new_user()
    bob = new_user()
    while bucket_of(bob, settings.redis_buckets) != bucket_of(alice, settings.redis_buckets):
        bob = new_user()  # the same bucket: the same Redis hash tag, only the user tells them apart
    a = await post(client, SESSIONS, "shared-key", None, {"user_id": alice, "title": "t"})
    b = await post(client, SESSIONS, "shared-key", None, {"user_id": bob, "title": "t"})
    assert a[0] == b[0] == 200
    sid_a, sid_b = (await _json(a))["session_id"], (await _json(b))["session_id"]
    assert sid_a != sid_b
    assert (await list_sessions(client, alice))["total"] == 1
    assert (await list_sessions(client, bob))["total"] == 1


async def _json(answer: tuple[int, bytes, Any]) -> dict[str, Any]:
    got: dict[str, Any] = orjson.loads(answer[1])
    return got


async def test_a_record_expires_after_idempotency_ttl(make_client: Any, redis: Redis, settings: Any) -> None:
    client = await make_client(idempotency_ttl=1)
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    msg = {"role": "user", "content": "hello"}
    first = await post(client, session_url(sid, "/messages"), "short", user, msg)
    record = Keys(settings.key_prefix, settings.redis_buckets).for_user(user).idempotency("short")
    ttl = await redis.ttl(record)
    assert 0 < ttl <= 1
    for _ in range(400):  # polled, never a fixed sleep: the record is gone within about a second
        if not await redis.exists(record):
            break
        await asyncio.sleep(0.01)
    assert not await redis.exists(record)
    later = await post(client, session_url(sid, "/messages"), "short", user, msg)
    assert later[0] == 200 and later[1] != first[1]
    assert await count(client, sid, user) == 2


async def test_twenty_concurrent_identical_requests_write_one_message(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    msg = {"role": "assistant", "content": "once", "tokens_used": 3}
    answers = await asyncio.gather(
        *(post(client, session_url(sid, "/messages"), "burst", user, msg) for _ in range(20))
    )
    assert {status for status, _, _ in answers} == {200}
    assert len({body for _, body, _ in answers}) == 1
    assert sum(1 for _, _, h in answers if "Idempotent-Replayed" not in h) == 1
    assert await count(client, sid, user) == 1
    assert (await get_session(client, sid, user))["total_tokens"] == 3


async def test_session_and_memory_creation_replay_the_same_ids(client: Any) -> None:
    user = new_user()
    body = {"user_id": user, "title": "t", "metadata": {"b": 1, "a": 2}, "conversation_data": {"z": [1]}}
    first = await post(client, SESSIONS, "create", None, body)
    again = await post(client, SESSIONS, "create", None, {**body, "metadata": {"a": 2, "b": 1}})
    assert first[0] == again[0] == 200 and again[1] == first[1]
    assert first[2]["ETag"] == again[2]["ETag"] == '"1"'
    assert (await list_sessions(client, user))["total"] == 1
    assert (await stats(client))["total_sessions"] == 1
    sid = (await _json(first))["session_id"]
    memory = {"memory_type": "entity", "content": "Paris", "metadata": {"k": "v"}}
    m1 = await post(client, session_url(sid, "/memory"), "mem", user, memory)
    m2 = await post(client, session_url(sid, "/memory"), "mem", user, memory)
    assert m1[0] == m2[0] == 200 and m2[1] == m1[1]
    listed = await ok_object(await client.get(session_url(sid, "/memories"), params={"user_id": user}))
    assert listed["total"] == 1
    assert listed["memories"][0]["memory_id"] == (await _json(m1))["memory_id"]


async def test_put_and_delete_replay_their_first_answer(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user, title="a"))["session_id"]
    url, p = session_url(sid), {"user_id": user}
    put = {"title": 'b \u00fc \U0001f600 / "q" \\', "metadata": {"z": "\u00e9", "a": [1.5, None]}}
    first = await client.put(url, params=p, json=put, headers={KEY: "put"})
    first_body = await first.read()
    # Someone else changes the session; the retry still answers what the first PUT answered.
    assert (await client.put(url, params=p, json={"title": "c"})).status == 200
    again = await client.put(url, params=p, json=put, headers={KEY: "put"})
    assert again.status == 200 and await again.read() == first_body
    assert again.headers["ETag"] == first.headers["ETag"] == '"2"'
    assert (await get_session(client, sid, user))["title"] == "c"  # the retry wrote nothing
    d1 = await client.delete(url, params=p, headers={KEY: "end"})
    d2 = await client.delete(url, params=p, headers={KEY: "end"})
    assert d1.status == d2.status == 200 and await d1.read() == await d2.read()
    assert d2.headers["Idempotent-Replayed"] == "true"
    # A replay works although the session has ended since (a new message would be a 409).
    msg = {"role": "user", "content": "late"}
    resp = await client.post(session_url(sid, "/messages"), params=p, json=msg)
    assert resp.status == 409


async def test_a_replay_works_after_the_session_ended(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    msg = {"role": "user", "content": "hello"}
    first = await post(client, session_url(sid, "/messages"), "before-end", user, msg)
    await client.delete(session_url(sid), params={"user_id": user})
    again = await post(client, session_url(sid, "/messages"), "before-end", user, msg)
    assert again[0] == 200 and again[1] == first[1]


async def test_retries_of_a_write_to_a_session_that_left_redis(
    client: Any, backend: Backend, flusher: Flusher, redis: Redis, settings: Any
) -> None:
    """The write to a cold session is two scripts (rehydrate, then write): concurrent retries of it
    still write once, and a retry after the session left Redis again replays the first answer."""
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1
    msg = {"role": "user", "content": "back again"}
    answers = await asyncio.gather(
        *(post(client, session_url(sid, "/messages"), "cold", user, msg) for _ in range(10))
    )
    assert {a[0] for a in answers} == {200} and len({a[1] for a in answers}) == 1
    assert await count(client, sid, user) == 1
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    assert not await redis.exists(keys.for_user(user).session(sid))
    again = await post(client, session_url(sid, "/messages"), "cold", user, msg)
    assert again[0] == 200 and again[1] == answers[0][1]
    assert await count(client, sid, user) == 1


@pytest.mark.parametrize("bad", ["", " ", "a b", "x" * 256, "caf\u00e9", "tab\there"])
async def test_a_malformed_key_is_a_400_and_writes_nothing(client: Any, bad: str) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    resp = await client.post(
        session_url(sid, "/messages"),
        params={"user_id": user},
        data=b'{"role":"user","content":"x"}',
        headers={KEY: bad.encode("utf-8").decode("latin-1"), "Content-Type": "application/json"},
    )
    detail = (await error_json(resp, 400))["detail"]
    assert detail[0]["loc"] == ["header", KEY]
    assert await count(client, sid, user) == 0


async def test_the_longest_key_and_every_visible_character_are_accepted(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    msg = {"role": "user", "content": "x"}
    visible = "".join(chr(c) for c in range(0x21, 0x7F))
    for key in ("x" * 255, visible):
        a = await post(client, session_url(sid, "/messages"), key, user, msg)
        b = await post(client, session_url(sid, "/messages"), key, user, msg)
        assert a[0] == b[0] == 200 and a[1] == b[1]
    assert await count(client, sid, user) == 2


async def test_a_retry_after_a_lost_reply_writes_once(make_client: Any, private_redis: Any) -> None:
    """What the key is for: Redis takes the write but its reply is lost (a 503 "outcome unknown"); the
    client retries with the same key and gets the write's answer, not a second message."""
    server = private_redis()
    client = await make_client(redis_url=server.url, redis_socket_timeout=0.5)
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    msg = {"role": "user", "content": "maybe"}
    assert (await post(client, session_url(sid, "/messages"), "warm", user, msg))[0] == 200  # script loaded
    server.pause()
    try:
        lost = await post(client, session_url(sid, "/messages"), "lost", user, msg)
        assert lost[0] == 503 and lost[1] == orjson.dumps({"detail": REDIS_UNKNOWN_DETAIL})
    finally:
        server.resume()

    async def applied() -> bool:
        resp = await client.get(session_url(sid), params={"user_id": user})
        return resp.status == 200 and (await resp.json())["message_count"] == 2

    await eventually(applied, "the write whose reply was lost to be applied", within=10)
    retry = await post(client, session_url(sid, "/messages"), "lost", user, msg)
    assert retry[0] == 200 and retry[2]["Idempotent-Replayed"] == "true"
    assert orjson.loads(retry[1])["sequence"] == 2
    assert await count(client, sid, user) == 2


async def test_the_openapi_document_describes_the_headers_and_answers(client: Any) -> None:
    doc = await ok_object(await client.get("/openapi.json"))
    for path, method in (
        (SESSIONS, "post"),
        ("/api/v1/sessions/{session_id}/messages", "post"),
        ("/api/v1/sessions/{session_id}/memory", "post"),
        ("/api/v1/sessions/{session_id}", "put"),
        ("/api/v1/sessions/{session_id}", "delete"),
    ):
        op = doc["paths"][path][method]
        headers = {p["name"] for p in op["parameters"] if p["in"] == "header"}
        assert KEY in headers, (path, method)
        assert ("If-Match" in headers) == (method != "post"), (path, method)
        assert {"422", "429"} <= set(op["responses"]), (path, method)
        assert "Retry-After" in op["responses"]["429"]["headers"]
    put = doc["paths"]["/api/v1/sessions/{session_id}"]["put"]
    assert "ETag" in put["responses"]["412"]["headers"] and "ETag" in put["responses"]["200"]["headers"]
    get = doc["paths"]["/api/v1/sessions/{session_id}"]["get"]
    assert "304" in get["responses"]
    assert "If-None-Match" in {p["name"] for p in get["parameters"] if p["in"] == "header"}
    assert not [p for p in doc["paths"]["/api/v1/sessions/{session_id}/messages"]["get"]["parameters"]
                if p["in"] == "header"]  # fmt: skip
