"""The one error middleware: every failure leaves as JSON ``{"detail": ...}``."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from session_svc import redis_client
from session_svc.errors import PG_UNAVAILABLE, ServiceError
from session_svc.typedefs import SETTINGS

log = logging.getLogger("session_svc")

_HTTP_DETAIL = {
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request body too large",
}


# Headers that describe the exception's own (text) body, which the JSON body replaces.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    redis_client.reset_outcome()
    try:
        return await handler(request)
    except ServiceError as exc:
        return json_response({"detail": exc.detail}, exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = _HTTP_DETAIL.get(exc.status, exc.reason)
        if exc.status == 413:
            detail = f"Request body too large (limit {request.app[SETTINGS].max_body_bytes} bytes)"
        resp = json_response({"detail": detail}, exc.status)
        # The body is ours, the headers stay the exception's: a 405 must say Allow (RFC 9110, 15.5.6).
        for name, value in exc.headers.items():
            if name.lower() not in _BODY_HEADERS:
                resp.headers.add(name, value)
        return resp
    except redis_client.REDIS_FAILURES as exc:
        detail = redis_client.failure(exc, write=request.method not in ("GET", "HEAD"))
        if not isinstance(exc, redis_client.CircuitOpen):  # one line per failure, not per request
            log.warning("redis: %s %s: %r", request.method, request.path, exc)
        return json_response({"detail": detail}, 503)
    except PG_UNAVAILABLE as exc:
        log.warning("postgres unavailable: %s %s: %r", request.method, request.path, exc)
        return json_response({"detail": "Session store unavailable (PostgreSQL)"}, 503)
    except Exception:
        log.exception("unhandled error: %s %s", request.method, request.path_qs)
        return json_response({"detail": "Internal server error"}, 500)
