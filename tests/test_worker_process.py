"""The worker process (``python -m workers``) on the shared Redis and PostgreSQL, with this test's key
prefix and the run's schema: its Prometheus endpoint is off by default (WORKER_METRICS_PORT=0) and on
when a port is set, it writes through what the API acknowledged, and SIGTERM stops it cleanly (exit
status 0, within the stop timeout). Fault tests kill workers with SIGKILL; this is the graceful path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import urllib.request
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from session_svc.record.keys import Keys
from session_svc.settings import Settings
from session_svc.storage import heartbeat
from tests import pg_rows, servers
from tests.helpers import add_message, make_session, new_user
from tests.support import eventually


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on: its socket inodes, looked up in /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


async def test_metrics_are_off_by_default_on_at_a_port_and_sigterm_stops_the_worker_cleanly(
    client: Any, redis: Redis, keys: Keys, pg: Any, db_schema: str, settings: Settings, tmp_path: Path
) -> None:
    assert Settings().worker_metrics_port == 0 and settings.worker_metrics_port == 0
    port = servers.free_port()
    off = servers.start_worker(settings, f"{settings.key_prefix}-off", tmp_path)
    on = servers.start_worker(
        dataclasses.replace(settings, worker_metrics_port=port), f"{settings.key_prefix}-on", tmp_path
    )
    workers = [off, on]
    try:

        async def both_beat() -> bool:
            assert off.alive and on.alive, off.tail() + on.tail()
            beats = {hb.name: hb for hb in await heartbeat.read(redis, keys)}
            return {off.name, on.name} <= set(beats)

        await eventually(both_beat, "both workers' heartbeats", within=30)
        beats = {hb.name: hb for hb in await heartbeat.read(redis, keys)}
        assert (beats[off.name].pid, beats[on.name].pid) == (off.proc.pid, on.proc.pid)

        user = new_user()
        sid = (await make_session(client, user))["session_id"]
        sent = await add_message(client, sid, user, content="through a real worker")

        async def written() -> bool:
            return await pg_rows.pg_messages(pg, db_schema, sid) == [pg_rows.api_message(sent)]

        await eventually(written, "the message written through to Postgres", within=30)

        assert listening_ports(off.proc.pid) == set()  # 0: no endpoint at all
        assert listening_ports(on.proc.pid) == {port}
        metrics = await asyncio.to_thread(scrape, port)
        for name in (
            "session_worker_drain_paused 0.0",
            "session_worker_heartbeat_ok 1.0",
            "session_worker_arq_restarts_total 0.0",
            "session_worker_last_flush_timestamp_seconds",
            "session_flush_batches_total",
        ):
            assert name in metrics, name
    finally:
        took = await asyncio.to_thread(servers.stop_workers, workers)  # SIGTERM: exit 0, in time
    print(f"\nworkers stopped by SIGTERM in {sorted(round(t, 2) for t in took.values())} s")
    for w in workers:  # the shutdown path ran (not a kill)
        assert f"worker {w.name} stopping" in w.tail(), w.tail()


async def test_the_worker_refuses_data_written_with_another_bucket_count(
    redis: Redis, settings: Settings, tmp_path: Path
) -> None:
    """A worker started with another REDIS_BUCKETS would drain the wrong outbox streams: it checks the
    layout at start, like the API, and exits with the reason."""
    await redis.hset(Keys(settings.key_prefix, 16).meta, "buckets", "8")
    worker = servers.start_worker(settings, f"{settings.key_prefix}-wrong", tmp_path)
    try:
        status = await asyncio.to_thread(worker.proc.wait, 30)
    finally:
        worker.kill()
    assert status != 0
    assert f"REDIS_BUCKETS=16, but the data under prefix '{settings.key_prefix}' was written with 8" in (
        worker.tail()
    )


def test_cron_ticks_of_two_deployments_never_share_a_job_id() -> None:
    """arq runs a cron tick once per job id ``<name>:<time>``: the names carry the key prefix, so two
    deployments (or test runs) on one arq Redis do not swallow each other's sweeps."""
    from workers.main import cron_jobs

    a = {job.name for job in cron_jobs(Settings(key_prefix="a"))}
    b = {job.name for job in cron_jobs(Settings(key_prefix="b"))}
    assert len(a) == 3 and not a & b
