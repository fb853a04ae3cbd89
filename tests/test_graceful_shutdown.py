"""SIGTERM stops each process without losing what it had in hand.

- The API stops accepting connections at once, lets the requests in flight finish (up to
  SHUTDOWN_TIMEOUT), then closes Redis and Postgres and exits 0.
- The worker stops reading the outbox, lets the batch in hand commit and be acknowledged (up to
  SHUTDOWN_TIMEOUT); what it could not finish it releases, so that another worker takes it over at
  once instead of after FLUSH_CLAIM_IDLE_MS.

Both run as the real processes; Redis is slowed down by pausing a private redis-server (SIGSTOP), and
Postgres by holding a lock on the row the worker has to update.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from session_svc.settings import Settings
from tests import servers, support
from tests.helpers import SESSIONS, session_url
from tests.support import eventually

pytestmark = pytest.mark.fault


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def _api(settings: Settings, redis_url: str, tmp_path: Path, **extra: str) -> servers.ApiProcess:
    port = servers.free_port()
    s = settings
    env = support.api_settings(redis_url, s.database_url, s.db_schema, s.key_prefix, port)
    # Redis is paused for up to 3 s below: the request must wait for it, not time out.
    env.update(REDIS_SOCKET_TIMEOUT="5", **extra)
    api = servers.start_api(env, tmp_path)
    api.wait_healthy()
    return api


async def test_sigterm_lets_the_request_in_flight_finish_and_refuses_new_connections(
    settings: Settings, private_redis: Any, tmp_path: Path
) -> None:
    redis = private_redis()
    api = _api(settings, redis.url, tmp_path, SHUTDOWN_TIMEOUT="4")
    try:
        async with aiohttp.ClientSession(api.url) as http:
            user = support.new_name("user-")
            async with http.post(SESSIONS, json={"user_id": user}) as resp:
                assert resp.status == 200, await resp.text()
                sid = (await resp.json())["session_id"]
            redis.pause()
            try:
                in_flight = asyncio.create_task(
                    http.post(
                        session_url(sid, "/messages"),
                        params={"user_id": user},
                        json={"role": "user", "content": "sent just before SIGTERM"},
                    )
                )
                await asyncio.sleep(0.3)  # the request is in the API, waiting for Redis
                assert not in_flight.done()
                t0 = time.monotonic()
                api.proc.send_signal(signal.SIGTERM)
                await eventually(lambda: _refused(api.port), "new connections refused", within=5)
                refused_after = time.monotonic() - t0
                # aiohttp splits its wait in two halves; the request has all of SHUTDOWN_TIMEOUT.
                await asyncio.sleep(2.5 - refused_after)
                assert not in_flight.done() and api.proc.poll() is None, api.tail()
            finally:
                redis.resume()
            async with await in_flight as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["sequence"] == 1
        status = await asyncio.to_thread(api.proc.wait, 10)
        took = time.monotonic() - t0
    finally:
        redis.resume()
        api.stop()
    assert status == 0, api.tail()
    print(f"\nnew connections refused {refused_after:.3f}s after SIGTERM; exited 0 after {took:.2f}s")


async def test_a_request_that_outlives_the_shutdown_timeout_is_cut_and_the_api_still_exits(
    settings: Settings, private_redis: Any, tmp_path: Path
) -> None:
    """SHUTDOWN_TIMEOUT bounds the wait: Redis stays paused past it, the API exits 0 anyway."""
    redis = private_redis()
    api = _api(settings, redis.url, tmp_path, SHUTDOWN_TIMEOUT="1")
    try:
        async with aiohttp.ClientSession(api.url) as http:
            redis.pause()
            stuck = asyncio.create_task(http.post(SESSIONS, json={"user_id": support.new_name("user-")}))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            api.proc.send_signal(signal.SIGTERM)
            status = await asyncio.to_thread(api.proc.wait, 10)
            took = time.monotonic() - t0
            with pytest.raises(aiohttp.ClientError):
                await stuck
    finally:
        redis.resume()
        api.stop()
    assert status == 0, api.tail()
    assert took < 1.8, took
    print(f"\nexited 0 {took:.2f}s after SIGTERM with a request still waiting (SHUTDOWN_TIMEOUT=1)")
