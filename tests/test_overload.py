"""Bounded work under overload: past MAX_INFLIGHT requests in progress, a process answers 503 with
Retry-After at once instead of queueing, writes nothing for what it sheds, and finishes what it took.
Health checks and scrapes are always answered.

The backend is made slow for real: a private redis-server stopped with SIGSTOP (``RedisServer.pause``),
with a socket timeout long enough that the requests in progress wait for it instead of failing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from session_svc.ops.telemetry import RECORDER, REGISTRY, SHED
from tests.helpers import list_messages, make_session, new_user, session_url
from tests.support import eventually

CAP = 4


def shed_count() -> float:
    RECORDER.publish()
    return REGISTRY.get_sample_value(SHED._name + "_total") or 0.0


@pytest.mark.fault
@pytest.mark.parametrize("metrics", [True, False], ids=["metrics", "no-metrics"])
async def test_past_max_inflight_requests_are_shed_at_once_and_write_nothing(
    make_client: Any, private_redis: Any, metrics: bool
) -> None:
    redis = private_redis()
    client = await make_client(
        redis_url=redis.url,
        max_inflight=CAP,
        redis_socket_timeout=60.0,
        redis_pool_timeout=60.0,
        metrics=metrics,
    )
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    shed_before = shed_count()

    async def append(n: int) -> Any:
        return await client.post(
            session_url(sid, "/messages"), params={"user_id": user}, json={"role": "user", "content": f"m{n}"}
        )

    redis.pause()
    try:
        taken = [asyncio.create_task(append(n)) for n in range(CAP)]

        async def all_in_flight() -> bool:
            return RECORDER.in_flight == CAP

        await eventually(all_in_flight, f"{CAP} requests waiting for Redis", within=30)
        shed = await asyncio.wait_for(asyncio.gather(*(append(n) for n in range(CAP, CAP + 10))), 30)
        assert not any(t.done() for t in taken), "the shed requests waited for the others"
        for resp in shed:
            body = await resp.json()
            assert (resp.status, resp.headers["Retry-After"]) == (503, "1"), body
            assert body == {
                "detail": "Server busy: too many requests in progress; nothing was done, retry after 1 second"
            }
            assert resp.headers["X-Request-ID"]
        # Liveness is still answered; so is readiness (here: Redis is stopped, so it says so, late).
        assert (await asyncio.wait_for(client.get("/health"), 30)).status == 200
        detailed = await asyncio.wait_for(client.get("/health/detailed"), 30)
        assert "busy" not in await detailed.text()
        if metrics:
            assert (await asyncio.wait_for(client.get("/metrics"), 30)).status == 200
    finally:
        redis.resume()

    done = await asyncio.wait_for(asyncio.gather(*taken), 60)
    assert [r.status for r in done] == [200] * CAP
    page = await list_messages(client, sid, user)
    assert page["total"] == CAP and sorted(m["content"] for m in page["messages"]) == [
        f"m{n}" for n in range(CAP)
    ]
    if metrics:
        assert shed_count() - shed_before == 10
    assert RECORDER.in_flight == 0
