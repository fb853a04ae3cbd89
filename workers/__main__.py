"""``python -m workers``: the write-through worker, settings from the environment."""

from __future__ import annotations

import logging

import uvloop
from arq.worker import Worker

from session_svc.settings import Settings
from workers.main import worker_settings


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(
        level=logging.DEBUG if settings.debug else settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    uvloop.install()
    Worker(**worker_settings(settings)).run()


if __name__ == "__main__":
    main()
