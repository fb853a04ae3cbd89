"""Sessions, messages and memories: the domain operations, Redis first, Postgres for what left Redis.

Every function takes the ``Backend`` (``resources.py``: the process's Redis client, key layout,
registered scripts and, when configured, the asyncpg pool) and plain values, and returns JSON-ready
dicts in the guide's shapes (``shapes.py``). Hot paths are one script call (``scripts.py``). A session
whose data has left Redis (``cold``) is read from Postgres with the same shapes (``cold.py``), and
brought back into Redis before it is written to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson

from session_svc import cold
from session_svc.errors import MEMORY_NOT_FOUND, SESSION_NOT_FOUND, Conflict, NotFound, Unavailable
from session_svc.keys import UserKeys
from session_svc.models import MemoryCreate, MessageCreate, SessionCreate, SessionUpdate, to_micros
from session_svc.record import LIST_FIELDS, MEMORY_ALL, MESSAGE_FIELDS
from session_svc.resources import Backend
from session_svc.shapes import (
    Hash,
    Row,
    dumps,
    iso,
    list_item_out,
    memory_out,
    message_out,
    message_row,
    new_id,
    now_us,
    pairs,
    session_out,
    summary_out,
    usd,
)

T = TypeVar("T")


# Cold sessions ---------------------------------------------------------------------------------------


async def _cold_hash(b: Backend, sid: str, uid: str) -> Hash:
    """The session as Postgres has it, or NotFound. Also used when Redis simply does not know the id:
    Postgres is the system of record, so a session that Redis lost entirely is still found."""
    if b.pg is not None:
        h = await cold.load_session(b.pg, b.schema, uid, sid)
        if h is not None:
            return h
    raise NotFound(SESSION_NOT_FOUND)


async def _rehydrate(b: Backend, uk: UserKeys, sid: str, uid: str) -> None:
    """Bring a cold session back into Redis (its row and memories; its messages stay in Postgres and
    are read from there by sequence number) so that a write can proceed on the hot path."""
    for _ in range(_ATTEMPTS):
        h = await _cold_hash(b, sid, uid)
        assert b.pg is not None
        memories = await cold.load_memory_docs(b.pg, b.schema, uid, sid)
        types = [str(orjson.loads(doc)["memory_type"]) for _, doc in memories]
        h = {**h, "fv": h["v"], "mfirst": str(int(h["message_count"]) + 1)}
        triples = [(seq, mtype, doc) for (seq, doc), mtype in zip(memories, types, strict=True)]
        if int(await b.scripts.rehydrate(uk, sid, now_us(), h, triples)) >= 0:
            return
        # What we read predates the session's last eviction: read Postgres again.
    raise Unavailable("Session is changing too fast to load; retry")


# A write that meets a cold session rehydrates it and tries again. Rarely, the sweep evicts it again
# in between (only with a tiny SESSION_HOT_TTL), so allow a few rounds.
_ATTEMPTS = 3


async def _write(b: Backend, uk: UserKeys, sid: str, uid: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run a write script; if the session is cold, rehydrate it and run the script again."""
    reply: Any = await call()
    for _ in range(_ATTEMPTS):
        if reply[0] not in ("cold", "missing"):
            break
        await _rehydrate(b, uk, sid, uid)
        reply = await call()
    return reply  # type: ignore[no-any-return]


def _check(reply: Sequence[Any], what: str) -> None:
    state = reply[0]
    if state in ("missing", "cold"):
        raise NotFound(SESSION_NOT_FOUND)
    if state == "conflict":
        raise Conflict(f"Session is {reply[1]}: {what}")


# Sessions --------------------------------------------------------------------------------------------


async def create_session(b: Backend, body: SessionCreate) -> Row:
    sid = new_id()
    now = now_us()
    uk = b.keys.for_user(body.user_id)
    h: Hash = {
        "session_id": sid,
        "user_id": body.user_id,
        "title": body.title,
        "status": "active",
        "conversation_data": dumps(body.conversation_data),
        "metadata": dumps(body.metadata),
        "session_summary": body.session_summary,
        "message_count": "0",
        "total_tokens": "0",
        "cost_micros": "0",
        "memory_count": "0",
        "created_at": str(now),
        "updated_at": str(now),
        "last_activity": str(now),
    }
    reply = await b.scripts.create_session(
        uk,
        sid,
        title=body.title,
        conversation_data=h["conversation_data"],
        metadata=h["metadata"],
        summary=body.session_summary,
        now=now,
    )
    _check(reply, "cannot create")
    return session_out(h)


async def _session_hash(b: Backend, sid: str, uid: str) -> Hash:
    uk = b.keys.for_user(uid)
    reply = await b.scripts.get_session(uk, sid)
    if reply[0] == "ok":
        return pairs(reply[1])
    return await _cold_hash(b, sid, uid)


async def get_session(b: Backend, sid: str, uid: str) -> Row:
    return session_out(await _session_hash(b, sid, uid))


async def get_summary(b: Backend, sid: str, uid: str) -> Row:
    return summary_out(await _session_hash(b, sid, uid))


async def update_session(b: Backend, sid: str, uid: str, body: SessionUpdate) -> Row:
    fields: list[str] = []
    if body.title is not None:
        fields += ["title", body.title]
    if body.metadata is not None:
        fields += ["metadata", dumps(body.metadata)]
    if body.conversation_data is not None:
        fields += ["conversation_data", dumps(body.conversation_data)]
    if body.session_summary is not None:
        fields += ["session_summary", body.session_summary]
    status = body.status.value if body.status is not None else ""
    return await _set_session(b, sid, uid, status, fields)


async def end_session(b: Backend, sid: str, uid: str) -> None:
    await _set_session(b, sid, uid, "ended", [])


async def set_status_if_idle(b: Backend, sid: str, uid: str, status: str, idle_before_us: int) -> bool:
    """Housekeeping: move the session to ``status`` only if it has been idle since ``idle_before_us``.
    False when it is busy again, already moved on, or gone."""
    try:
        await _set_session(b, sid, uid, status, [], idle_before_us)
    except (Conflict, NotFound):
        return False
    return True


async def _set_session(
    b: Backend, sid: str, uid: str, status: str, fields: list[str], idle_before_us: int | None = None
) -> Row:
    uk = b.keys.for_user(uid)
    guard = "" if idle_before_us is None else str(idle_before_us)

    def call() -> Awaitable[Any]:
        return b.scripts.update_session(
            uk, sid, now=now_us(), status=status, idle_before=guard, fields=fields
        )

    reply = await _write(b, uk, sid, uid, call)
    _check(reply, f"it cannot become {status}" if status else "cannot update")
    return session_out(pairs(reply[1]))


async def list_user_sessions(b: Backend, uid: str, active_only: bool, page: int, page_size: int) -> Row:
    uk = b.keys.for_user(uid)
    start = (page - 1) * page_size
    stop = start + page_size - 1
    total, sids, rows, newer, boundary, skip = await b.scripts.list_user_sessions(
        uk, active_only, start, stop
    )
    hashes: dict[str, Hash] = {}
    cold_ids: list[str] = []
    for sid, values in zip(sids, rows, strict=True):
        if values[0] is None:
            cold_ids.append(sid)
        else:
            hashes[sid] = dict(zip(LIST_FIELDS, values, strict=True))
    if cold_ids and b.pg is not None:
        hashes.update(await cold.load_sessions(b.pg, b.schema, uid, cold_ids))
    sessions = [list_item_out(sid, hashes[sid]) for sid in sids if sid in hashes]
    newer = int(newer)
    if boundary and stop >= newer and b.pg is not None:
        # Past the index's entries newer than the trimmed ones: continue from Postgres.
        offset, limit = max(0, start - newer), stop - start + 1 - len(sids)
        older = await cold.list_older(b.pg, b.schema, uid, int(boundary), skip, offset, limit)
        sessions += [list_item_out(h["session_id"], h) for h in older]
    return {"sessions": sessions, "total": int(total), "page": page, "page_size": page_size}


async def stats(b: Backend) -> Row:
    async with b.redis.pipeline(transaction=False) as pipe:
        for bucket in range(b.keys.buckets):
            pipe.hgetall(b.keys.stats(bucket))
        per_bucket: list[Hash] = await pipe.execute()
    totals = {"sessions": 0, "active": 0, "messages": 0, "tokens": 0, "cost_micros": 0}
    for h in per_bucket:
        for name in totals:
            totals[name] += int(h.get(name, 0))
    sessions = totals["sessions"]
    return {
        "total_sessions": sessions,
        "active_sessions": totals["active"],
        "total_messages": totals["messages"],
        "total_tokens": totals["tokens"],
        "total_cost": usd(totals["cost_micros"]),
        "average_messages_per_session": round(totals["messages"] / sessions, 2) if sessions else 0.0,
    }


# Messages --------------------------------------------------------------------------------------------


async def append_message(b: Backend, sid: str, uid: str, body: MessageCreate) -> Row:
    uk = b.keys.for_user(uid)
    message = {  # record.MESSAGE_FIELDS
        "id": new_id(),
        "role": body.role.value,
        "content": body.content,
        "type": body.message_type.value,
        "tokens": str(body.tokens_used),
        "cost": str(to_micros(body.cost_usd)),  # type: ignore[arg-type]  # validated into a Decimal
        "meta": dumps(body.metadata),
        "ts": str(now_us()),
    }
    reply = await _write(b, uk, sid, uid, lambda: b.scripts.append_message(uk, sid, message))
    _check(reply, "only an active session takes new messages")
    return message_out(sid, uid, int(reply[1]), message)


async def list_messages(b: Backend, sid: str, uid: str, page: int, page_size: int) -> Row:
    uk = b.keys.for_user(uid)
    lo = (page - 1) * page_size + 1
    hi = lo + page_size - 1
    reply = await b.scripts.list_messages(uk, sid, lo, hi)
    messages: list[Row] = []
    if reply[0] == "ok":
        total, first = int(reply[1]), int(reply[2])
        if lo < first and b.pg is not None:
            for seq, f in await cold.load_messages(b.pg, b.schema, uid, sid, lo, min(hi, first - 1)):
                messages.append(message_out(sid, uid, seq, f))
        # [.., an entry's id, its values in MESSAGE_FIELDS order, ..]
        width = 1 + len(MESSAGE_FIELDS)
        for i in range(3, len(reply), width):
            seq = int(reply[i].partition("-")[0])
            messages.append(message_row(sid, uid, seq, reply[i + 1 : i + width]))
    else:
        h = await _cold_hash(b, sid, uid)
        total = int(h["message_count"])
        assert b.pg is not None
        for seq, f in await cold.load_messages(b.pg, b.schema, uid, sid, lo, hi):
            messages.append(message_out(sid, uid, seq, f))
    return {"messages": messages, "total": total, "page": page, "page_size": page_size}


# Memories --------------------------------------------------------------------------------------------


async def create_memory(b: Backend, sid: str, uid: str, body: MemoryCreate) -> Row:
    uk = b.keys.for_user(uid)
    mtype = body.memory_type.value
    now = now_us()
    doc = dumps(
        {
            "memory_id": new_id(),
            "memory_type": mtype,
            "content": body.content,
            "metadata": body.metadata,
            "created_at": iso(now),
        }
    )

    def call() -> Awaitable[Any]:
        return b.scripts.create_memory(uk, sid, now=now, memory_type=mtype, doc=doc)

    reply = await _write(b, uk, sid, uid, call)
    _check(reply, "it no longer takes memories")
    return memory_out(sid, uid, doc)


async def list_memories(
    b: Backend, sid: str, uid: str, memory_type: str | None, page: int, page_size: int
) -> Row:
    """Newest first."""
    uk = b.keys.for_user(uid)
    start = (page - 1) * page_size
    reply = await b.scripts.list_memories(uk, sid, memory_type or MEMORY_ALL, start, start + page_size - 1)
    if reply[0] == "ok":
        total = int(reply[1])
        docs = [d for d in reply[3] if d is not None]
    else:
        await _cold_hash(b, sid, uid)
        assert b.pg is not None
        total, docs = await cold.load_memories(b.pg, b.schema, uid, sid, memory_type, start, page_size)
    return {
        "memories": [memory_out(sid, uid, d) for d in docs],
        "total": total,
        "page": page,
        "page_size": page_size,
    }


async def latest_memory(b: Backend, sid: str, uid: str, memory_type: str | None) -> Row:
    page = await list_memories(b, sid, uid, memory_type, 1, 1)
    if not page["memories"]:
        raise NotFound(MEMORY_NOT_FOUND)
    return page["memories"][0]  # type: ignore[no-any-return]
