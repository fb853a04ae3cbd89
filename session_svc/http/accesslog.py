"""The access log (ACCESS_LOG=true): one JSON line per request, gathered in memory and written to stderr
in one write every ``FLUSH_EVERY_S``, and at shutdown.

Not through ``logging``: a LogRecord, the handler chain and a write and flush per request cost a large
share of a hot request's throughput (docs/performance.md); a list append does not. A
process killed with SIGKILL loses at most the last ``FLUSH_EVERY_S`` of lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, BinaryIO

import orjson
from aiohttp import web

from session_svc.http.appkeys import SETTINGS

FLUSH_EVERY_S = 0.1
# Written at once past this many lines, so a burst never holds much memory.
MOST_PENDING = 10_000


class AccessLog:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self._lines: list[bytes] = []

    def add(self, request: web.Request, route: str, status: int, seconds: float, rid: str) -> None:
        line: dict[str, Any] = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "method": request.method,
            "route": route,
            "status": status,
            "ms": round(seconds * 1000, 3),
            "request_id": rid,
        }
        if sid := request.match_info.get("session_id"):
            line["session_id"] = sid
        if uid := request.match_info.get("user_id") or request.query.get("user_id"):
            line["user"] = hashlib.sha256(uid.encode()).hexdigest()[:16]  # who, never which user id
        self._lines.append(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        if len(self._lines) >= MOST_PENDING:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            self.stream.write(b"".join(lines))
            self.stream.flush()


ACCESS_LOG = web.AppKey("access_log", AccessLog)


async def _writing(app: web.Application) -> AsyncIterator[None]:
    log = app[ACCESS_LOG] = AccessLog(sys.stderr.buffer)

    async def loop() -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            log.flush()

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.flush()


def setup(app: web.Application) -> None:
    if app[SETTINGS].access_log:
        app.cleanup_ctx.insert(0, _writing)  # first in, last out: lines of the shutdown are written too
