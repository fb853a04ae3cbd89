"""Sessions, messages and memories: the domain operations, Redis first, Postgres for what left Redis.

Every function takes the ``Backend`` (``storage/resources.py``: the process's Redis client, key layout,
registered scripts and, when configured, the asyncpg pool) and plain values, and returns JSON-ready
dicts in the guide's shapes (``record/shapes.py``). Hot paths are one script call
(``storage/scripts/api.py``). A session whose data has left Redis (``cold``) is read from Postgres
with the same shapes (``storage/cold.py``), and brought back into Redis before it is written to.

Writes take the request's ``Conditions`` (``conditions.py``: idempotency, If-Match, rate limits).
Objects sent with an Idempotency-Key (``metadata``, ``conversation_data``) are stored with sorted keys,
so a retry that serialises them in another order still gets the very same bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel

from session_svc.domain.conditions import (
    NO_CONDITIONS,
    Conditions,
    Written,
    as_json,
    check,
    etag,
    guard_of,
    replayed_record,
)
from session_svc.errors import MEMORY_NOT_FOUND, SESSION_NOT_FOUND, Conflict, NotFound, Unavailable
from session_svc.record.fields import (
    LIST_FIELDS,
    MEMORY_ALL,
    SessionStatus,
    new_session_record,
)
from session_svc.record.keys import UserKeys
from session_svc.record.models import MemoryCreate, MessageCreate, SessionCreate, SessionUpdate, to_micros
from session_svc.record.shapes import (
    Hash,
    Row,
    dumps,
    iso,
    list_item_out,
    memory_out,
    message_of_entry,
    message_out,
    new_id,
    now_us,
    pairs,
    session_out,
    summary_out,
    usd,
)
from session_svc.storage import cold
from session_svc.storage.resources import Backend
from session_svc.storage.scripts import Reply

__all__ = ["NO_CONDITIONS", "Conditions", "Written", "etag"]

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
        if reply[0] not in (Reply.cold, Reply.missing):
            break
        await _rehydrate(b, uk, sid, uid)
        reply = await call()
    return reply  # type: ignore[no-any-return]


# Sessions --------------------------------------------------------------------------------------------


def _new_session(sid: str, now: int, body: SessionCreate, sort: bool) -> Hash:
    return new_session_record(
        sid, body.user_id, body.title, as_json(body.conversation_data, sort), as_json(body.metadata, sort),
        body.session_summary, now,
    )  # fmt: skip


async def create_session(b: Backend, body: SessionCreate, cond: Conditions = NO_CONDITIONS) -> Written:
    sid = new_id()
    now = now_us()
    uk = b.keys.for_user(body.user_id)
    idem = cond.idempotency_key is not None
    h = _new_session(sid, now, body, idem)
    reply = await b.scripts.create_session(
        uk,
        sid,
        title=body.title,
        conversation_data=h["conversation_data"],
        metadata=h["metadata"],
        summary=body.session_summary,
        now=now,
        guard=guard_of(b, uk, cond, ("create_session", "", body), (sid, now), now),
    )
    if reply[0] == Reply.replay:
        (sid, now), _ = replayed_record(reply[1])
        return Written(session_out(_new_session(sid, now, body, idem)), etag(1), replayed=True)
    check(reply, "cannot create")
    return Written(session_out(h), etag(1))


async def _session_hash(b: Backend, sid: str, uid: str) -> Hash:
    uk = b.keys.for_user(uid)
    reply = await b.scripts.get_session(uk, sid)
    if reply[0] == Reply.ok:
        return pairs(reply[1])
    return await _cold_hash(b, sid, uid)


async def get_session(b: Backend, sid: str, uid: str) -> tuple[Row, str]:
    """The session and its ETag (the same for the same state, hot or cold: Postgres keeps ``v``)."""
    h = await _session_hash(b, sid, uid)
    return session_out(h), etag(h["v"])


async def get_summary(b: Backend, sid: str, uid: str) -> tuple[Row, str]:
    h = await _session_hash(b, sid, uid)
    return summary_out(h), etag(h["v"])


async def update_session(
    b: Backend, sid: str, uid: str, body: SessionUpdate, cond: Conditions = NO_CONDITIONS
) -> Written:
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
    return await _set_session(b, sid, uid, status, fields, cond=cond, request=("update_session", sid, body))


async def end_session(b: Backend, sid: str, uid: str, cond: Conditions = NO_CONDITIONS) -> Written:
    """The answer's ``row`` is the session as it was left (the route answers a fixed message)."""
    return await _set_session(
        b, sid, uid, SessionStatus.ended, [], cond=cond, request=("end_session", sid, None)
    )


async def set_status_if_idle(b: Backend, sid: str, uid: str, status: str, idle_before_us: int) -> bool:
    """Housekeeping: move the session to ``status`` only if it has been idle since ``idle_before_us``.
    False when it is busy again, already moved on, or gone."""
    try:
        await _set_session(b, sid, uid, status, [], idle_before_us)
    except (Conflict, NotFound):
        return False
    return True


async def _set_session(
    b: Backend,
    sid: str,
    uid: str,
    status: str,
    fields: list[str],
    idle_before_us: int | None = None,
    cond: Conditions = NO_CONDITIONS,
    request: tuple[str, str, BaseModel | None] = ("", "", None),
) -> Written:
    uk = b.keys.for_user(uid)
    idle = "" if idle_before_us is None else str(idle_before_us)
    # Housekeeping (idle_before_us) is the service's own write: never rate limited.
    guard = None if idle_before_us is not None else guard_of(b, uk, cond, request, (), now_us())

    def call() -> Awaitable[Any]:
        return b.scripts.update_session(
            uk, sid, now=now_us(), status=status, idle_before=idle, fields=fields,
            if_match=cond.if_match, guard=guard,
        )  # fmt: skip

    reply = await _write(b, uk, sid, uid, call)
    replayed = reply[0] == Reply.replay
    if replayed:
        h = pairs(orjson.loads(replayed_record(reply[1])[1]))
    else:
        check(reply, f"it cannot become {status}" if status else "cannot update")
        h = pairs(reply[1])
    return Written(session_out(h), etag(h["v"]), replayed)


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
    """The service-wide totals. Read at most every ``b.stats_max_age`` seconds per process (a dashboard
    polls this; every read fans out to every bucket): meanwhile the last read's exact totals, and calls
    that arrive while a read is under way share it."""
    if b.stats_max_age <= 0:
        return await _read_stats(b)
    memo = b.memo
    hit = memo.get("stats")
    if hit is not None and time.monotonic() - hit[0] < b.stats_max_age:
        return hit[1]  # type: ignore[no-any-return]
    flight: asyncio.Future[Row] | None = memo.get("stats_read")
    if flight is None:
        flight = asyncio.ensure_future(_read_stats_into(b, time.monotonic()))
        memo["stats_read"] = flight
    return await asyncio.shield(flight)


async def _read_stats_into(b: Backend, started: float) -> Row:
    try:
        row = await _read_stats(b)
        b.memo["stats"] = (started, row)  # as old as the moment the read began
        return row
    finally:
        b.memo.pop("stats_read", None)


async def _read_stats(b: Backend) -> Row:
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


def _message(mid: str, ts: int, body: MessageCreate, sort: bool) -> Hash:
    return {  # record.MESSAGE_FIELDS
        "id": mid,
        "role": body.role.value,
        "content": body.content,
        "type": body.message_type.value,
        "tokens": str(body.tokens_used),
        "cost": str(to_micros(body.cost_usd)),  # type: ignore[arg-type]  # validated into a Decimal
        "meta": as_json(body.metadata, sort),
        "ts": str(ts),
    }


async def append_message(
    b: Backend, sid: str, uid: str, body: MessageCreate, cond: Conditions = NO_CONDITIONS
) -> Written:
    uk = b.keys.for_user(uid)
    idem = cond.idempotency_key is not None
    mid, ts = new_id(), now_us()
    message = _message(mid, ts, body, idem)
    guard = guard_of(b, uk, cond, ("append_message", sid, body), (mid, ts), ts)
    reply = await _write(b, uk, sid, uid, lambda: b.scripts.append_message(uk, sid, message, guard))
    if reply[0] == Reply.replay:
        (mid, ts), seq = replayed_record(reply[1])
        return Written(message_out(sid, uid, int(seq), _message(mid, ts, body, idem)), replayed=True)
    check(reply, "only an active session takes new messages")
    return Written(message_out(sid, uid, int(reply[1]), message))


async def list_messages(b: Backend, sid: str, uid: str, page: int, page_size: int) -> Row:
    uk = b.keys.for_user(uid)
    lo = (page - 1) * page_size + 1
    hi = lo + page_size - 1
    reply = await b.scripts.list_messages(uk, sid, lo, hi)
    messages: list[Row] = []
    if reply[0] == Reply.ok:
        total, first = int(reply[1]), int(reply[2])
        if lo < first and b.pg is not None:
            for seq, f in await cold.load_messages(b.pg, b.schema, uid, sid, lo, min(hi, first - 1)):
                messages.append(message_out(sid, uid, seq, f))
        # XRANGE's entries: [id, [field, value, ...]].
        messages += [message_of_entry(sid, uid, int(eid.partition("-")[0]), kv) for eid, kv in reply[3]]
    else:
        h = await _cold_hash(b, sid, uid)
        total = int(h["message_count"])
        assert b.pg is not None
        for seq, f in await cold.load_messages(b.pg, b.schema, uid, sid, lo, hi):
            messages.append(message_out(sid, uid, seq, f))
    return {"messages": messages, "total": total, "page": page, "page_size": page_size}


# Memories --------------------------------------------------------------------------------------------


def _memory_doc(mid: str, now: int, body: MemoryCreate, sort: bool) -> str:
    return dumps(
        {
            "memory_id": mid,
            "memory_type": body.memory_type.value,
            "content": body.content,
            "metadata": orjson.Fragment(as_json(body.metadata, sort)),
            "created_at": iso(now),
        }
    )


async def create_memory(
    b: Backend, sid: str, uid: str, body: MemoryCreate, cond: Conditions = NO_CONDITIONS
) -> Written:
    uk = b.keys.for_user(uid)
    mtype = body.memory_type.value
    idem = cond.idempotency_key is not None
    mid, now = new_id(), now_us()
    doc = _memory_doc(mid, now, body, idem)
    guard = guard_of(b, uk, cond, ("create_memory", sid, body), (mid, now), now)

    def call() -> Awaitable[Any]:
        return b.scripts.create_memory(uk, sid, now=now, memory_type=mtype, doc=doc, guard=guard)

    reply = await _write(b, uk, sid, uid, call)
    if reply[0] == Reply.replay:
        (mid, now), _ = replayed_record(reply[1])
        return Written(memory_out(sid, uid, _memory_doc(mid, now, body, idem)), replayed=True)
    check(reply, "it no longer takes memories")
    return Written(memory_out(sid, uid, doc))


async def list_memories(
    b: Backend, sid: str, uid: str, memory_type: str | None, page: int, page_size: int
) -> Row:
    """Newest first."""
    uk = b.keys.for_user(uid)
    start = (page - 1) * page_size
    reply = await b.scripts.list_memories(uk, sid, memory_type or MEMORY_ALL, start, start + page_size - 1)
    if reply[0] == Reply.ok:
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
