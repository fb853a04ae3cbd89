"""A stand-in for the Consul agent's HTTP API (no Consul binary here): an aiohttp server on a spare port
that records every call and keeps what was registered; it can fail or hang on demand."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests import servers

REGISTER = "/v1/agent/service/register"


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    token: str | None
    body: Any


@dataclass
class Agent:
    """A stand-in for the Consul agent's HTTP API (register, deregister, read one service)."""

    port: int = field(default_factory=servers.free_port)
    calls: list[Call] = field(default_factory=list)
    services: dict[str, Any] = field(default_factory=dict)
    fail_next: int = 0  # answer this many calls with a 500
    hang: bool = False  # never answer
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.calls.append(
            Call(
                request.method, request.path, dict(request.query), request.headers.get("X-Consul-Token"), body
            )
        )
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=500, text="rpc error: No cluster leader")
        resp: web.StreamResponse = await handler(request)
        return resp

    async def _register(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.services[body["ID"]] = body
        return web.Response()

    async def _deregister(self, request: web.Request) -> web.Response:
        self.services.pop(request.match_info["id"], None)
        return web.Response()

    async def _service(self, request: web.Request) -> web.Response:
        found = self.services.get(request.match_info["id"])
        return web.json_response(found) if found else web.Response(status=404, text="unknown service ID")

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_put(REGISTER, self._register)
        app.router.add_put("/v1/agent/service/deregister/{id}", self._deregister)
        app.router.add_get("/v1/agent/service/{id}", self._service)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def to(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]


async def ready(value: Any) -> Any:
    """``value`` as an awaitable, for ``eventually`` over a plain condition."""
    return value
