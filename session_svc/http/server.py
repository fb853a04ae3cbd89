"""Serving the app: JSON for the errors aiohttp answers itself, and bounds on what a client can hold.

aiohttp answers a request it cannot parse (a request line or header over its limits, too many headers,
bad syntax) before any middleware runs: ``RequestHandler.handle_error`` writes a ``text/plain`` 400 and
logs it at ERROR with a traceback. There is no public hook for it (aio-libs/aiohttp#3287). Nor does it
bound how long a client may take to send its headers: a connection that sends half a request line is
closed only by the keep-alive timer (75 s here), so a few hundred of them hold the process (slowloris).
So:

- ``Connection`` is aiohttp's ``RequestHandler`` (one per connection) that
  - answers client errors as ``{"detail": ...}`` like every other error, logged at INFO in one line
    (a server error keeps aiohttp's ERROR log with the traceback);
  - gives a client HEADER_TIMEOUT seconds to complete a request's headers, from the connection's opening
    and, on a kept-alive connection, from the first byte of the next request (an idle kept-alive
    connection is the keep-alive timer's business). Late: a 408 if some of a request came, then the
    connection is closed. One timer per connection, armed and cancelled at most once per request;
  - closes a new connection at once when the process already holds MAX_CONNECTIONS;
  nothing is logged per hostile connection (a flood must not flood the logs): each is counted in
  ``session_http_connections_closed_total``. The body's own deadline (BODY_TIMEOUT) is kept where the
  body is read (``validation.parse_body``);
- ``AppRunner`` is ``web.AppRunner`` whose server makes ``Connection``s, with the app's settings;
- ``run_app`` is ``web.run_app`` reduced to what ``__main__`` uses, with that runner, and a shutdown
  that lets the requests in flight finish (``serve``).

Written against aiohttp 3.14 (``web_protocol.RequestHandler``, ``web_server.Server``): it reads the
handler's ``_request_count``, ``_messages``, ``_waiter`` and ``_upgraded``, and the server's
``_connections``; tests/test_slow_clients.py fails if their meaning changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
from http import HTTPStatus
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from session_svc.http.appkeys import SETTINGS
from session_svc.http.middleware import json_response
from session_svc.ops.telemetry import CONNECTIONS_CLOSED, RECORDER
from session_svc.settings import Settings

log = logging.getLogger("session_svc")


class Connection(RequestHandler):
    __slots__ = ("_body", "_header_timeout", "_headers_due", "_partial")

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = manager.header_timeout
        self._headers_due: asyncio.TimerHandle | None = None
        self._partial = False  # some bytes of a request whose headers are not complete yet
        self._body: StreamReader | None = None  # of the latest request whose headers came

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        if isinstance(manager, _Server) and manager.full():
            self._manager = None  # so that connection_lost has nothing to undo
            cast(asyncio.Transport, transport).abort()
            RECORDER.count(CONNECTIONS_CLOSED, ("over_capacity",))
            return
        super().connection_made(transport)
        self._headers_due = self._loop.call_later(self._header_timeout, self._headers_late)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # the headers of one more request are complete
            if self._headers_due is not None:
                self._headers_due.cancel()
                self._headers_due = None
            self._partial = False
            self._body = self._messages[-1][1] if self._messages else None
        elif data and not (self._close or self._force_close or self._upgraded):
            body = self._body
            if body is None or body.is_eof():  # not the body of the last request: the next one
                self._partial = True
                if self._headers_due is None:
                    self._headers_due = self._loop.call_later(self._header_timeout, self._headers_late)
        # (Bytes of a next request that arrive in the same read as a complete one are not seen here:
        # that connection is left to the keep-alive timer, which closes it 75 s after its last answer.)

    def _headers_late(self) -> None:
        self._headers_due = None
        if self.transport is None or self._force_close or self._close:
            return
        if self._waiter is None:
            # An earlier request is still being answered (the late bytes were pipelined behind it):
            # the next one's time starts again.
            self._headers_due = self._loop.call_later(self._header_timeout, self._headers_late)
            return
        RECORDER.count(CONNECTIONS_CLOSED, ("header_timeout",))
        manager = self._manager
        if self._partial and isinstance(manager, _Server):
            self.transport.write(manager.request_timeout)  # close() below sends it first
        self.force_close()

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
    def __init__(self, *args: Any, header_timeout: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        body = orjson.dumps({"detail": f"Request headers not received within {header_timeout:g} s"})
        self.request_timeout = (
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )

    def full(self) -> bool:
        return len(self._connections) >= self.max_connections

    def __call__(self) -> RequestHandler:
        return Connection(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """``web.AppRunner`` serving ``Connection``s, bounded by the app's settings (defaults without any)."""

    async def _make_server(self) -> web.Server:
        # aiohttp's own server (it starts the app), then the same server making Connections.
        server = await super()._make_server()
        settings = self.app.get(SETTINGS) or Settings()
        return _Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            header_timeout=settings.header_timeout,
            max_connections=settings.max_connections,
            **server._kwargs,
        )


class StartupFailed(Exception):
    """The process could not start serving; ``__main__`` logs why and exits with EXIT_STARTUP_FAILED."""


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
    settings = app.get(SETTINGS) or Settings()
    files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if files < settings.max_connections + 256:  # the pools, the log, the listening socket...
        log.warning(
            "the open-files limit (%d) leaves too little room for MAX_CONNECTIONS=%d: raise it (ulimit -n)",
            files,
            settings.max_connections,
        )
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
        try:
            await runner.setup()  # the cleanup contexts: Redis, Postgres, the layout check
        except Exception as exc:
            raise StartupFailed(f"{type(exc).__name__}: {exc}") from exc
        # Everything built so far (modules, models, routes, scripts, pools) lives as long as the process:
        # out of the collector's sight, a full collection no longer walks it while requests wait.
        gc.freeze()
        try:
            try:
                await web.TCPSite(runner, host, port, reuse_port=True).start()
            except OSError as exc:
                raise StartupFailed(f"cannot listen on {host}:{port}: {exc}") from exc
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
