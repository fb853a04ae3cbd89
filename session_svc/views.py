"""HTTP handlers and the route table (which also feeds the OpenAPI document).

Each handler parses, calls one ``store`` function and shapes the response; errors are raised as domain
exceptions and turned into HTTP answers by the middleware.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from pydantic import BaseModel

from session_svc import __version__, models, outbox, store
from session_svc.middleware import json_response
from session_svc.typedefs import BACKEND, SETTINGS
from session_svc.validation import parse_body, parse_query, session_id

SERVICE = "session_service"


async def health(request: web.Request) -> web.Response:
    return json_response(
        {
            "status": "healthy",
            "service": SERVICE,
            "port": request.app[SETTINGS].service_port,
            "version": __version__,
            "timestamp": store.iso(store.now_us()),
        }
    )


async def health_detailed(request: web.Request) -> web.Response:
    b = request.app[BACKEND]
    redis_ok = db_ok = False
    backlog: outbox.Backlog | None = None
    try:
        redis_ok = bool(await b.redis.ping())
        backlog = await outbox.backlog(b.redis, b.keys)
    except Exception:
        pass
    if b.pg is not None:
        try:
            async with asyncio.timeout(2):
                db_ok = await b.pg.fetchval("SELECT true") is True
        except Exception:
            pass
    return json_response(
        {
            "service": SERVICE,
            "status": "operational" if redis_ok and db_ok else "degraded",
            "port": request.app[SETTINGS].service_port,
            "version": __version__,
            "redis_connected": redis_ok,
            "database_connected": db_ok,
            "outbox_backlog": backlog.entries if backlog else None,
            "outbox_lag_seconds": round(backlog.oldest_age_s, 3) if backlog else None,
            "dead_letters": backlog.dead_letters if backlog else None,
            "timestamp": store.iso(store.now_us()),
        }
    )


async def create_session(request: web.Request) -> web.Response:
    body = await parse_body(request, models.SessionCreate)
    return json_response(await store.create_session(request.app[BACKEND], body))


async def get_session(request: web.Request) -> web.Response:
    sid = session_id(request)
    q = parse_query(request, models.OwnerQuery)
    return json_response(await store.get_session(request.app[BACKEND], sid, q.user_id))


async def update_session(request: web.Request) -> web.Response:
    sid = session_id(request)
    q = parse_query(request, models.OwnerQuery)
    body = await parse_body(request, models.SessionUpdate)
    return json_response(await store.update_session(request.app[BACKEND], sid, q.user_id, body))


async def end_session(request: web.Request) -> web.Response:
    sid = session_id(request)
    q = parse_query(request, models.OwnerQuery)
    await store.end_session(request.app[BACKEND], sid, q.user_id)
    return json_response({"message": "Session ended successfully"})


async def get_summary(request: web.Request) -> web.Response:
    sid = session_id(request)
    q = parse_query(request, models.OwnerQuery)
    return json_response(await store.get_summary(request.app[BACKEND], sid, q.user_id))


async def list_user_sessions(request: web.Request) -> web.Response:
    q = parse_query(request, models.UserSessionsQuery, user_id=request.match_info["user_id"])
    return json_response(
        await store.list_user_sessions(request.app[BACKEND], q.user_id, q.active_only, q.page, q.page_size)
    )


async def stats(request: web.Request) -> web.Response:
    return json_response(await store.stats(request.app[BACKEND]))


async def append_message(request: web.Request) -> web.Response:
    sid = session_id(request)
    q = parse_query(request, models.OwnerQuery)
    body = await parse_body(request, models.MessageCreate)
    return json_response(await store.append_message(request.app[BACKEND], sid, q.user_id, body))


async def list_messages(request: web.Request) -> web.Response:
    sid = session_id(request)
    q = parse_query(request, models.MessagePageQuery)
    return json_response(await store.list_messages(request.app[BACKEND], sid, q.user_id, q.page, q.page_size))


async def create_memory(request: web.Request) -> web.Response:
    sid = session_id(request)
    q = parse_query(request, models.OwnerQuery)
    body = await parse_body(request, models.MemoryCreate)
    return json_response(await store.create_memory(request.app[BACKEND], sid, q.user_id, body))


async def get_memory(request: web.Request) -> web.Response:
    sid = session_id(request)
    q = parse_query(request, models.MemoryQuery)
    mtype = q.memory_type.value if q.memory_type else None
    return json_response(await store.latest_memory(request.app[BACKEND], sid, q.user_id, mtype))


async def list_memories(request: web.Request) -> web.Response:
    sid = session_id(request)
    q = parse_query(request, models.MemoryPageQuery)
    mtype = q.memory_type.value if q.memory_type else None
    return json_response(
        await store.list_memories(request.app[BACKEND], sid, q.user_id, mtype, q.page, q.page_size)
    )


Handler = Callable[[web.Request], Awaitable[web.Response]]


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


_S = "/api/v1/sessions/{session_id}"
_SESSION_ERRORS = (400, 404, 503)

ROUTES: tuple[Route, ...] = (
    Route("GET", "/health", health, "Liveness", models.HealthOut),
    Route(
        "GET",
        "/health/detailed",
        health_detailed,
        "Readiness of Redis, Postgres and the outbox",
        models.HealthDetailedOut,
    ),
    # Registered before the {session_id} routes so that "stats" is never taken for a session id.
    Route(
        "GET", "/api/v1/sessions/stats", stats, "Service-wide exact totals", models.StatsOut, errors=(503,)
    ),
    Route(
        "POST",
        "/api/v1/sessions",
        create_session,
        "Create a session",
        models.SessionOut,
        body=models.SessionCreate,
        errors=(400, 413, 503),
    ),
    Route(
        "GET",
        _S,
        get_session,
        "Get a session",
        models.SessionOut,
        query=models.OwnerQuery,
        errors=_SESSION_ERRORS,
    ),
    Route(
        "PUT",
        _S,
        update_session,
        "Update a session (title, metadata, conversation_data, summary, status)",
        models.SessionOut,
        body=models.SessionUpdate,
        query=models.OwnerQuery,
        errors=(400, 404, 409, 413, 503),
    ),
    Route(
        "DELETE",
        _S,
        end_session,
        "End a session (idempotent)",
        models.MessageText,
        query=models.OwnerQuery,
        errors=(400, 404, 409, 503),
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
    ),
    Route(
        "POST",
        _S + "/messages",
        append_message,
        "Append a message",
        models.MessageOut,
        body=models.MessageCreate,
        query=models.OwnerQuery,
        errors=(400, 404, 409, 413, 503),
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
        errors=(400, 404, 409, 413, 503),
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


def setup_routes(app: web.Application) -> None:
    for r in ROUTES:
        # aiohttp's default variable pattern excludes braces; a user id may contain them.
        app.router.add_route(r.method, r.path.replace("{user_id}", "{user_id:[^/]+}"), r.handler)
