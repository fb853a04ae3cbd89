"""Consul registration of the API: what it sends to the agent, and that the agent being down, failing
or hanging never stops, delays or blocks the service.

The agent is a stand-in (``Agent``: an aiohttp server on a spare port) that records every call and
keeps what was registered. The real process (``python -m session_svc`` with CONSUL_HOST/CONSUL_PORT)
registers, serves while the agent is down, and deregisters on SIGTERM; the retry and watch paths run
in-process with the backoff shortened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from session_svc import __version__
from session_svc.http.appkeys import CONSUL
from session_svc.ops import consul
from session_svc.ops.consul import Registration, Service
from session_svc.settings import Settings
from tests import servers, support
from tests.consul_agent import REGISTER, Agent, ready
from tests.support import eventually


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    """A stand-in agent on a spare port, not started: ``await agent.start()``."""
    a = Agent()
    yield a
    await a.stop()


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Registration, "BACKOFF_MIN_S", 0.05)
    monkeypatch.setattr(Registration, "BACKOFF_MAX_S", 0.2)
    monkeypatch.setattr(Registration, "WATCH_EVERY_S", 0.05)


def _api_env(settings: Settings, agent: Agent, **extra: str) -> dict[str, str]:
    port = servers.free_port()
    s = settings
    env = support.api_settings(s.redis_url, s.database_url, s.db_schema, s.key_prefix, port)
    env.update(CONSUL_HOST="127.0.0.1", CONSUL_PORT=str(agent.port), **extra)
    return env


# The real process ---------------------------------------------------------------------------------------


async def test_the_api_process_registers_with_the_guides_check_and_deregisters_on_sigterm(
    settings: Settings, agent: Agent, tmp_path: Path
) -> None:
    await agent.start()
    env = _api_env(settings, agent, CONSUL_TAGS=" primary, v1 ,,", CONSUL_TOKEN="t0ken")
    api = servers.start_api(env, tmp_path)
    port = api.port
    try:
        api.wait_healthy()
        await eventually(lambda: ready(bool(agent.to(REGISTER))), "the registration", within=10)
        [call] = agent.to(REGISTER)
        service_id = f"session_service-127.0.0.1-{port}"
        assert (call.method, call.query, call.token) == ("PUT", {"replace-existing-checks": "true"}, "t0ken")
        assert call.body == {
            "ID": service_id,
            "Name": "session_service",
            "Tags": ["primary", "v1"],
            "Address": "127.0.0.1",
            "Port": port,
            "Meta": {"version": __version__},
            "Check": {
                "HTTP": f"http://127.0.0.1:{port}/health",
                "Interval": "10s",
                "Timeout": "5s",
                "DeregisterCriticalServiceAfter": "10m",
            },
        }
        async with aiohttp.ClientSession() as http, http.get(call.body["Check"]["HTTP"]) as resp:
            assert resp.status == 200  # what the agent will check answers
        api.proc.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(api.proc.wait, 15)
    finally:
        await asyncio.to_thread(api.stop)
    assert status == 0, api.tail()
    last = agent.calls[-1]
    assert (last.method, last.path, last.token) == (
        "PUT",
        f"/v1/agent/service/deregister/{service_id}",
        "t0ken",
    )
    assert agent.services == {}
    assert f"registered {service_id} in Consul" in api.tail() and f"deregistered {service_id}" in api.tail()


async def test_the_api_serves_while_the_agent_is_down_and_registers_once_it_is_up(
    settings: Settings, agent: Agent, tmp_path: Path
) -> None:
    """Connection refused at start: the API starts and answers at once, logs each failed attempt, and
    registers once the agent answers (backoff 1 s doubling, so within a few seconds here)."""
    api = servers.start_api(_api_env(settings, agent), tmp_path)
    try:
        t0 = time.monotonic()
        api.wait_healthy()
        serving_after = time.monotonic() - t0
        await eventually(lambda: ready("(attempt 1)" in api.tail()), "a failed attempt logged", within=10)
        assert "WARNING session_svc.ops.consul Consul registration of" in api.tail()
        await agent.start()
        t1 = time.monotonic()
        await eventually(lambda: ready(bool(agent.services)), "the registration", within=20)
        registered_after = time.monotonic() - t1
        assert [c.path for c in agent.calls] == [REGISTER]
        assert api.healthy()
    finally:
        await asyncio.to_thread(api.stop)  # in a thread: the agent answers on this loop
    assert agent.to(f"/v1/agent/service/deregister/{agent.to(REGISTER)[0].body['ID']}")
    print(
        f"\nserving {serving_after:.2f}s after start with the agent down;"
        f" registered {registered_after:.2f}s after the agent came up"
    )


# In-process: retries, the watch, the bounds ---------------------------------------------------------------


async def test_an_agent_answering_500_is_retried_with_backoff(
    make_client: Any, agent: Agent, fast_retries: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the app (its cleanup context and on_shutdown hook): two 500s, then the registration;
    closing the app deregisters."""
    caplog.set_level(logging.INFO, "session_svc.ops.consul")
    await agent.start()
    agent.fail_next = 2
    client = await make_client(consul_host="127.0.0.1", consul_port=agent.port, service_host="127.0.0.1")
    await eventually(lambda: ready(client.app[CONSUL].registered), "the registration", within=10)
    calls = agent.to(REGISTER)
    assert len(calls) == 3 and calls[0].body == calls[1].body == calls[2].body
    failures = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [f"(attempt {n})" in r.getMessage() for n, r in enumerate(failures, 1)] == [True, True]
    assert all("HTTP 500" in r.getMessage() for r in failures)
    assert sum("registered session_service-" in r.getMessage() for r in caplog.records) == 1
    await client.close()
    assert agent.calls[-1].path == f"/v1/agent/service/deregister/{calls[0].body['ID']}"


async def test_a_registration_the_agent_lost_is_made_again(agent: Agent, fast_retries: None) -> None:
    await agent.start()
    registration = Registration(agent.url, Service("10.1.2.3", 8205, ("api",)))
    await registration.start()
    try:
        await eventually(lambda: ready(registration.registered), "the registration", within=10)
        agent.services.clear()  # the agent lost its state (or removed a long-critical instance)
        await eventually(lambda: ready(len(agent.to(REGISTER)) == 2), "the registration again", within=10)
        assert "session_service-10.1.2.3-8205" in agent.services
    finally:
        await registration.stop()


async def test_stop_is_bounded_when_the_agent_hangs(agent: Agent, fast_retries: None) -> None:
    await agent.start()
    registration = Registration(agent.url, Service("10.1.2.3", 8205, ()))
    await registration.start()
    await eventually(lambda: ready(registration.registered), "the registration", within=10)
    agent.hang = True
    t0 = time.monotonic()
    await registration.stop()
    assert time.monotonic() - t0 < consul.DEREGISTER_TIMEOUT_S + 0.5
    await registration.stop()  # again: nothing to do


async def test_no_consul_host_no_registration(client: Any) -> None:
    assert Settings().consul_host == "" and CONSUL not in client.app


def test_the_advertised_address_and_the_service_id() -> None:
    wildcard = Settings(service_host="0.0.0.0", service_port=8205)
    primary = consul.service_of(wildcard).address
    assert not ipaddress.ip_address(primary).is_unspecified
    assert consul.service_of(dataclasses.replace(wildcard, service_host="10.0.0.7")).address == "10.0.0.7"
    explicit = dataclasses.replace(wildcard, consul_service_address="192.168.1.5")
    service = consul.service_of(explicit)
    assert (service.id, service.check_url) == (
        "session_service-192.168.1.5-8205",
        "http://192.168.1.5:8205/health",
    )
    assert Service("fd00::5", 8205, ()).check_url == "http://[fd00::5]:8205/health"
    assert consul.service_of(Settings()).tags == ("api", "v1")
