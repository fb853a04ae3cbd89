"""What Postgres holds and what the API answered, in the same plain shapes, so a test compares them with
one ``==`` (money as ``Decimal``, timestamps as the API's ISO strings at microseconds); and the model
of acknowledged writes with the check "Postgres equals the model"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from redis.asyncio import Redis

from session_svc.record.keys import Keys
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


@dataclass
class Model:
    """What the API acknowledged (200): sessions, and per session its messages and memories."""

    users: dict[str, str] = field(default_factory=dict)  # sid -> uid
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    memories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # non-200 answers to writes that should succeed

    def session(self, body: dict[str, Any]) -> str:
        sid: str = body["session_id"]
        self.users[sid] = body["user_id"]
        self.messages[sid] = []
        self.memories[sid] = []
        return sid

    @property
    def message_total(self) -> int:
        return sum(len(v) for v in self.messages.values())


async def assert_postgres_equals_model(
    client: Any, redis: Redis, keys: Keys, conn: Any, schema: str, model: Model
) -> None:
    """Postgres holds every acknowledged write exactly once, with the values the API answered.

    Sessions are compared with what the API answers now (all fields, and the Redis version), messages
    and memories with the acknowledgements themselves; sequence numbers are 1..n without gaps.
    """
    assert not model.failures, model.failures[:5]
    sids = list(model.users)
    total = await conn.fetchval(f'SELECT count(*) FROM "{schema}".sessions')
    assert total == len(sids)
    rows = await pg_sessions(conn, schema, sids)
    for sid, uid in model.users.items():
        resp = await client.get(f"/api/v1/sessions/{sid}", params={"user_id": uid})
        body = await resp.json()
        assert resp.status == 200, body
        h: dict[str, str] = await redis.hgetall(keys.for_user(uid).session(sid))  # type: ignore[misc]
        version = int(h["v"]) if h else rows[sid]["version"]
        if h:
            assert h["fv"] == h["v"], (sid, h)
        assert rows[sid] == api_session(body, len(model.memories[sid]), version), sid
        msgs = sorted(model.messages[sid], key=lambda m: m["sequence"])
        assert [m["sequence"] for m in msgs] == list(range(1, len(msgs) + 1)), sid
        assert await pg_messages(conn, schema, sid) == [api_message(m) for m in msgs], sid
        # Memories written concurrently are numbered in the order Redis ran them: compare by id.
        stored = await pg_memories(conn, schema, sid)
        assert [m.pop("seq") for m in stored] == list(range(1, len(stored) + 1)), sid
        by_id = {m["memory_id"]: m for m in stored}
        assert by_id == {m["memory_id"]: m for m in model.memories[sid]}, sid
    n_msg = await conn.fetchval(f'SELECT count(*) FROM "{schema}".session_messages')
    n_mem = await conn.fetchval(f'SELECT count(*) FROM "{schema}".session_memories')
    assert (n_msg, n_mem) == (model.message_total, sum(len(v) for v in model.memories.values()))
