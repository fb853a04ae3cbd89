"""Registration of the API in Consul, through the local agent's HTTP API (plain aiohttp client calls).

What is registered (the API guide's "Consul 集成"): service ``session_service`` at this host's advertised
address and SERVICE_PORT, with the tags of CONSUL_TAGS and an HTTP check of ``/health`` every 10 s with
a 5 s timeout. The ID is ``session_service-<address>-<port>``: one registration per address and port,
the same after a restart, so that a restarted process replaces its own entry instead of adding one. An
instance whose check stays critical for DEREGISTER_AFTER is removed by the agent (a host that died
without deregistering).

Consul never stops or delays the service: ``start()`` only starts a task, which registers, retrying
with backoff (1 s doubling to 30 s, each failure logged at WARNING) until the agent accepts. Then it asks
the agent every 30 s whether it still knows the service (an agent that lost its state, or removed the
service after a long outage) and registers again if not. ``stop()`` deregisters, within
DEREGISTER_TIMEOUT_S; if that fails, the check goes critical and the agent removes the entry after
DEREGISTER_AFTER.

Owned by whoever owns the port: the API app (a cleanup context and an ``on_shutdown`` hook in
``app.py``) while one process serves it; a supervisor of several processes sharing the port, later
(docs/decisions.md, "Consul").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any

import aiohttp

from session_svc import __version__
from session_svc.settings import Settings

log = logging.getLogger("session_svc.ops.consul")

SERVICE_NAME = "session_service"
# The API guide's check; the agent removes an instance critical for this long.
CHECK_INTERVAL, CHECK_TIMEOUT, DEREGISTER_AFTER = "10s", "5s", "10m"
# Seconds per call to the agent, and for the deregistration of a stopping process.
CALL_TIMEOUT_S = 5.0
DEREGISTER_TIMEOUT_S = 2.0
# TEST-NET-1 (RFC 5737): routed like any outside address, never used. "Connecting" a UDP socket to it
# sends nothing; the kernel only picks the source address of the default route.
_PROBE = ("192.0.2.1", 9)
_WILDCARDS = {"", "0.0.0.0", "::"}


class ConsulError(Exception):
    """The agent answered, but not with success."""


@dataclass(frozen=True, slots=True)
class Service:
    """This process's entry in Consul's catalog."""

    address: str
    port: int
    tags: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{SERVICE_NAME}-{self.address}-{self.port}"

    @property
    def check_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/health"

    def definition(self) -> dict[str, Any]:
        """The body of ``PUT /v1/agent/service/register`` (Consul's field names)."""
        return {
            "ID": self.id,
            "Name": SERVICE_NAME,
            "Tags": list(self.tags),
            "Address": self.address,
            "Port": self.port,
            "Meta": {"version": __version__},
            "Check": {
                "HTTP": self.check_url,
                "Interval": CHECK_INTERVAL,
                "Timeout": CHECK_TIMEOUT,
                "DeregisterCriticalServiceAfter": DEREGISTER_AFTER,
            },
        }


def primary_address() -> str:
    """This host's address on its default route, found without sending anything; else the address its
    name resolves to; else loopback."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(_PROBE)
        address = str(probe.getsockname()[0])
        if address != "0.0.0.0":
            return address
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


def service_of(settings: Settings) -> Service:
    """CONSUL_SERVICE_ADDRESS, else SERVICE_HOST unless it is a wildcard, else the primary address."""
    address = settings.consul_service_address or (
        settings.service_host if settings.service_host not in _WILDCARDS else primary_address()
    )
    tags = tuple(t.strip() for t in settings.consul_tags.split(",") if t.strip())
    return Service(address, settings.service_port, tags)


class Registration:
    """Keeps ``service`` registered with the agent at ``agent_url`` from ``start()`` to ``stop()``."""

    BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 30.0
    WATCH_EVERY_S = 30.0

    def __init__(self, agent_url: str, service: Service, token: str = "") -> None:
        self.agent_url = agent_url.rstrip("/")
        self.service = service
        self._headers = {"X-Consul-Token": token} if token else {}
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.registered = False
        # A register request may have reached the agent: deregister on the way out.
        self._maybe_known = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Registration:
        agent = f"http://{settings.consul_host}:{settings.consul_port}"
        return cls(agent, service_of(settings), settings.consul_token)

    async def start(self) -> None:
        """Start registering in the background; returns at once whether the agent answers or not."""
        if self._http is not None:
            return
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S), headers=self._headers
        )
        self._task = asyncio.create_task(self._run(), name="consul-registration")

    async def stop(self) -> None:
        """Stop the task and deregister (within DEREGISTER_TIMEOUT_S). Safe to call more than once."""
        http, task = self._http, self._task
        self._http = self._task = None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if http is None:
            return
        try:
            if self._maybe_known:
                await asyncio.wait_for(self._deregister(http), DEREGISTER_TIMEOUT_S)
                log.info("deregistered %s from Consul", self.service.id)
        except (aiohttp.ClientError, TimeoutError, ConsulError) as exc:
            log.warning(
                "Consul deregistration of %s failed (%s); the agent removes it after %s critical",
                self.service.id, _why(exc), DEREGISTER_AFTER,
            )  # fmt: skip
        finally:
            self.registered = self._maybe_known = False
            await http.close()

    async def _run(self) -> None:
        assert self._http is not None
        http = self._http
        backoff, attempt, watch_failing = self.BACKOFF_MIN_S, 0, False
        while True:
            if not self.registered:
                attempt += 1
                try:
                    await self._register(http)
                except (aiohttp.ClientError, TimeoutError, ConsulError) as exc:
                    log.warning(
                        "Consul registration of %s at %s failed (attempt %d): %s; retrying in %gs",
                        self.service.id, self.agent_url, attempt, _why(exc), backoff,
                    )  # fmt: skip
                    await asyncio.sleep(backoff)
                    backoff = min(self.BACKOFF_MAX_S, backoff * 2)
                    continue
                self.registered = True
                log.info(
                    "registered %s in Consul at %s (attempt %d): check %s every %s",
                    self.service.id, self.agent_url, attempt, self.service.check_url, CHECK_INTERVAL,
                )  # fmt: skip
                backoff, attempt = self.BACKOFF_MIN_S, 0
            await asyncio.sleep(self.WATCH_EVERY_S)
            try:
                known = await self._known(http)
            except (aiohttp.ClientError, TimeoutError, ConsulError) as exc:
                # The agent keeps what was registered across its own restarts: ask again later.
                if not watch_failing:
                    log.warning("Consul agent at %s not answering: %s", self.agent_url, _why(exc))
                watch_failing = True
                continue
            if watch_failing:
                log.info("Consul agent at %s answers again", self.agent_url)
                watch_failing = False
            if not known:
                log.warning("the Consul agent no longer knows %s; registering again", self.service.id)
                self.registered = False

    async def _register(self, http: aiohttp.ClientSession) -> None:
        url = f"{self.agent_url}/v1/agent/service/register"
        try:
            # replace-existing-checks: a registration under the same ID replaces its checks whole.
            async with http.put(
                url, params={"replace-existing-checks": "true"}, json=self.service.definition()
            ) as resp:
                body = await resp.text()
        except aiohttp.ClientConnectorError:
            raise  # never reached the agent
        except BaseException:
            self._maybe_known = True
            raise
        self._maybe_known = True
        if resp.status != 200:
            raise ConsulError(f"HTTP {resp.status}: {body[:200]}")

    async def _known(self, http: aiohttp.ClientSession) -> bool:
        async with http.get(f"{self.agent_url}/v1/agent/service/{self.service.id}") as resp:
            if resp.status in (200, 404):
                return resp.status == 200
            raise ConsulError(f"HTTP {resp.status}: {(await resp.text())[:200]}")

    async def _deregister(self, http: aiohttp.ClientSession) -> None:
        async with http.put(f"{self.agent_url}/v1/agent/service/deregister/{self.service.id}") as resp:
            if resp.status not in (200, 404):  # 404: it was not registered after all
                raise ConsulError(f"HTTP {resp.status}: {(await resp.text())[:200]}")


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
