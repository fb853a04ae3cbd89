"""Process-level setup shared by the entry points (``python -m session_svc``, ``python -m workers``)."""

from __future__ import annotations

import logging
import sys

from session_svc.settings import Settings


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=logging.DEBUG if settings.debug else settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # Access lines are JSON documents on their own lines, without the prefix of the other logs.
    access = logging.getLogger("session_svc.access")
    if settings.access_log and not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
