"""What Postgres holds and what the API answered, in the same plain shapes, so a test compares them with
one ``==`` (money as ``Decimal``, timestamps as the API's ISO strings at microseconds). The model of
acknowledged writes that reconciles them is ``tests/acked.py``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from tests.helpers import SESSION_FIELDS


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def money(value: float | int) -> Decimal:
    """What the API's JSON number means, exactly (shortest repr of the double)."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def _json(text: str) -> Any:
    return orjson.loads(text)


def api_session(body: dict[str, Any], memory_count: int, version: int | None = None) -> dict[str, Any]:
    out = {k: body[k] for k in SESSION_FIELDS}
    out["total_cost"] = money(body["total_cost"])
    out["memory_count"] = memory_count
    if version is not None:
        out["version"] = version
    return out


def api_message(m: dict[str, Any]) -> dict[str, Any]:
    return {**m, "cost_usd": money(m["cost_usd"])}


def api_memory(m: dict[str, Any], seq: int) -> dict[str, Any]:
    return {**m, "seq": seq}


async def pg_sessions(conn: Any, schema: str, sids: Sequence[str]) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch(f'SELECT * FROM "{schema}".sessions WHERE session_id = ANY($1::text[])', sids)
    out = {}
    for r in rows:
        out[r["session_id"]] = {
            "session_id": r["session_id"],
            "user_id": r["user_id"],
            "title": r["title"],
            "status": r["status"],
            "is_active": r["is_active"],
            "conversation_data": _json(r["conversation_data"]),
            "metadata": _json(r["metadata"]),
            "message_count": r["message_count"],
            "total_tokens": r["total_tokens"],
            "total_cost": r["total_cost"],
            "session_summary": r["session_summary"],
            "created_at": iso(r["created_at"]),
            "updated_at": iso(r["updated_at"]),
            "last_activity": iso(r["last_activity"]),
            "memory_count": r["memory_count"],
            "version": r["version"],
        }
    return out


async def pg_messages(conn: Any, schema: str, sid: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f'SELECT * FROM "{schema}".session_messages WHERE session_id = $1 ORDER BY seq', sid
    )
    return [
        {
            "message_id": r["message_id"],
            "session_id": r["session_id"],
            "user_id": r["user_id"],
            "sequence": r["seq"],
            "role": r["role"],
            "content": r["content"],
            "message_type": r["message_type"],
            "metadata": _json(r["metadata"]),
            "tokens_used": r["tokens_used"],
            "cost_usd": r["cost_usd"],
            "created_at": iso(r["created_at"]),
        }
        for r in rows
    ]


async def pg_memories(conn: Any, schema: str, sid: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f'SELECT * FROM "{schema}".session_memories WHERE session_id = $1 ORDER BY seq', sid
    )
    return [
        {
            "memory_id": r["memory_id"],
            "session_id": r["session_id"],
            "user_id": r["user_id"],
            "memory_type": r["memory_type"],
            "content": r["content"],
            "metadata": _json(r["metadata"]),
            "created_at": iso(r["created_at"]),
            "seq": r["seq"],
        }
        for r in rows
    ]


async def pg_snapshot(conn: Any, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the three tables, as tuples in a stable order (to compare whole states)."""
    out = {}
    for table, order in (
        ("sessions", "session_id"),
        ("session_messages", "session_id, seq"),
        ("session_memories", "session_id, seq"),
    ):
        rows = await conn.fetch(f'SELECT * FROM "{schema}".{table} ORDER BY {order}')
        out[table] = [tuple(r.values()) for r in rows]
    return out
