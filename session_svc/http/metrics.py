"""``GET /metrics``: this host's API processes and the service-wide totals, in the Prometheus text
format, or OpenMetrics when the scraper asks for it (``Accept: application/openmetrics-text``).

Per-process figures come from ``telemetry`` (summed over the processes of the host in multiprocess
mode), the business figures from ``totals`` (read from Redis, the same whichever process answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from session_svc.domain.totals import Totals, TotalsCollector
from session_svc.http import auth
from session_svc.http.appkeys import BACKEND, SETTINGS
from session_svc.ops import telemetry

TOTALS = web.AppKey("totals", Totals)
# Seconds between two publications of this process's figures (what other processes' scrapes see).
PUBLISH_EVERY_S = 1.0


def _process_collector() -> Collector:
    if telemetry.MULTIPROCESS:  # every process's files, summed
        return multiprocess.MultiProcessCollector(None, os.environ["PROMETHEUS_MULTIPROC_DIR"])  # type: ignore[no-untyped-call]
    return telemetry.REGISTRY


async def metrics(request: web.Request) -> web.Response:
    recorder = telemetry.RECORDER
    recorder.scrapes += 1
    try:
        recorder.publish()
        snapshot = await request.app[TOTALS].snapshot()
    finally:
        recorder.scrapes -= 1
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_process_collector())
    registry.register(TotalsCollector(snapshot))
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    resp = web.Response(body=encoder(registry))
    resp.headers["Content-Type"] = content_type
    return resp


async def _publishing(app: web.Application) -> AsyncIterator[None]:
    """Publish this process's figures once a second, so a scrape answered by another process of the
    host sees them; and once more at exit."""
    app[TOTALS] = Totals(app[BACKEND], app[SETTINGS].worker_heartbeat_timeout)

    async def loop() -> None:
        while True:
            await asyncio.sleep(PUBLISH_EVERY_S)
            telemetry.RECORDER.publish()

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    telemetry.process_exit()


def setup(app: web.Application) -> None:
    if not app[SETTINGS].metrics:
        return
    app.cleanup_ctx.append(_publishing)  # after the backend's, which it needs
    app.router.add_get("/metrics", auth.ops(app[SETTINGS], metrics))
