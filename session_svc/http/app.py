"""``create_app(settings)``: the HTTP service, built without I/O; its resources open in cleanup contexts.

On the way out (``server.serve``), the Consul entry goes first (``on_shutdown``: once the port is closed,
while requests in flight finish), then Redis and Postgres close.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from session_svc.http import accesslog, auth, metrics, openapi
from session_svc.http.appkeys import BACKEND, CONSUL, SETTINGS
from session_svc.http.middleware import error_middleware
from session_svc.http.views import setup_routes
from session_svc.ops.consul import Registration
from session_svc.settings import Settings
from session_svc.storage.resources import open_backend


async def _backend_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with open_backend(settings, coalesce=settings.redis_coalesce) as backend:
        app[BACKEND] = backend
        yield


async def _consul_ctx(app: web.Application) -> AsyncIterator[None]:
    """Registered in Consul while serving, when CONSUL_HOST is set (in the background: never a delay)."""
    settings = app[SETTINGS]
    if not settings.consul_host:
        yield
        return
    registration = Registration.from_settings(settings)
    app[CONSUL] = registration
    await registration.start()
    try:
        yield
    finally:
        await registration.stop()


async def _deregister(app: web.Application) -> None:
    if CONSUL in app:
        await app[CONSUL].stop()


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_backend_ctx)
    app.cleanup_ctx.append(_consul_ctx)
    app.on_shutdown.append(_deregister)
    auth.setup(app)
    setup_routes(app)
    openapi.setup(app)
    metrics.setup(app)
    accesslog.setup(app)
    return app
