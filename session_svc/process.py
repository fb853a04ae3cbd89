"""Process-level setup shared by the entry points (``python -m session_svc``, ``python -m workers``)."""

from __future__ import annotations

import logging

from session_svc.settings import Settings


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=logging.DEBUG if settings.debug else settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
