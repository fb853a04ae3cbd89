"""Coalesced script calls (``session_svc/storage/coalesce.py``): concurrent calls share pipelines, each still
gets its own answer (an error reply fails only its caller), and a Redis that lost its scripts loads
them again. The fault tests (tests/test_redis_faults.py) run the API with coalescing on, as deployed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import DataError, ResponseError

from session_svc.storage.coalesce import Coalescer
from tests.helpers import add_message, list_messages, make_session, new_user

INCR = "return redis.call('INCR', KEYS[1])"


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every pipeline the coalescers send."""
    sizes: list[int] = []
    real = Coalescer._pipeline

    async def counting(self: Coalescer, batch: Any, pool: Any) -> list[Any]:
        sizes.append(len(batch))
        return await real(self, batch, pool)

    monkeypatch.setattr(Coalescer, "_pipeline", counting)
    return sizes


async def test_concurrent_calls_share_pipelines_and_each_gets_its_answer(
    redis: Redis, key_prefix: str, batches: list[int]
) -> None:
    sha = await redis.script_load(INCR)
    c = Coalescer(redis)
    key = f"{key_prefix}:n"
    bad = f"{key_prefix}:text"
    await redis.set(bad, "not a number")
    calls = [c.call(sha, INCR, [bad if i == 7 else key], []) for i in range(50)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[7], ResponseError)  # only its own caller fails
    counts: list[int] = [r for i, r in enumerate(results) if i != 7 and isinstance(r, int)]
    assert sorted(counts) == list(range(1, 50))
    assert sum(batches) == 50 and len(batches) < 5, batches


async def test_a_redis_that_lost_its_scripts_gets_them_again(private_redis: Any) -> None:
    server = private_redis()
    r = Redis.from_url(server.url, decode_responses=True)
    try:
        sha = await r.script_load(INCR)
        await r.script_flush()
        c = Coalescer(r)
        assert await asyncio.gather(*(c.call(sha, INCR, ["k"], []) for _ in range(5))) == [1, 2, 3, 4, 5]
        assert await r.script_exists(sha) == [True]
    finally:
        await r.aclose()


async def test_concurrent_appends_through_the_api_stay_gap_free(client: Any, batches: list[int]) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    sent = await asyncio.gather(*(add_message(client, sid, user, content=f"m{i}") for i in range(40)))
    assert sorted(m["sequence"] for m in sent) == list(range(1, 41))
    page = await list_messages(client, sid, user, page_size=100)
    assert [m["content"] for m in page["messages"]] == [
        m["content"] for m in sorted(sent, key=lambda m: m["sequence"])
    ]
    assert max(batches) > 1  # some calls did share a pipeline


async def test_an_argument_redis_cannot_take_fails_only_its_own_call(redis: Redis, key_prefix: str) -> None:
    """A lone surrogate has no UTF-8 form: that call fails with a DataError, the rest of its batch runs."""
    sha = await redis.script_load(INCR)
    c = Coalescer(redis)
    key = f"{key_prefix}:n"
    results = await asyncio.gather(
        c.call(sha, INCR, [key], []), c.call(sha, INCR, ["\ud800"], []), c.call(sha, INCR, [key], []),
        return_exceptions=True,
    )  # fmt: skip
    assert isinstance(results[1], DataError)
    assert sorted(r for r in results if isinstance(r, int)) == [1, 2]
