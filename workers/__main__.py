"""``python -m workers``: the write-through worker, settings from the environment."""

from __future__ import annotations

import uvloop

from session_svc.process import configure_logging
from session_svc.settings import Settings
from workers.main import serve


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
