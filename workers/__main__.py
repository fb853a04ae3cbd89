"""``python -m workers``: the write-through worker, settings from the environment."""

from __future__ import annotations

import uvloop
from arq.worker import Worker

from session_svc.app import configure_logging
from session_svc.settings import Settings
from workers.main import worker_settings


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    uvloop.install()
    Worker(**worker_settings(settings)).run()


if __name__ == "__main__":
    main()
