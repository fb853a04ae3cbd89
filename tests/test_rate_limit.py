"""Per-user write rate limits: a token bucket in the user's Redis bucket, charged in the write's own script.

Two API apps share one Redis (and one key prefix), as two API processes do: the limit is the user's,
whichever process takes the write. Real Redis and Postgres.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from session_svc.record.keys import Keys
from tests.helpers import SESSIONS, error_json, get_session, make_session, new_user, session_url

MSG = {"role": "user", "content": "hi"}


async def append(client: Any, sid: str, user: str, key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return await client.post(
        session_url(sid, "/messages"), params={"user_id": user}, json=MSG, headers=headers
    )


async def test_the_limit_is_shared_by_every_api_process(
    make_client: Any, redis: Redis, settings: Any
) -> None:
    one = await make_client(rate_limit_writes_per_minute=6, rate_limit_burst=4)
    two = await make_client(rate_limit_writes_per_minute=6, rate_limit_burst=4)
    user = new_user()
    sid = (await make_session(one, user))["session_id"]  # a write: 1 of the burst of 4
    assert (await append(two, sid, user)).status == 200
    assert (await append(one, sid, user)).status == 200
    assert (await append(two, sid, user)).status == 200
    for client in (one, two):
        resp = await append(client, sid, user)
        detail = (await error_json(resp, 429))["detail"]
        assert "Too many writes" in detail
        retry_after = int(resp.headers["Retry-After"])
        assert 1 <= retry_after <= 10  # 6 per minute: a token every 10 s
    # Nothing was written by the refused requests.
    assert (await get_session(one, sid, user))["message_count"] == 3
    # Another user has a bucket of their own.
    other = new_user()
    assert (await two.post(SESSIONS, json={"user_id": other})).status == 200
    # Reads are never limited.
    assert (await one.get(session_url(sid), params={"user_id": user})).status == 200
    # The bucket expires once it would be full again (4 tokens at 6/min: 40 s).
    bucket = Keys(settings.key_prefix, settings.redis_buckets).for_user(user).rate_limit
    assert 0 < await redis.pttl(bucket) <= 41_000


async def test_a_replay_is_not_charged_and_a_refused_write_records_nothing(make_client: Any) -> None:
    client = await make_client(rate_limit_writes_per_minute=2)
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    first = await append(client, sid, user, key="r1")
    assert first.status == 200
    # The bucket is empty now (burst = 2); a retry of the first write still answers its answer.
    again = await append(client, sid, user, key="r1")
    assert again.status == 200 and await again.read() == await first.read()
    limited = await append(client, sid, user, key="r2")
    await error_json(limited, 429)
    assert int(limited.headers["Retry-After"]) >= 1
    # The 429 was not recorded: the key is still free (refused again now, not replayed as a 429 later).
    assert (await append(client, sid, user, key="r2")).status == 429
    assert (await get_session(client, sid, user))["message_count"] == 1


async def test_failures_do_not_use_up_the_bucket(make_client: Any) -> None:
    client = await make_client(rate_limit_writes_per_minute=2)
    user = new_user()
    sid = (await make_session(client, user))["session_id"]  # 1 of 2
    missing = "00000000-0000-4000-8000-000000000000"
    for _ in range(5):
        assert (await append(client, missing, user)).status == 404
    assert (await append(client, sid, user)).status == 200  # 2 of 2
    assert (await append(client, sid, user)).status == 429


async def test_off_by_default(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    for _ in range(30):
        assert (await append(client, sid, user)).status == 200
