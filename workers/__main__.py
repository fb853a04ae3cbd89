"""``python -m workers``: the write-through worker, settings from the environment."""

from __future__ import annotations

import os

# The API's multiprocess metrics directory is for API processes only: a worker writing there would show
# its figures in the API's /metrics. The worker serves its own (WORKER_METRICS_PORT). This must happen
# before prometheus_client is imported: it chooses its storage then.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

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
