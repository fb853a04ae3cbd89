"""The ceilings the service is compared with, served like the service (SERVICE_PROCESSES processes
sharing SERVICE_PORT with SO_REUSEPORT, uvloop, the same settings from the environment):

- ``json``: a bare aiohttp handler answering a small JSON document: what aiohttp itself costs;
- ``append``: a bare aiohttp handler doing one round trip of the service's own append script through the
  service's own Redis client (``redis_client`` + ``Scripts``, coalescing as REDIS_COALESCE says), with no
  parsing, validation or shaping: what one Redis round trip costs.

``python -m bench.ceiling json|append`` (benchmark use only; never part of the service).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import orjson
import uvloop
from aiohttp import web

from session_svc.record.keys import Keys
from session_svc.record.shapes import now_us
from session_svc.settings import Settings
from session_svc.storage.redis_client import redis_client
from session_svc.storage.scripts import Scripts

USER = "ceiling"


def json_app() -> web.Application:
    body = orjson.dumps({"status": "healthy", "service": "ceiling"})

    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def append_app(settings: Settings) -> web.Application:
    app = web.Application()
    state: dict[str, Any] = {}

    async def start(app: web.Application) -> None:
        redis = redis_client(settings)
        state["scripts"] = Scripts(redis, settings.redis_coalesce)
        state["redis"] = redis
        uk = Keys(settings.key_prefix, settings.redis_buckets).for_user(USER)
        state["uk"] = uk
        sid = f"ceiling-{os.getpid()}"
        state["sid"] = sid
        reply = await state["scripts"].create_session(
            uk, sid, title="", conversation_data="{}", metadata="{}", summary="", now=now_us()
        )
        assert reply[0] in ("ok", "conflict"), reply

    async def stop(app: web.Application) -> None:
        await state["redis"].aclose()

    async def handle(_: web.Request) -> web.Response:
        message = {"id": str(uuid.uuid4()), "role": "user", "content": "ceiling", "type": "chat",
                   "tokens": "12", "cost": "100", "meta": "{}", "ts": str(now_us())}  # fmt: skip
        reply = await state["scripts"].append_message(state["uk"], state["sid"], message)
        return web.Response(body=orjson.dumps({"sequence": int(reply[1])}), content_type="application/json")

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def serve_app(app: web.Application, port: int) -> None:
    """Serve ``app`` as the service serves: uvloop, the port shared with SO_REUSEPORT."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    uvloop.install()
    web.run_app(app, sock=sock, print=None, access_log=None)


def serve(kind: str, settings: Settings) -> None:
    serve_app(json_app() if kind == "json" else append_app(settings), settings.service_port)


def main() -> None:
    kind = sys.argv[1]
    settings = Settings.from_env()
    n = settings.service_processes or os.cpu_count() or 1
    if n == 1 or os.environ.get("CEILING_CHILD"):
        serve(kind, settings)
        return
    env = {**os.environ, "CEILING_CHILD": "1"}
    children = [subprocess.Popen([sys.executable, "-m", "bench.ceiling", kind], env=env) for _ in range(n)]
    signal.signal(signal.SIGTERM, lambda *_: [c.terminate() for c in children])
    try:
        while all(c.poll() is None for c in children):
            time.sleep(0.2)
    finally:
        for c in children:
            c.terminate()
        for c in children:
            c.wait(timeout=20)


if __name__ == "__main__":
    main()
