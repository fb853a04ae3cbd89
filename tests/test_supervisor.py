"""SERVICE_PROCESSES=N: one supervisor, N API processes sharing the port, one Consul registration, one
metrics sum; a killed process is replaced, SIGTERM stops them all. Real processes on the shared Redis
and Postgres, with this test's own prefix and schema; a stand-in Consul agent (tests/consul_agent.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis as redis_sync
from prometheus_client.parser import text_string_to_metric_families

from session_svc.settings import Settings
from tests import servers, support
from tests.consul_agent import REGISTER, Agent, ready
from tests.support import eventually

MESSAGES = "/api/v1/sessions/{session_id}/messages"


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


def post(url: str, body: Any) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def answered_by(url: str) -> str:
    """Which process answered: the per-process prefix of the request id it made (a new connection each
    time, so the kernel picks a process each time)."""
    with urllib.request.urlopen(url + "/health", timeout=10) as resp:
        return str(resp.headers["X-Request-ID"])[:8]


def appends_counted(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "session_http_requests_total" and s.labels == {
                "route": MESSAGES, "method": "POST", "status": "200"
            }:  # fmt: skip
                return s.value
    return 0.0


def start_two(settings: Settings, tmp_path: Path) -> servers.ApiProcess:
    """``python -m session_svc`` supervising two API processes on a free port."""
    env = support.api_settings(settings.redis_url, settings.database_url, settings.db_schema,
                               settings.key_prefix, servers.free_port())  # fmt: skip
    env["SERVICE_PROCESSES"] = "2"
    return servers.start_api(env, tmp_path)


def test_two_processes_share_the_port_a_killed_one_is_replaced_and_sigterm_stops_all(
    settings: Settings, tmp_path: Path
) -> None:
    api = start_two(settings, tmp_path)
    try:
        api.wait_healthy()
        support.wait_sync(lambda: len(children(api.proc.pid)) == 2, "two API processes", 20)
        first = children(api.proc.pid)
        # Both answer: the kernel spreads new connections over them.
        support.wait_sync(lambda: len({answered_by(api.url) for _ in range(20)}) == 2, "both answering", 10)
        sid = post(api.url + "/api/v1/sessions", {"user_id": "sup"})["session_id"]
        append = f"{api.url}/api/v1/sessions/{sid}/messages?user_id=sup"
        for i in range(20):
            post(append, {"role": "user", "content": f"m{i}"})

        # Published once a second: a SIGKILLed process loses at most its last second of counts.
        support.wait_sync(lambda: appends_counted(api.url) == 20, "20 appends counted", 10)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        support.wait_sync(
            lambda: len(children(api.proc.pid)) == 2 and victim not in children(api.proc.pid),
            "the killed process to be replaced",
            15,
        )
        support.wait_sync(lambda: len({answered_by(api.url) for _ in range(20)}) == 2, "both answering", 10)
        took = time.monotonic() - killed
        print(f"\nsupervisor: a SIGKILLed API process was replaced and answering {took:.1f}s later")
        for i in range(10):
            post(append, {"role": "user", "content": f"n{i}"})
        # The sum over processes keeps the dead one's counts (its file stays) and is the same from either.
        support.wait_sync(lambda: appends_counted(api.url) == 30, "30 appends counted", 10)
        assert {appends_counted(api.url) for _ in range(10)} == {30}
        survivors = children(api.proc.pid)
        api.proc.send_signal(signal.SIGTERM)
        assert api.proc.wait(timeout=30) == 0, api.tail()
        for pid in survivors:
            support.wait_sync(lambda pid=pid: not Path(f"/proc/{pid}").exists(), "the processes to exit", 10)
        assert not api.healthy()
        assert "exited with status -9; starting it again" in api.tail()
    finally:
        api.stop()


def test_a_process_that_cannot_start_stops_the_supervisor(settings: Settings, tmp_path: Path) -> None:
    """Data written with another bucket count: every process refuses to start. The supervisor gives up
    after a few tries, with exit status 1, instead of restarting them forever."""
    with redis_sync.Redis.from_url(settings.redis_url) as r:
        r.hset(f"{settings.key_prefix}:meta", "buckets", "8")
    api = start_two(settings, tmp_path)
    try:
        assert api.proc.wait(timeout=60) == 1, api.tail()
    finally:
        api.stop()
    assert "failed to start 3 times in a row" in api.tail()
    # Each try said it never served (EX_CONFIG), which counts however long the start took.
    assert "exited with status 78; starting it again" in api.tail()


async def test_one_consul_registration_for_the_port(settings: Settings, tmp_path: Path) -> None:
    agent = Agent()
    await agent.start()
    port = servers.free_port()
    env = support.api_settings(settings.redis_url, settings.database_url, settings.db_schema,
                               settings.key_prefix, port)  # fmt: skip
    env.update(SERVICE_PROCESSES="2", CONSUL_HOST="127.0.0.1", CONSUL_PORT=str(agent.port))
    api = servers.start_api(env, tmp_path)
    try:
        await asyncio.to_thread(api.wait_healthy)
        await eventually(lambda: ready(len(children(api.proc.pid)) == 2), "two API processes", 20)
        await eventually(lambda: ready(bool(agent.to(REGISTER))), "the registration", 10)
        await asyncio.sleep(1.0)  # the processes had time to register too, were they to
        [call] = agent.to(REGISTER)
        assert call.body["Port"] == port
        api.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(api.proc.wait, 30) == 0
    finally:
        await asyncio.to_thread(api.stop)
        await agent.stop()
    assert [c.path for c in agent.calls if "deregister" in c.path] == [
        f"/v1/agent/service/deregister/{call.body['ID']}"
    ]


def test_the_api_processes_stop_when_the_supervisor_is_killed(settings: Settings, tmp_path: Path) -> None:
    """A supervisor SIGKILLed (an OOM kill, a test's timeout) must not leave its API processes serving
    the port as orphans: each gets SIGTERM from the kernel (parent-death signal) and stops."""
    api = start_two(settings, tmp_path)
    try:
        api.wait_healthy()
        support.wait_sync(lambda: len(children(api.proc.pid)) == 2, "two API processes", 20)
        orphans = children(api.proc.pid)
        api.proc.kill()
        api.proc.wait(timeout=10)
        for pid in orphans:
            support.wait_sync(lambda pid=pid: not Path(f"/proc/{pid}").exists(), "the orphans to exit", 20)
        assert not api.healthy()
    finally:
        api.stop()
