"""Reads from PostgreSQL, the system of record, for sessions whose data has left Redis.

Rows come back in the very shapes Redis stores (``record.py``: a session hash of strings, the stream
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
from session_svc.record.fields import LIST_FIELDS, MESSAGE_FIELDS, MICROS, SESSION_FIELDS

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

_TIMES = ("created_at", "updated_at", "last_activity")

# Each field of the session hash (``record.SESSION_FIELDS``, and its version ``v``) as a column.
_COLUMN = {
    "conversation_data": "conversation_data::text AS conversation_data",
    "metadata": "metadata::text AS metadata",
    "message_count": "message_count::text",
    "total_tokens": "total_tokens::text",
    "cost_micros": f"(total_cost * {MICROS})::bigint::text AS cost_micros",
    "memory_count": "memory_count::text",
    **{t: f"(extract(epoch FROM {t}) * 1000000)::bigint::text AS {t}" for t in _TIMES},
    "v": "version::text AS v",
}
_SESSION_COLUMNS = ", ".join(_COLUMN.get(f, f) for f in (*SESSION_FIELDS, "v"))
# A listing's columns only (``record.LIST_FIELDS``): it never shows the two JSON objects, so it never
# reads them (up to 256 KiB each; reading them made a cold page of 20 cost 3.1 ms instead of 0.46 ms
# with 16 KiB of conversation_data per session).
_LIST_COLUMNS = ", ".join(_COLUMN.get(f, f) for f in ("session_id", *LIST_FIELDS))


# Integer microseconds since the epoch ($2) as a timestamptz, exactly as the flusher writes them.
_US_PARAM = "'epoch'::timestamptz + $2 * interval '1 microsecond'"


def _iso_sql(column: str) -> str:
    return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"


def _compact(text: str) -> str:
    # jsonb prints ``{"a": 1}``; Redis holds what orjson wrote, ``{"a":1}``. Answer the same either way.
    return orjson.dumps(orjson.loads(text)).decode()


def _session_hash(row: asyncpg.Record) -> Hash:
    h = dict(row)
    h["conversation_data"] = _compact(h["conversation_data"])
    h["metadata"] = _compact(h["metadata"])
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
            WHERE user_id = $1 AND last_activity <= {_US_PARAM} AND NOT session_id = ANY($3::text[])
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
        f"""SELECT seq, message_id AS id, role, content, message_type AS type, metadata::text AS meta,
                   tokens_used::text AS tokens, (cost_usd * {MICROS})::bigint::text AS cost,
                   (extract(epoch FROM created_at) * 1000000)::bigint::text AS ts
            FROM "{schema}".session_messages
            WHERE user_id = $1 AND session_id = $2 AND seq BETWEEN $3 AND $4 ORDER BY seq""",
        uid,
        sid,
        lo,
        hi,
    )
    return [(r["seq"], {k: r[k] for k in MESSAGE_FIELDS}) for r in rows]


def _memory_doc(r: asyncpg.Record) -> str:
    return orjson.dumps(
        {
            "memory_id": r["memory_id"],
            "memory_type": r["memory_type"],
            "content": r["content"],
            "metadata": orjson.Fragment(r["metadata"]),
            "created_at": r["created"],
        }
    ).decode()


_MEMORY_COLUMNS = (
    f"seq, memory_id, memory_type, content, metadata::text AS metadata, {_iso_sql('created_at')} AS created"
)


@_timed
async def load_memory_docs(pool: asyncpg.Pool, schema: str, uid: str, sid: str) -> list[tuple[int, str]]:
    """Every memory of a session, oldest first, as (seq, JSON document)."""
    rows = await pool.fetch(
        f"""SELECT {_MEMORY_COLUMNS} FROM "{schema}".session_memories
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
        f"""SELECT {_MEMORY_COLUMNS}, count(*) OVER () AS total FROM "{schema}".session_memories
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
