"""Redis going away: every request answers 503 with a JSON detail (never 500), writes refused before
anything was sent say that nothing was written; readiness answers 503 with the reason."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from session_svc.http.appkeys import SETTINGS
from session_svc.storage.redis_client import REDIS_DOWN_DETAIL, REDIS_READ_DETAIL
from tests import servers, support
from tests.helpers import (
    SESSIONS,
    add_message,
    error_json,
    get_session,
    make_session,
    new_user,
    ok_json,
    session_url,
)
from tests.support import eventually


@pytest.mark.fault
async def test_requests_answer_503_when_redis_is_gone(make_client: Any, private_redis: Any) -> None:
    server = private_redis()
    client = await make_client(redis_url=server.url, redis_socket_timeout=2.0, redis_pool_timeout=2.0)
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await add_message(client, sid, user)
    assert (await get_session(client, sid, user))["message_count"] == 1

    server.kill()

    params = {"user_id": user}
    attempts = [
        ("GET", session_url(sid), params, None),  # first use of a pooled connection to a dead server
        ("GET", session_url(sid), params, None),  # a fresh connection: refused
        ("POST", session_url(sid, "/messages"), params, {"role": "user", "content": "hi"}),
        ("PUT", session_url(sid), params, {"title": "x"}),
        ("DELETE", session_url(sid), params, None),
        ("POST", SESSIONS, {}, {"user_id": user}),
        ("GET", f"/api/v1/users/{user}/sessions", {}, None),
        ("GET", session_url(sid, "/messages"), params, None),
        ("POST", session_url(sid, "/memory"), params, {"memory_type": "entity", "content": "x"}),
        ("GET", session_url(sid, "/memory"), params, None),
        ("GET", f"{SESSIONS}/stats", {}, None),
    ]
    for method, url, query, body in attempts:
        resp = await client.request(method, url, params=query, json=body)
        # A write: connection refused, the command never left, so "nothing was written" is known.
        expected = REDIS_READ_DETAIL if method == "GET" else REDIS_DOWN_DETAIL
        assert await error_json(resp, 503) == {"detail": expected}, (method, url)

    # Liveness still answers; readiness tells which store is down, with 503 for a load balancer.
    assert (await ok_json(await client.get("/health")))["status"] == "healthy"
    resp = await client.get("/health/detailed")
    health = await resp.json()
    assert resp.status == 503, health
    assert health["redis_connected"] is False and health["accepting_writes"] is False
    assert health["database_connected"] is True
    assert health["status"] == "degraded"
    assert any(r.startswith("Redis unreachable") for r in health["reasons"]), health["reasons"]


@pytest.mark.fault
async def test_the_api_starts_while_redis_is_down_and_serves_once_it_is_back(
    make_client: Any, private_redis: Any
) -> None:
    server = private_redis()
    server.kill()
    client = await make_client(redis_url=server.url)  # starts: no layout check possible yet
    assert (await ok_json(await client.get("/health")))["status"] == "healthy"
    assert (await client.get("/health/detailed")).status == 503
    user = new_user()
    resp = await client.post(SESSIONS, json={"user_id": user})
    assert await error_json(resp, 503) == {"detail": REDIS_DOWN_DETAIL}

    await asyncio.to_thread(server.restart)

    async def serving() -> bool:
        resp = await client.post(SESSIONS, json={"user_id": user})
        return resp.status == 200

    await eventually(serving, "writes acknowledged once Redis is back", within=10, interval=0.2)
    # The deferred layout check runs too: the bucket count gets on record.
    r = server.client()
    meta = f"{client.app[SETTINGS].key_prefix}:meta"

    async def checked() -> bool:
        return await asyncio.to_thread(r.hget, meta, "buckets") == "16"

    try:
        await eventually(checked, "the deferred layout check", within=5, interval=0.1)
    finally:
        r.close()


@pytest.mark.fault
def test_the_api_started_while_redis_is_down_stops_on_a_wrong_bucket_count_once_it_is_back(
    private_redis: Any, test_urls: Any, tmp_path: Path
) -> None:
    """The layout check the API could not run at start runs once Redis answers; data written with
    another REDIS_BUCKETS then stops the process, as it would have at start (a real process: it stops
    itself with SIGTERM)."""
    server = private_redis("--appendonly", "yes", "--appendfsync", "always")
    prefix = support.new_name("lay")
    with server.client() as r:
        r.hset(f"{prefix}:meta", "buckets", "8")  # on disk before the reply (appendfsync always)
    server.kill()
    port = servers.free_port()
    env = support.service_env(
        REDIS_URL=server.url,
        DATABASE_URL=test_urls.database_url,
        KEY_PREFIX=prefix,
        SERVICE_HOST="127.0.0.1",
        SERVICE_PORT=str(port),
        SERVICE_PROCESSES="1",
    )
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "session_svc"],
            cwd=support.ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        waiting = b"the layout is checked once it answers"
        support.wait_sync(lambda: waiting in log.read_bytes(), "the API up", 30)
        assert proc.poll() is None
        server.restart()  # the data comes back from the AOF, written with 8 buckets
        status = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert "stopping: wrong key layout" in text, text[-3000:]
    assert f"REDIS_BUCKETS=16, but the data under prefix '{prefix}' was written with 8" in text, text[-3000:]
    assert status == 0, text[-3000:]  # a clean stop (SIGTERM to itself), not a crash
