"""A master of the cluster is killed (SIGKILL) under write load, with the worker draining meanwhile: its
replica is promoted, the API answers 503 for a moment and then writes again without a restart, and every
acknowledged write is in Postgres afterwards.

With asynchronous replication a master can acknowledge a write its replica never received; a failover
then loses it. Without REDIS_WAIT_REPLICAS the test counts such losses (and reports them: it cannot
promise none); with REDIS_WAIT_REPLICAS=1 a write is acknowledged only once a replica has it, and the test
asserts that nothing acknowledged is lost. The figures (503s, recovery time, writes lost) are printed
(``pytest -s``) and recorded in docs/performance.md ("Redis Cluster").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from session_svc.record.keys import Keys
from session_svc.settings import Settings
from session_svc.storage.redis_client import REDIS_DOWN
from session_svc.storage.resources import Backend, open_backend
from tests.conftest import MakeClient, MakeSettings, ServerUrls
from tests.helpers import Client, make_session, new_user, session_url
from tests.outbox_drain import drain
from tests.servers import LocalCluster, free_port_block, start_cluster
from tests.support import eventually, new_name
from workers.flush import Flusher

pytestmark = [pytest.mark.cluster, pytest.mark.fault]

WRITERS = 16
BEFORE_KILL_S = 1.0
AFTER_RECOVERY_S = 1.0
MOST_S = 40.0


@pytest.fixture(scope="module")
def failover_cluster() -> Iterator[LocalCluster]:
    """A cluster of this module's own: its masters get killed."""
    cluster = start_cluster(node_timeout_ms=2000)
    try:
        yield cluster
    finally:
        cluster.down()


@dataclass
class Run:
    acked: dict[str, tuple[str, int]] = field(default_factory=dict)  # message id -> (sid, sequence)
    unavailable: int = 0  # 503s
    details: set[str] = field(default_factory=set)
    killed_at: float = 0.0
    recovered_after: float | None = None  # seconds from the kill to the first 200 on the killed shard
    recovered: asyncio.Event = field(default_factory=asyncio.Event)


async def _writer(
    client: Client, user: str, sid: str, on_victim: bool, run: Run, stop: asyncio.Event
) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        content = f"{sid[:8]}-{n}"
        resp = await client.post(
            session_url(sid, "/messages"), params={"user_id": user}, json={"role": "user", "content": content}
        )
        body = await resp.json()
        if resp.status == 200:
            run.acked[body["message_id"]] = (sid, body["sequence"])
            if on_victim and run.killed_at and run.recovered_after is None:
                run.recovered_after = time.monotonic() - run.killed_at
                run.recovered.set()
        else:
            assert resp.status == 503, (resp.status, body)
            run.unavailable += 1
            run.details.add(body["detail"].split(":")[0][:80])
            await asyncio.sleep(0.01)


async def _failover_under_load(
    client: Client, settings: Settings, cluster: LocalCluster, pg: asyncpg.Connection
) -> tuple[Run, int]:
    """Write from WRITERS sessions (on every shard) while the worker drains; kill the master of the
    first session's bucket; stop once its shard took writes again (plus a second). Returns the run
    and how many acknowledged messages Postgres lacks after the worker drained everything."""
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    users = [new_user() for _ in range(WRITERS)]
    sids = [(await make_session(client, u))["session_id"] for u in users]
    victim = cluster.master_of(keys.for_user(users[0]).stats)
    on_victim = [cluster.master_of(keys.for_user(u).stats) == victim for u in users]
    run = Run()
    stop = asyncio.Event()
    async with open_backend(
        settings, socket_timeout=settings.worker_redis_socket_timeout, coalesce=True
    ) as backend:
        flusher = Flusher(backend, new_name("t-"), batch_size=500, max_deliveries=5, claim_idle_ms=1000)
        worker_stop = asyncio.Event()
        worker = asyncio.create_task(flusher.run(worker_stop))
        writers = [
            asyncio.create_task(_writer(client, u, s, v, run, stop))
            for u, s, v in zip(users, sids, on_victim, strict=True)
        ]
        await asyncio.sleep(BEFORE_KILL_S)
        os.kill(cluster.pid(victim), signal.SIGKILL)
        run.killed_at = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.recovered.wait(), MOST_S)
        await asyncio.sleep(AFTER_RECOVERY_S)
        stop.set()
        await asyncio.gather(*writers)
        worker_stop.set()
        await worker
        assert run.recovered_after is not None, f"no write on the killed shard within {MOST_S}s"
        await _drain_once_redis_answers(backend)
    rows = await pg.fetch(
        "SELECT message_id, session_id, seq FROM session_messages WHERE session_id = ANY($1::text[])", sids
    )
    in_pg = {r["message_id"] for r in rows}
    lost = [m for m in run.acked if m not in in_pg]
    taken = {(r["session_id"], r["seq"]) for r in rows}
    reused = [m for m in lost if run.acked[m] in taken]  # its sequence number holds another message
    print(
        f"\nfailover (REDIS_WAIT_REPLICAS={settings.redis_wait_replicas}): {len(run.acked)} writes "
        f"acknowledged, {run.unavailable} answered 503 ({sorted(run.details)}), killed shard writable "
        f"again after {run.recovered_after:.2f}s, acknowledged writes missing from Postgres: {len(lost)} "
        f"({len(reused)} of them: their sequence number holds another message)"
    )
    return run, len(lost)


async def _drain_once_redis_answers(backend: Backend) -> None:
    """Drain all; a client whose slot map still names the dead master fails its first call, and
    (like the worker's loop) tries again with a fresh map."""
    flusher = Flusher(backend, new_name("t-"), batch_size=500, max_deliveries=5, claim_idle_ms=0)
    for _ in range(20):
        try:
            await drain(flusher, 30)
            return
        except REDIS_DOWN:
            await asyncio.sleep(0.25)
    raise AssertionError("the outbox could not be drained after the failover")


def _restore(cluster: LocalCluster) -> None:
    """The killed node starts again (``cluster.sh up``) and rejoins as a replica of its old shard."""
    cluster.script("up")


async def test_a_killed_master_is_replaced_and_the_service_recovers_without_a_restart(
    make_client: MakeClient,
    make_settings: MakeSettings,
    failover_cluster: LocalCluster,
    test_urls: ServerUrls,
    pg: asyncpg.Connection,
) -> None:
    settings, client = await _on_cluster(make_settings, make_client, failover_cluster.url, test_urls)
    try:
        run, lost = await _failover_under_load(client, settings, failover_cluster, pg)
    finally:
        _restore(failover_cluster)
    assert run.unavailable > 0  # the killed shard did answer 503 for a moment
    assert len(run.acked) > 100
    # Without WAIT a failover may lose what the old master acknowledged last: printed, not asserted
    # (the test with REDIS_WAIT_REPLICAS asserts that nothing is lost).
    print(f"without WAIT: {lost} of {len(run.acked)} acknowledged writes lost")


async def test_with_wait_replicas_nothing_acknowledged_is_lost_in_a_failover(
    make_client: MakeClient,
    make_settings: MakeSettings,
    failover_cluster: LocalCluster,
    test_urls: ServerUrls,
    pg: asyncpg.Connection,
) -> None:
    settings, client = await _on_cluster(
        make_settings,
        make_client,
        failover_cluster.url,
        test_urls,
        redis_wait_replicas=1,
        redis_wait_timeout=0.2,
    )
    restarter = asyncio.create_task(_restore_when_promoted(failover_cluster))
    try:
        run, lost = await _failover_under_load(client, settings, failover_cluster, pg)
    finally:
        await restarter
    assert run.unavailable > 0
    assert len(run.acked) > 100
    assert lost == 0


async def _restore_when_promoted(cluster: LocalCluster) -> None:
    """With WAIT 1, the promoted replica's shard has no replica left and refuses to acknowledge writes
    until one is back: restart the killed node (as an operator would) once the failover is done."""

    def promoted() -> bool:
        return any(cluster.role(p) == "down" for p in cluster.ports) and len(cluster.masters()) == 3

    deadline = time.monotonic() + MOST_S
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if await asyncio.to_thread(promoted):
            await asyncio.to_thread(_restore, cluster)
            return


async def _on_cluster(
    make_settings: MakeSettings, make_client: MakeClient, url: str, urls: ServerUrls, **extra: Any
) -> tuple[Settings, Client]:
    """The settings of an API on the cluster at ``url`` (a key prefix of its own; arq on the shared
    standalone Redis), and the app built with them."""
    overrides = {"redis_url": url, "redis_cluster": True, "arq_redis_url": urls.redis_url,
                 "key_prefix": new_name("t"), **extra}  # fmt: skip
    return make_settings(**overrides), await make_client(**overrides)


def _replica_of(cluster: LocalCluster, master: int) -> int:
    with cluster.node(master) as r:
        replicas = r.execute_command("ROLE")[2]
    return int(replicas[0][1])


async def test_a_write_no_replica_confirms_answers_503_and_is_flushed_once_it_is_replicated(
    make_client: MakeClient,
    make_settings: MakeSettings,
    failover_cluster: LocalCluster,
    test_urls: ServerUrls,
    pg: asyncpg.Connection,
) -> None:
    """With REDIS_WAIT_REPLICAS=1 and the replica of one shard stopped (SIGSTOP): writes there answer
    503 "not confirmed on replicas" (never a 2xx a failover could take back), the other shards answer
    200, and the worker leaves that shard's entries pending until the replica has them."""
    settings, client = await _on_cluster(
        make_settings,
        make_client,
        failover_cluster.url,
        test_urls,
        redis_wait_replicas=1,
        redis_wait_timeout=0.1,
    )
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    users = [new_user() for _ in range(8)]
    sids = [(await make_session(client, u))["session_id"] for u in users]
    stopped_master = failover_cluster.master_of(keys.for_user(users[0]).stats)
    replica = _replica_of(failover_cluster, stopped_master)
    on_stopped = [failover_cluster.master_of(keys.for_user(u).stats) == stopped_master for u in users]
    assert not all(on_stopped)
    async with open_backend(
        settings, socket_timeout=settings.worker_redis_socket_timeout, coalesce=True
    ) as backend:
        flusher = Flusher(backend, new_name("t-"), batch_size=500, max_deliveries=5, claim_idle_ms=0)
        await flusher.ensure_groups()
        await flusher.flush(await flusher.read())  # the sessions' creation
        os.kill(failover_cluster.pid(replica), signal.SIGSTOP)
        try:
            for user, sid, stopped in zip(users, sids, on_stopped, strict=True):
                resp = await client.post(
                    session_url(sid, "/messages"),
                    params={"user_id": user},
                    json={"role": "user", "content": "x"},
                )
                body = await resp.json()
                if stopped:
                    assert resp.status == 503, body
                    assert "not confirmed on its replicas" in body["detail"]
                else:
                    assert resp.status == 200, body
            read = await flusher.read()
            assert flusher.unconfirmed
            assert {e.f["sid"] for e in read} == {s for s, st in zip(sids, on_stopped, strict=True) if not st}
            await flusher.flush(read)
        finally:
            os.kill(failover_cluster.pid(replica), signal.SIGCONT)
        # The replica has them now: the entries left pending are flushed (the write answered 503 did
        # reach the primary: its outcome was unknown, and it is kept).
        await _drain_once_redis_answers(backend)
    n = await pg.fetchval("SELECT count(*) FROM session_messages WHERE session_id = ANY($1::text[])", sids)
    assert n == len(users)


async def test_the_api_started_before_its_cluster_answers_503_then_serves_once_it_is_up(
    make_client: MakeClient, make_settings: MakeSettings, test_urls: ServerUrls, tmp_path: Path
) -> None:
    """No node answers at start: the API starts anyway, a write answers 503 "nothing was written"; once
    the cluster is up (``cluster.sh up``), the same process serves, without a restart."""
    cluster = LocalCluster(free_port_block(), tmp_path)
    _, client = await _on_cluster(make_settings, make_client, cluster.url, test_urls)
    try:
        resp = await client.post("/api/v1/sessions", json={"user_id": "early"})
        body = await resp.json()
        assert resp.status == 503 and "nothing was written" in body["detail"], body
        await asyncio.to_thread(cluster.script, "up")

        async def created() -> bool:
            resp = await client.post("/api/v1/sessions", json={"user_id": "early"})
            return resp.status == 200

        await eventually(created, "a session created once the cluster is up", within=30, interval=0.2)
        stats = await client.get("/api/v1/sessions/stats")  # redis-py's own path (a pipeline), too
        assert stats.status == 200 and (await stats.json())["total_sessions"] >= 1
    finally:
        await asyncio.to_thread(cluster.down)
