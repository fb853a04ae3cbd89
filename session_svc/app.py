"""``create_app(settings)``: the HTTP service, built without I/O; its resources open in a cleanup context."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from session_svc import metrics, openapi
from session_svc.middleware import error_middleware
from session_svc.resources import open_backend
from session_svc.settings import Settings
from session_svc.typedefs import BACKEND, SETTINGS
from session_svc.views import setup_routes


async def _backend_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_backend(app[SETTINGS]) as backend:
        app[BACKEND] = backend
        yield


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_backend_ctx)
    setup_routes(app)
    openapi.setup(app)
    metrics.setup(app)
    return app
