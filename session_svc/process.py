"""Process-level setup shared by the entry points (``python -m session_svc``, ``python -m workers``)."""

from __future__ import annotations

import logging

from session_svc.settings import Settings

# Exit status of an API process that failed before it served (EX_CONFIG, sysexits.h): a wrong setting,
# data of another bucket count, a port it cannot bind. Restarting it would fail the same way, however
# long the failure took to show (a loaded machine can take seconds to start a process).
EXIT_STARTUP_FAILED = 78


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=logging.DEBUG if settings.debug else settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
