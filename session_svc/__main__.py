"""``python -m session_svc``: serve the API with settings from the environment: in this process when
SERVICE_PROCESSES is 1, else as the supervisor of that many API processes (``supervisor.py``)."""

from __future__ import annotations

import logging
import sys

import uvloop

from session_svc.http.app import create_app
from session_svc.http.server import StartupFailed, run_app
from session_svc.ops import supervisor, telemetry
from session_svc.process import EXIT_STARTUP_FAILED, configure_logging
from session_svc.settings import Settings


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    if supervisor.processes_of(settings) > 1:
        sys.exit(supervisor.run(settings))
    if not settings.metrics:
        telemetry.RECORDER.disable()
    uvloop.install()
    try:
        run_app(
            create_app(settings),
            settings.service_host,
            settings.service_port,
            shutdown_timeout=settings.shutdown_timeout,
            access_log=logging.getLogger("aiohttp.access") if settings.debug else None,
        )
    except StartupFailed as exc:
        logging.getLogger("session_svc").critical("could not start: %s", exc)
        sys.exit(EXIT_STARTUP_FAILED)


if __name__ == "__main__":
    main()
