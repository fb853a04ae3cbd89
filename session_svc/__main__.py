"""``python -m session_svc``: serve the API with settings from the environment."""

from __future__ import annotations

import logging

import uvloop
from aiohttp import web

from session_svc.app import create_app
from session_svc.process import configure_logging
from session_svc.settings import Settings


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    uvloop.install()
    web.run_app(
        create_app(settings),
        host=settings.service_host,
        port=settings.service_port,
        access_log=logging.getLogger("aiohttp.access") if settings.debug else None,
        reuse_port=True,
    )


if __name__ == "__main__":
    main()
