"""HTTP handlers and the route table, which drives both the request parsing and the OpenAPI document.

A handler never reads the request itself. ``setup_routes`` wraps it in one adapter that parses exactly
what its ``Route`` declares (the session id of the path, the query model, the body model) into a
``Call``, so a handler cannot accept anything the OpenAPI document does not describe. The handler calls
one ``store`` function and returns the JSON-ready answer (or a whole ``web.Response``); domain
exceptions are turned into HTTP answers by the middleware.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiohttp import web
from pydantic import BaseModel

from session_svc import __version__
from session_svc.domain import store
from session_svc.http import auth
from session_svc.http.appkeys import BACKEND, SETTINGS
from session_svc.http.middleware import json_response
from session_svc.http.validation import (
    idempotency_key,
    if_match,
    if_none_match,
    parse_body,
    parse_query,
    session_id,
)
from session_svc.record import models
from session_svc.record.shapes import iso, now_us
from session_svc.settings import Settings
from session_svc.storage import heartbeat, outbox, redis_client
from session_svc.storage.resources import Backend

SERVICE = "session_service"

Q = TypeVar("Q")
B = TypeVar("B")


@dataclass(frozen=True, slots=True)
class Call(Generic[Q, B]):
    """A request as its route declared it: parsed, validated, and nothing more."""

    backend: Backend
    settings: Settings
    sid: str  # the session id of the path ("" for routes without one)
    query: Q
    body: B
    # Writes: Idempotency-Key and (PUT/DELETE) If-Match. Reads of a session: If-None-Match.
    cond: store.Conditions = store.NO_CONDITIONS
    if_none_match: frozenset[str] | None = None


Empty = Call[None, None]


async def health(c: Empty) -> dict[str, Any]:
    return {
        "status": "healthy",
        "service": SERVICE,
        "port": c.settings.service_port,
        "version": __version__,
        "timestamp": iso(now_us()),
    }


# Each dependency check of /health/detailed is capped at this many seconds, so a hung Redis or
# Postgres makes the answer "degraded", not late (Consul's check times out at 5 s).
HEALTH_CHECK_TIMEOUT = 1.0


async def _redis_health(b: Backend, settings: Settings) -> dict[str, Any]:
    """Reachability, memory, worker heartbeats and the outbox, or raises."""
    async with asyncio.timeout(HEALTH_CHECK_TIMEOUT):
        mem = await redis_client.memory(b.redis)
        beats = await heartbeat.read(b.redis, b.keys)
        backlog = await outbox.backlog(b.redis, b.keys)
    now = time.time()
    live = [h for h in beats if now - h.at <= settings.worker_heartbeat_timeout]
    flushed = max((h.last_flush for h in beats if h.last_flush), default=None)
    return {
        "memory": mem,
        "live": live,
        "newest_beat_age": round(now - beats[0].at, 3) if beats else None,
        "last_flush_age": round(now - flushed, 3) if flushed else None,
        "backlog": backlog,
    }


async def _postgres_health(b: Backend) -> bool:
    if b.pg is None:
        return False
    async with asyncio.timeout(HEALTH_CHECK_TIMEOUT):
        return await b.pg.fetchval("SELECT true") is True


async def health_detailed(c: Empty) -> web.Response:
    """Readiness: ``degraded`` with the reasons when anything is wrong; HTTP 503 only when the service
    cannot accept writes (Redis unreachable or out of memory), so a load balancer can act on it."""
    b, settings = c.backend, c.settings
    redis_state, db_state = await asyncio.gather(
        _redis_health(b, settings), _postgres_health(b), return_exceptions=True
    )
    reasons: list[str] = []
    r: dict[str, Any] = {}
    if isinstance(redis_state, BaseException):
        reasons.append(f"Redis unreachable: {_why(redis_state)}")
    else:
        r = redis_state
    db_ok = db_state is True
    if not db_ok:
        why = _why(db_state) if isinstance(db_state, BaseException) else "not configured"
        reasons.append(f"PostgreSQL unreachable: {why}")
    mem: redis_client.Memory | None = r.get("memory")
    full = mem is not None and mem.limit > 0 and mem.used >= mem.limit
    if mem is not None and full:
        reasons.append(f"Redis is out of memory ({mem.used} of {mem.limit} bytes): writes are refused")
    elif mem is not None and mem.ratio >= settings.redis_memory_high_water:
        reasons.append(f"Redis memory at {mem.ratio:.0%} of maxmemory, above the high-water mark")
    backlog: outbox.Backlog | None = r.get("backlog")
    live: list[heartbeat.Heartbeat] = r.get("live", [])
    if r and not live:
        age = r["newest_beat_age"]
        reasons.append(
            "no live worker: nothing is being written to PostgreSQL"
            + (f" (last heartbeat {age:.0f}s ago)" if age is not None else " (no heartbeat on record)")
        )
    reasons += [f"worker {h.name}: {h.error}" for h in live if h.error]
    if backlog is not None and backlog.oldest_age_s > settings.health_max_lag_seconds:
        reasons.append(f"outbox lag {backlog.oldest_age_s:.0f}s: PostgreSQL is behind")
    if backlog is not None and backlog.dead_letters:
        reasons.append(f"{backlog.dead_letters} dead letters need an operator")
    accepting = bool(r) and not full
    return json_response(
        {
            "service": SERVICE,
            "status": "degraded" if reasons else "operational",
            "reasons": reasons,
            "accepting_writes": accepting,
            "port": settings.service_port,
            "version": __version__,
            "redis_connected": bool(r),
            "database_connected": db_ok,
            "redis_memory_used_bytes": mem.used if mem else None,
            "redis_memory_max_bytes": mem.limit if mem else None,
            "workers_alive": len(live) if r else None,
            "last_flush_age_seconds": r.get("last_flush_age"),
            "outbox_backlog": backlog.entries if backlog else None,
            "outbox_lag_seconds": round(backlog.oldest_age_s, 3) if backlog else None,
            "dead_letters": backlog.dead_letters if backlog else None,
            "timestamp": iso(now_us()),
        },
        200 if accepting else 503,
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {HEALTH_CHECK_TIMEOUT:g}s"
    return str(exc) or type(exc).__name__


def _written(w: store.Written) -> web.Response:
    resp = json_response(w.row)
    if w.etag is not None:
        resp.headers["ETag"] = w.etag
    if w.replayed:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


def _tagged(row: dict[str, Any], tag: str, if_none_match: frozenset[str] | None) -> web.Response:
    """A read with its ETag, or 304 Not Modified when the client already holds that version."""
    if if_none_match is not None and ("*" in if_none_match or tag in if_none_match):
        return web.Response(status=304, headers={"ETag": tag})
    resp = json_response(row)
    resp.headers["ETag"] = tag
    return resp


async def create_session(c: Call[None, models.SessionCreate]) -> web.Response:
    return _written(await store.create_session(c.backend, c.body, c.cond))


async def get_session(c: Call[models.OwnerQuery, None]) -> web.Response:
    return _tagged(*await store.get_session(c.backend, c.sid, c.query.user_id), c.if_none_match)


async def update_session(c: Call[models.OwnerQuery, models.SessionUpdate]) -> web.Response:
    return _written(await store.update_session(c.backend, c.sid, c.query.user_id, c.body, c.cond))


async def end_session(c: Call[models.OwnerQuery, None]) -> web.Response:
    w = await store.end_session(c.backend, c.sid, c.query.user_id, c.cond)
    return _written(store.Written({"message": "Session ended successfully"}, w.etag, w.replayed))


async def get_summary(c: Call[models.OwnerQuery, None]) -> web.Response:
    return _tagged(*await store.get_summary(c.backend, c.sid, c.query.user_id), c.if_none_match)


async def list_user_sessions(c: Call[models.UserSessionsQuery, None]) -> dict[str, Any]:
    q = c.query
    return await store.list_user_sessions(c.backend, q.user_id, q.active_only, q.page, q.page_size)


async def stats(c: Empty) -> dict[str, Any]:
    return await store.stats(c.backend)


async def append_message(c: Call[models.OwnerQuery, models.MessageCreate]) -> web.Response:
    return _written(await store.append_message(c.backend, c.sid, c.query.user_id, c.body, c.cond))


async def list_messages(c: Call[models.MessagePageQuery, None]) -> dict[str, Any]:
    q = c.query
    return await store.list_messages(c.backend, c.sid, q.user_id, q.page, q.page_size)


async def create_memory(c: Call[models.OwnerQuery, models.MemoryCreate]) -> web.Response:
    return _written(await store.create_memory(c.backend, c.sid, c.query.user_id, c.body, c.cond))


async def get_memory(c: Call[models.MemoryQuery, None]) -> dict[str, Any]:
    mtype = c.query.memory_type.value if c.query.memory_type else None
    return await store.latest_memory(c.backend, c.sid, c.query.user_id, mtype)


async def list_memories(c: Call[models.MemoryPageQuery, None]) -> dict[str, Any]:
    q = c.query
    mtype = q.memory_type.value if q.memory_type else None
    return await store.list_memories(c.backend, c.sid, q.user_id, mtype, q.page, q.page_size)


Handler = Callable[[Call[Any, Any]], Awaitable[dict[str, Any] | web.Response]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    response: type[BaseModel]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = field(default=())
    description: str = ""
    # Who may call it when AUTH_MODE is not none (auth.Access).
    access: auth.Access = "user"
    # Answers carry the session's ETag (a GET also answers If-None-Match with 304).
    etag: bool = False

    @property
    def writes(self) -> bool:
        """Takes an Idempotency-Key, counts against the rate limit (422, 429)."""
        return self.method in ("POST", "PUT", "DELETE")

    @property
    def conditional(self) -> bool:
        """Takes If-Match (412)."""
        return self.method in ("PUT", "DELETE")


_S = "/api/v1/sessions/{session_id}"
_SESSION_ERRORS = (400, 404, 503)

ROUTES: tuple[Route, ...] = (
    Route("GET", "/health", health, "Liveness", models.HealthOut, access="public"),
    Route(
        "GET",
        "/health/detailed",
        health_detailed,
        "Readiness of Redis, Postgres, the worker and the outbox (503: writes are refused)",
        models.HealthDetailedOut,
        errors=(503,),
        access="ops",
    ),
    # Registered before the {session_id} routes so that "stats" is never taken for a session id.
    Route(
        "GET",
        "/api/v1/sessions/stats",
        stats,
        "Service-wide exact totals",
        models.StatsOut,
        errors=(503,),
        description=(
            "Sums of the counters every write keeps in the same step as the write, over all buckets. "
            "Each API process reads them at most every STATS_MAX_AGE_MS (1 s by default) and answers "
            "the totals of that read meanwhile: exact, and at most that old."
        ),
        access="admin",
    ),
    Route(
        "POST",
        "/api/v1/sessions",
        create_session,
        "Create a session",
        models.SessionOut,
        body=models.SessionCreate,
        errors=(400, 413, 422, 429, 503),
        etag=True,
    ),
    Route(
        "GET",
        _S,
        get_session,
        "Get a session",
        models.SessionOut,
        query=models.OwnerQuery,
        errors=_SESSION_ERRORS,
        etag=True,
    ),
    Route(
        "PUT",
        _S,
        update_session,
        "Update a session (title, metadata, conversation_data, summary, status)",
        models.SessionOut,
        body=models.SessionUpdate,
        query=models.OwnerQuery,
        errors=(400, 404, 409, 412, 413, 422, 429, 503),
        etag=True,
    ),
    Route(
        "DELETE",
        _S,
        end_session,
        "End a session (idempotent)",
        models.MessageText,
        query=models.OwnerQuery,
        errors=(400, 404, 409, 412, 422, 429, 503),
        etag=True,
        description=(
            "Ends the session: its status becomes `ended` and it takes no more messages or memories. "
            "Nothing is deleted: the session, its messages and its memories stay readable, so a GET "
            "afterwards answers 200 with `status: ended`, not 404. Ending an ended session again is 200; "
            "a completed or archived session cannot be ended (409)."
        ),
    ),
    Route(
        "GET",
        "/api/v1/users/{user_id}/sessions",
        list_user_sessions,
        "A user's sessions, most recent activity first",
        models.SessionList,
        query=models.UserSessionsQuery,
        errors=(400, 503),
    ),
    Route(
        "GET",
        _S + "/summary",
        get_summary,
        "Session summary",
        models.SessionSummaryOut,
        query=models.OwnerQuery,
        errors=_SESSION_ERRORS,
        etag=True,
    ),
    Route(
        "POST",
        _S + "/messages",
        append_message,
        "Append a message",
        models.MessageOut,
        body=models.MessageCreate,
        query=models.OwnerQuery,
        errors=(400, 404, 409, 413, 422, 429, 503),
    ),
    Route(
        "GET",
        _S + "/messages",
        list_messages,
        "A page of messages, oldest first",
        models.MessageList,
        query=models.MessagePageQuery,
        errors=_SESSION_ERRORS,
    ),
    Route(
        "POST",
        _S + "/memory",
        create_memory,
        "Create a memory",
        models.MemoryOut,
        body=models.MemoryCreate,
        query=models.OwnerQuery,
        errors=(400, 404, 409, 413, 422, 429, 503),
    ),
    Route(
        "GET",
        _S + "/memory",
        get_memory,
        "The most recent memory (optionally of one type)",
        models.MemoryOut,
        query=models.MemoryQuery,
        errors=_SESSION_ERRORS,
    ),
    Route(
        "GET",
        _S + "/memories",
        list_memories,
        "A page of memories, newest first",
        models.MemoryList,
        query=models.MemoryPageQuery,
        errors=_SESSION_ERRORS,
    ),
)


def _adapt(route: Route, checked: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The one place a request is read: what ``route`` declares, parsed into a ``Call``. When
    ``checked`` (AUTH_MODE), the caller is authenticated before anything is parsed (401 before 400/404)
    and authorized once it is, before any Redis call (a 403 changes nothing)."""
    has_sid = "{session_id}" in route.path
    # Path parameters other than the session id are validated with the query model (the user id).
    in_query = tuple(n for n in re.findall(r"{(\w+)", route.path) if n != "session_id")
    writes, conditional = route.writes, route.conditional
    cacheable = route.etag and route.method == "GET"

    async def handle(request: web.Request) -> web.Response:
        principal = await request.app[auth.AUTH].authenticate(request) if checked else None
        sid = session_id(request) if has_sid else ""
        query = None
        if route.query is not None:
            path = {n: request.match_info[n] for n in in_query}
            query = parse_query(request, route.query, **path)
        cond = store.NO_CONDITIONS
        if writes:
            key = idempotency_key(request)
            match = if_match(request) if conditional else ""
            if key is not None or match:
                cond = store.Conditions(key, match)
        body = await parse_body(request, route.body) if route.body is not None else None
        if principal is not None:
            # The request's user: the user_id of the query (or path), or of the body (a new session).
            user = getattr(query, "user_id", None) or getattr(body, "user_id", None)
            auth.Guard.authorize(principal, route.access, user)
        inm = if_none_match(request) if cacheable else None
        call: Call[Any, Any] = Call(request.app[BACKEND], request.app[SETTINGS], sid, query, body, cond, inm)
        answer = await route.handler(call)
        return answer if isinstance(answer, web.Response) else json_response(answer)

    handle.__name__ = route.handler.__name__
    return handle


# aiohttp tries the routes under one path prefix in the order they were added, one regular expression
# each: the busiest first (a message append resolves at the first try, not the fourth).
_BUSIEST_FIRST = (_S + "/messages", _S, _S + "/memory")


def setup_routes(app: web.Application) -> None:
    settings = app[SETTINGS]
    rank = {path: i for i, path in enumerate(_BUSIEST_FIRST)}
    for r in sorted(ROUTES, key=lambda r: rank.get(r.path, len(rank))):  # a stable sort
        # aiohttp's default variable pattern excludes braces; a user id may contain them.
        path = r.path.replace("{user_id}", "{user_id:[^/]+}")
        # "stats" is never a session id, whatever the method: PUT /api/v1/sessions/stats is a 405
        # (Allow: GET), not a 404 for a session named "stats".
        path = path.replace("{session_id}", "{session_id:(?!stats$)[^/]+}")
        app.router.add_route(r.method, path, _adapt(r, auth.checks(settings, r.access)))
