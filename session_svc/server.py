"""Serving the app, so that the errors aiohttp answers itself leave as JSON too.

aiohttp answers a request it cannot parse (a request line or header over its limits, too many headers,
bad syntax) before any middleware runs: ``RequestHandler.handle_error`` writes a ``text/plain`` 400 and
logs it at ERROR with a traceback. There is no public hook for it (aio-libs/aiohttp#3287), so:

- ``JsonErrorHandler`` overrides ``handle_error``: the body is ``{"detail": ...}`` like every other
  error, a client error (4xx) is logged at INFO in one line, and a server error keeps aiohttp's ERROR
  log with the traceback;
- ``AppRunner`` is ``web.AppRunner`` whose server makes ``JsonErrorHandler`` connections;
- ``run_app`` is ``web.run_app`` reduced to what ``__main__`` uses, with that runner, and a shutdown
  that lets the requests in flight finish (``serve``).

Written against aiohttp 3.14 (``web_protocol.RequestHandler``, ``web_server.Server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from session_svc.middleware import json_response

log = logging.getLogger("session_svc")


class JsonErrorHandler(RequestHandler):
    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After answering, aiohttp drains the rest of the body and logs what that raises as "Unhandled
        # exception": for a body that does not decode (answered 400 by the app), that is the client's.
        exc = kw.get("exc_info")
        if isinstance(exc, (RequestPayloadError, HttpProcessingError)):
            cause = exc.__cause__ if isinstance(exc, RequestPayloadError) else exc
            why = cause.message if isinstance(cause, HttpProcessingError) else str(cause)
            log.info("bad HTTP request body: %s", _first_line(why))
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status < 500:
            # The client's mistake: nothing for an operator to fix, so one line at INFO.
            detail = _client_error(status, exc, message)
            log.info("bad HTTP request from %s: %d %s", request.remote, status, detail)
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            detail = "Internal server error" if status == 500 else HTTPStatus(status).phrase
        if request.writer.output_size > 0:  # as aiohttp: a response is on its way already
            raise ConnectionError("Response is sent already, cannot send another response with the error")
        resp = json_response({"detail": detail}, status)
        resp.force_close()
        return resp


def _client_error(status: int, exc: BaseException | None, message: str | None) -> str:
    """One line for the client: the parser's messages quote the offending bytes over several lines."""
    if isinstance(exc, LineTooLong):
        return f"Bad request: a request line or header is longer than {exc.args[1]} bytes"
    first = _first_line(message or "")
    return f"Bad request: {first}" if first else HTTPStatus(status).phrase


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].rstrip(":. ") if lines else ""


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        # aiohttp's own server (it starts the app), then the same server making JsonErrorHandlers.
        server = await super()._make_server()
        return _Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    access_log: logging.Logger | None = None,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then shut down in order (``web.AppRunner.cleanup``):

    1. stop listening: a new connection is refused from here on, and idle keep-alive connections close;
    2. ``on_shutdown`` hooks (the Consul deregistration);
    3. wait up to ``shutdown_timeout`` s in all for the requests in flight, then cancel what is left;
    4. the cleanup contexts: Consul, then Redis and Postgres closed.

    The signals set an event instead of raising ``GracefulExit`` (aiohttp's ``handle_signals``): an
    exception out of the loop makes ``asyncio.run`` cancel every task, the requests in flight included.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # aiohttp waits its shutdown_timeout for a request in flight, then cancels only the request's body
    # and waits as long again before cancelling the handler (``RequestHandler.shutdown``): half each, so
    # that a request gets ``shutdown_timeout`` in all, and no more (aiohttp rounds a wait over 5 s up to
    # a whole second of the clock).
    runner = AppRunner(
        app, access_log=access_log, keepalive_timeout=75, shutdown_timeout=shutdown_timeout / 2
    )
    try:
        await runner.setup()
        # Everything built so far (modules, models, routes, scripts, pools) lives as long as the process:
        # out of the collector's sight, a full collection no longer walks it while requests wait.
        gc.freeze()
        try:
            await web.TCPSite(runner, host, port, reuse_port=True).start()
            log.info("serving on http://%s:%d", host, port)
            await stop.wait()
            log.info("stopping: new connections refused, requests in flight get %gs", shutdown_timeout)
        finally:
            await runner.cleanup()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")


def run_app(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    access_log: logging.Logger | None = None,
) -> None:
    """``web.run_app`` for this service: serve until SIGINT/SIGTERM, then shut down gracefully."""
    with contextlib.suppress(KeyboardInterrupt):  # a SIGINT before the handlers are installed
        asyncio.run(serve(app, host, port, shutdown_timeout=shutdown_timeout, access_log=access_log))
