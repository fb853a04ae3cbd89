"""The one middleware: every failure leaves as JSON ``{"detail": ...}``; every request is counted and
timed by route template, carries an X-Request-ID, and is logged as one JSON line when ACCESS_LOG is on.
It also sheds load: past MAX_INFLIGHT requests in progress in this process, a 503 at once."""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from session_svc.errors import PG_UNAVAILABLE, ServiceError
from session_svc.http.accesslog import ACCESS_LOG
from session_svc.http.appkeys import SETTINGS
from session_svc.ops.telemetry import PG_FAILURES, RECORDER, REDIS_FAILURES, SHED
from session_svc.storage import redis_client

log = logging.getLogger("session_svc")

_HTTP_DETAIL = {
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request body too large",
}


# Headers that describe the exception's own (text) body, which the JSON body replaces.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})


# Copied into each response (aiohttp copies the headers it is given): the same header as
# ``content_type="application/json"`` writes, in half the time (1.1 µs instead of 2.2 per response).
_JSON_HEADERS = CIMultiDict({hdrs.CONTENT_TYPE: "application/json"})


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=_JSON_HEADERS)


# Methods outside this set are counted as "other": a client must not be able to create series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# An incoming X-Request-ID is kept if it looks like an id (it is echoed and logged); else a new one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_routes: dict[int, str] = {}
# Request ids made here: a random per-process prefix and a counter (16 hex digits for the first 4
# billion requests); unique enough to find one request's lines, and no system call per request.
_ID_PREFIX = secrets.token_hex(4)
_ids = itertools.count()


def _route(request: web.Request) -> str:
    """The route template (``/api/v1/sessions/{session_id}``), or ``unmatched`` (404, 405): never the
    raw path, so a scan of random paths adds no series."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"
    route = _routes.get(id(resource))
    if route is None:
        route = _routes[id(resource)] = resource.canonical
    return route


# Answered however loaded the process is: the load balancer's liveness and readiness checks, and the
# scrape that shows the overload.
_NEVER_SHED = frozenset({"/health", "/health/detailed", "/metrics"})
_SHED_DETAIL = "Server busy: too many requests in progress; nothing was done, retry after 1 second"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer: errors as JSON, counted (``telemetry``), with its X-Request-ID, and logged when
    ACCESS_LOG is on; past MAX_INFLIGHT requests in progress, a 503 at once. One middleware, not four:
    each layer costs on every request."""
    settings = request.app[SETTINGS]
    rid = request.headers.get("X-Request-ID")
    if rid is None or not _REQUEST_ID.fullmatch(rid):
        rid = f"{_ID_PREFIX}{next(_ids):08x}"
    observed = settings.metrics or settings.access_log
    start = time.perf_counter() if observed else 0.0
    # Counted with or without metrics: it is the load-shedding gauge as well.
    RECORDER.in_flight += 1
    status = 499  # the client went away and the handler was cancelled: nginx's "client closed request"
    try:
        resp: web.StreamResponse
        if RECORDER.in_flight > settings.max_inflight and request.path not in _NEVER_SHED:
            resp = _shed()
        else:
            resp = await _answer(request, handler)
        status = resp.status
        resp.headers["X-Request-ID"] = rid
        return resp
    finally:
        RECORDER.in_flight -= 1
        if observed:
            seconds = time.perf_counter() - start
            route = _route(request)
            if settings.metrics:
                RECORDER.request(
                    route, request.method if request.method in _METHODS else "other", status, seconds
                )
            if settings.access_log:
                request.app[ACCESS_LOG].add(request, route, status, seconds, rid)


def _shed() -> web.Response:
    """Overloaded: answered before any work (the body is not even read), so a retry is always safe."""
    RECORDER.count(SHED, ())
    resp = json_response({"detail": _SHED_DETAIL}, 503)
    resp.headers["Retry-After"] = "1"
    return resp


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    redis_client.reset_outcome()
    try:
        return await handler(request)
    except ServiceError as exc:
        resp = json_response({"detail": exc.detail}, exc.status)
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = _HTTP_DETAIL.get(exc.status, exc.reason)
        if exc.status == 413:
            detail = f"Request body too large (limit {request.app[SETTINGS].max_body_bytes} bytes)"
        elif exc.status == 408:  # validation.parse_body: the body was abandoned, so is the connection
            detail = f"Request body not received within {request.app[SETTINGS].body_timeout:g} s"
        resp = json_response({"detail": detail}, exc.status)
        if exc.status == 408:
            resp.force_close()
        # The body is ours, the headers stay the exception's: a 405 must say Allow (RFC 9110, 15.5.6).
        for name, value in exc.headers.items():
            if name.lower() not in _BODY_HEADERS:
                resp.headers.add(name, value)
        return resp
    except redis_client.REDIS_FAILURES as exc:
        RECORDER.count(REDIS_FAILURES, (redis_client.reason(exc),))
        detail = redis_client.failure(exc, write=request.method not in ("GET", "HEAD"))
        if not isinstance(exc, redis_client.CircuitOpen):  # one line per failure, not per request
            log.warning("redis: %s %s: %r", request.method, request.path, exc)
        return json_response({"detail": detail}, 503)
    except PG_UNAVAILABLE as exc:
        RECORDER.count(PG_FAILURES, ())
        log.warning("postgres unavailable: %s %s: %r", request.method, request.path, exc)
        return json_response({"detail": "Session store unavailable (PostgreSQL)"}, 503)
    except Exception:
        log.exception("unhandled error: %s %s", request.method, request.path_qs)
        return json_response({"detail": "Internal server error"}, 500)
