"""The service on Redis Cluster (REDIS_CLUSTER=true): every route and every Lua script on a local
3-master cluster (a script whose keys spanned slots would fail with CROSSSLOT), the write-through end to
end through the worker's own drain, and the service-wide figures (stats, backlog, metrics) exact
although the buckets live on three masters."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any

import asyncpg
import pytest

from session_svc.http.appkeys import BACKEND
from session_svc.settings import Settings
from session_svc.storage import heartbeat, outbox
from session_svc.storage.resources import Backend, open_backend
from session_svc.storage.scripts import Arg, Script
from tests.conftest import MakeClient
from tests.helpers import (
    add_memory,
    add_message,
    get_session,
    list_messages,
    list_sessions,
    make_session,
    new_user,
    ok_json,
    session_url,
    stats,
    update_session,
)
from tests.outbox_drain import drain
from tests.servers import LocalCluster
from tests.support import new_name
from workers import expiry
from workers import main as worker_main
from workers.flush import Flusher

pytestmark = pytest.mark.cluster


def script_names(backend: Backend) -> set[str]:
    return {s.name for s in vars(backend.scripts).values() if isinstance(s, Script)}


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Names of the scripts that ran and answered without an error, in this process."""
    names: set[str] = set()
    real = Script.__call__

    def recording(
        self: Script,
        keys: Mapping[str, str],
        args: Mapping[str, Arg],
        rest: Sequence[Arg] = (),
        client: Any = None,
    ) -> Awaitable[Any]:
        call = real(self, keys, args, rest, client)

        async def wait() -> Any:
            reply = await call
            names.add(self.name)
            return reply

        return wait()

    monkeypatch.setattr(Script, "__call__", recording)
    return names


@pytest.fixture
async def worker_backend(cluster_settings: Settings) -> AsyncIterator[Backend]:
    """The worker's backend on the cluster, opened as ``workers.main`` opens it."""
    async with open_backend(
        cluster_settings, socket_timeout=cluster_settings.worker_redis_socket_timeout, coalesce=True
    ) as backend:
        yield backend


def flusher_of(backend: Backend) -> Flusher:
    return Flusher(backend, new_name("t-"), batch_size=500, max_deliveries=3, claim_idle_ms=0)


async def test_every_route_and_every_script_run_on_the_cluster(
    make_client: MakeClient,
    cluster_settings: Settings,
    redis_cluster: LocalCluster,
    worker_backend: Backend,
    pg: asyncpg.Connection,
    ran: set[str],
) -> None:
    client = await make_client(**{f: getattr(cluster_settings, f) for f in ("redis_url", "arq_redis_url")},
                               redis_cluster=True)  # fmt: skip
    api: Backend = client.app[BACKEND]
    # Twelve users whose buckets sit on all three masters.
    users: list[str] = []
    masters: dict[int, int] = {}
    while len(users) < 12:
        user = new_user()
        master = redis_cluster.master_of(api.keys.for_user(user).stats)
        if len(masters) < 3 and master in masters and len(users) >= 9:
            continue  # keep room for a master not seen yet
        users.append(user)
        masters[master] = masters.get(master, 0) + 1
    assert len(masters) == 3, masters
    sids: dict[str, str] = {}
    for i, user in enumerate(users):
        sid = (await make_session(client, user, title=f"t{i}", metadata={"n": i}))["session_id"]
        sids[user] = sid
        await update_session(client, sid, user, title=f"renamed {i}")
        for j in range(3):
            await add_message(client, sid, user, content=f"m{j}", tokens_used=2, cost_usd=0.0001)
        await add_memory(client, sid, user, memory_type="preference", content="dark mode")
        assert (await get_session(client, sid, user))["message_count"] == 3
        page = await list_messages(client, sid, user, page_size=2)
        assert [m["sequence"] for m in page["messages"]] == [1, 2] and page["total"] == 3
        assert (await ok_json(await client.get(session_url(sid, "/memory"), params={"user_id": user})))[
            "content"
        ] == "dark mode"
        memories = await ok_json(await client.get(session_url(sid, "/memories"), params={"user_id": user}))
        assert memories["total"] == 1
        summary = await ok_json(await client.get(session_url(sid, "/summary"), params={"user_id": user}))
        assert summary["has_memory"] is True
        assert (await list_sessions(client, user))["total"] == 1
    ended = users[0]
    resp = await client.delete(session_url(sids[ended]), params={"user_id": ended})
    assert resp.status == 200

    figures = await stats(client)
    assert figures["total_sessions"] == 12 and figures["active_sessions"] == 11
    assert figures["total_messages"] == 36 and figures["total_tokens"] == 72
    assert figures["total_cost"] == 0.0036

    # The worker: its heartbeat, its drain (consumer groups, flushed marks), then Postgres has it all.
    await heartbeat.beat(
        worker_backend.scripts, worker_backend.keys, heartbeat.Heartbeat("w", 1e10, 1, 0.0, "ok")
    )
    flushed = await drain(flusher_of(worker_backend))
    assert flushed == 12 * (1 + 1 + 3 + 1) + 1  # create, rename, 3 messages, memory; one end
    rows = await pg.fetch(
        "SELECT session_id::text AS sid, message_count FROM sessions WHERE session_id = ANY($1::text[])",
        list(sids.values()),
    )
    assert sorted(r["message_count"] for r in rows) == [3] * 12
    n = await pg.fetchval(
        "SELECT count(*) FROM session_messages WHERE session_id = ANY($1::text[])", list(sids.values())
    )
    assert n == 36
    backlog = await outbox.backlog(worker_backend.redis, worker_backend.keys)
    assert (backlog.entries, backlog.dead_letters) == (0, 0)

    detailed = await client.get("/health/detailed")
    body = await detailed.json()
    assert detailed.status == 200, body
    assert body["outbox_backlog"] == 0 and body["workers_alive"] >= 1, body
    metrics = await (await client.get("/metrics")).text()
    assert 'session_messages_total{role="user"} 36.0' in metrics, metrics
    assert "session_redis_up 1.0" in metrics

    # Every write is flushed: the sweep evicts them all; a read comes from Postgres, a write rehydrates.
    assert await expiry.sweep(worker_backend, hot_ttl_s=0) == 12
    # The ended session (evicted, not active) leaves its user's index; it is still listed, from Postgres.
    assert await expiry.trim_user_indexes(worker_backend, retention_s=0) >= 1
    listed = await list_sessions(client, ended)
    assert listed["total"] == 1 and listed["sessions"][0]["session_id"] == sids[ended], listed
    user = users[1]
    assert (await get_session(client, sids[user], user))["message_count"] == 3  # from Postgres
    assert (await add_message(client, sids[user], user, content="back"))["sequence"] == 4
    await drain(flusher_of(worker_backend))
    # Reconciliation finds nothing lost; a stuck mark is only set on a session in Redis.
    assert await expiry.reconcile(worker_backend, stale_after_s=0) == 0
    await worker_backend.scripts.mark_stuck(worker_backend.keys, 0, "no-such-session", "0-1")
    assert (await stats(client))["total_messages"] == 37

    # An entry that cannot be written goes to its bucket's dead letters (acknowledged in the same script).
    await worker_backend.redis.xadd(worker_backend.keys.outbox(3), {"k": "?"})
    await drain(flusher_of(worker_backend))
    assert (await outbox.backlog(worker_backend.redis, worker_backend.keys)).dead_letters == 1

    # The guarded writes (Idempotency-Key, rate limit) add keys of their own: all in the user's slot, so a
    # retry replays on the cluster as on one Redis (a key elsewhere would fail with CROSSSLOT).
    user = users[2]
    for url, body in (
        (session_url(sids[user], "/messages"), {"role": "user", "content": "once"}),
        ("/api/v1/sessions", {"user_id": user, "title": "once"}),
    ):
        first, retry = [
            await client.post(
                url, params={"user_id": user}, json=body, headers={"Idempotency-Key": f"k-{url}"}
            )
            for _ in range(2)
        ]
        assert (first.status, retry.status) == (200, 200), await first.text()
        assert await first.read() == await retry.read()
        assert retry.headers.get("Idempotent-Replayed") == "true"
    assert (await get_session(client, sids[user], user))["message_count"] == 4
    assert (await list_sessions(client, user))["total"] == 2

    # Every script ran at least once, in the API's coalescer or in the worker's direct calls.
    assert ran == script_names(api), script_names(api) - ran


async def test_the_worker_refuses_a_cluster_without_a_standalone_redis_for_arq(
    cluster_settings: Settings,
) -> None:
    settings = dataclasses.replace(cluster_settings, arq_redis_url="")
    with pytest.raises(RuntimeError, match="ARQ_REDIS_URL"):
        await worker_main.serve(settings, asyncio.Event())


def test_cluster_settings_seeds_default_buckets_and_wait() -> None:
    s = Settings.from_env(
        {"REDIS_CLUSTER": "true", "REDIS_URL": "redis://:pw@10.0.0.1:7000/0",
         "REDIS_CLUSTER_NODES": "10.0.0.2:7001, [::1]:7002"}
    )  # fmt: skip
    assert s.cluster_seeds == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)]
    assert s.cluster_password == "pw"
    # Unset, the bucket count is 16 on a standalone Redis and 64 on a cluster; set, it is what it says.
    assert (Settings().redis_buckets, s.redis_buckets) == (16, 64)
    assert Settings(redis_cluster=True, redis_buckets=16).redis_buckets == 16
    with pytest.raises(ValueError, match="database 0"):
        Settings(redis_cluster=True, redis_url="redis://127.0.0.1:7000/3")
    with pytest.raises(ValueError, match="host:port"):
        Settings(redis_cluster=True, redis_cluster_nodes="10.0.0.2")
    with pytest.raises(ValueError, match="REDIS_WAIT_TIMEOUT"):
        Settings(redis_wait_replicas=1, redis_wait_timeout=2.0, redis_socket_timeout=1.0)
