"""Reads from PostgreSQL, the system of record, for sessions whose data has left Redis.

Rows come back in the very shapes Redis stores (``record/fields.py``: a session hash of strings, the stream
fields of a message, a memory's JSON document), so one set of formatters (``shapes.py``) serves both
tiers and a cold session answers with the same JSON as a hot one. Timestamps and money are converted
to integer microseconds in SQL, exactly (``numeric``), never through a float.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import asyncpg
import orjson

from session_svc.ops.telemetry import PG_SECONDS, RECORDER
from session_svc.record.fields import (
    LIST_FIELDS,
    MEMORY,
    MESSAGE,
    MESSAGE_FIELDS,
    SESSION_ROW,
    Conv,
    sql_us_to_timestamptz,
)

P = ParamSpec("P")
T = TypeVar("T")


def _timed(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``session_postgres_query_duration_seconds{query=<function name>}``."""
    labels = (fn.__name__,)

    @functools.wraps(fn)
    async def timed(*args: P.args, **kwargs: P.kwargs) -> T:
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            RECORDER.observe(PG_SECONDS, labels, time.perf_counter() - start)

    return timed


Hash = dict[str, str]

_SESSION = {f.name: f for f in SESSION_ROW}
# Every field of the session hash (and its version ``v``) from its column, as Redis holds it.
_SESSION_COLUMNS = ", ".join(f.to_redis() for f in SESSION_ROW)
# A listing's columns only (``LIST_FIELDS``): it never shows the two JSON objects, so it never reads
# them (up to 256 KiB each).
_LIST_COLUMNS = ", ".join(_SESSION[n].to_redis() for n in ("session_id", *LIST_FIELDS))
_MESSAGE_COLUMNS = ", ".join(f.to_redis() for f in MESSAGE)
_MEMORY_COLUMNS = ", ".join(f.to_redis() for f in MEMORY)


def _compact(text: str) -> str:
    # jsonb prints ``{"a": 1}``; Redis holds what orjson wrote, ``{"a":1}``. Answer the same either way.
    return orjson.dumps(orjson.loads(text)).decode()


_SESSION_JSON = tuple(f.name for f in SESSION_ROW if f.conv is Conv.json)


def _session_hash(row: asyncpg.Record) -> Hash:
    h = dict(row)
    for name in _SESSION_JSON:
        h[name] = _compact(h[name])
    return h


@_timed
async def load_session(pool: asyncpg.Pool, schema: str, uid: str, sid: str) -> Hash | None:
    """The session, if it is this user's."""
    row = await pool.fetchrow(
        f'SELECT {_SESSION_COLUMNS} FROM "{schema}".sessions WHERE user_id = $1 AND session_id = $2',
        uid,
        sid,
    )
    return _session_hash(row) if row is not None else None


@_timed
async def load_sessions(pool: asyncpg.Pool, schema: str, uid: str, sids: list[str]) -> dict[str, Hash]:
    """The fields a listing shows (``record.LIST_FIELDS``) of these sessions of one user."""
    rows = await pool.fetch(
        f"""SELECT {_LIST_COLUMNS} FROM "{schema}".sessions
            WHERE user_id = $1 AND session_id = ANY($2::text[])""",
        uid,
        sids,
    )
    return {r["session_id"]: dict(r) for r in rows}


@_timed
async def list_older(
    pool: asyncpg.Pool,
    schema: str,
    uid: str,
    boundary_us: int,
    skip: list[str],
    offset: int,
    limit: int,
) -> list[Hash]:
    """The listed fields of a user's sessions last active at or before ``boundary_us``, newest first,
    but those in ``skip``: the part of a user listing that the sweep trimmed from Redis. A keyset on
    the listing's index (user_id, last_activity DESC, session_id DESC) from the boundary; ``offset``
    rows within it, since the API pages by number."""
    rows = await pool.fetch(
        f"""SELECT {_LIST_COLUMNS} FROM "{schema}".sessions
            WHERE user_id = $1 AND last_activity <= {sql_us_to_timestamptz("$2")}
              AND NOT session_id = ANY($3::text[])
            ORDER BY last_activity DESC, session_id DESC OFFSET $4 LIMIT $5""",
        uid,
        boundary_us,
        skip,
        offset,
        limit,
    )
    return [dict(r) for r in rows]


@_timed
async def load_messages(
    pool: asyncpg.Pool, schema: str, uid: str, sid: str, lo: int, hi: int
) -> list[tuple[int, Hash]]:
    """Messages ``lo..hi`` (sequence numbers, inclusive) as stream fields."""
    rows = await pool.fetch(
        f"""SELECT seq, {_MESSAGE_COLUMNS} FROM "{schema}".session_messages
            WHERE user_id = $1 AND session_id = $2 AND seq BETWEEN $3 AND $4 ORDER BY seq""",
        uid,
        sid,
        lo,
        hi,
    )
    return [(r["seq"], {k: r[k] for k in MESSAGE_FIELDS}) for r in rows]


def _memory_doc(r: asyncpg.Record) -> str:
    """The memory's JSON document, as Redis holds it."""
    return orjson.dumps(
        {f.name: orjson.Fragment(r[f.name]) if f.conv is Conv.json else r[f.name] for f in MEMORY}
    ).decode()


@_timed
async def load_memory_docs(pool: asyncpg.Pool, schema: str, uid: str, sid: str) -> list[tuple[int, str]]:
    """Every memory of a session, oldest first, as (seq, JSON document)."""
    rows = await pool.fetch(
        f"""SELECT seq, {_MEMORY_COLUMNS} FROM "{schema}".session_memories
            WHERE user_id = $1 AND session_id = $2 ORDER BY seq""",
        uid,
        sid,
    )
    return [(r["seq"], _memory_doc(r)) for r in rows]


@_timed
async def load_memories(
    pool: asyncpg.Pool,
    schema: str,
    uid: str,
    sid: str,
    memory_type: str | None,
    offset: int,
    limit: int,
) -> tuple[int, list[str]]:
    """One page of memories, newest first, and the total count."""
    rows = await pool.fetch(
        f"""SELECT seq, {_MEMORY_COLUMNS}, count(*) OVER () AS total FROM "{schema}".session_memories
            WHERE user_id = $1 AND session_id = $2 AND ($3::text IS NULL OR memory_type = $3)
            ORDER BY seq DESC OFFSET $4 LIMIT $5""",
        uid,
        sid,
        memory_type,
        offset,
        limit,
    )
    if not rows:
        total = await pool.fetchval(
            f"""SELECT count(*) FROM "{schema}".session_memories
                WHERE user_id = $1 AND session_id = $2 AND ($3::text IS NULL OR memory_type = $3)""",
            uid,
            sid,
            memory_type,
        )
        return int(total), []
    return int(rows[0]["total"]), [_memory_doc(r) for r in rows]
