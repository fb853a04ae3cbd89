"""The guide's JSON shapes, built from the storage record (``record.py``), hot or cold alike.

A session hash, a message's stream fields and a memory's document look the same whether they come
from Redis or were rebuilt from Postgres (``cold.py``), so one set of functions answers both tiers
with the same JSON. Time is integer microseconds in storage and ISO 8601 UTC here; money is integer
micro-dollars in storage and the nearest double here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import orjson

from session_svc.record.fields import MESSAGE_FIELDS, MICROS

Row = dict[str, Any]
Hash = dict[str, str]


def new_id() -> str:
    """A random (version 4) UUID in its canonical text form: what ``str(uuid.uuid4())`` gives, in a
    third of the time (no ``UUID`` object in between)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def now_us() -> int:
    return time.time_ns() // 1000


@lru_cache(maxsize=4096)
def _iso_seconds(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def iso(us: int | str) -> str:
    """ISO 8601 UTC with microseconds and Z. Cached per second: a page of 200 messages formats fast. A
    stored value (a string of digits since 1970-01-01 00:00:01) is cut as a string, not divided."""
    if type(us) is str and len(us) > 6 and us.isdigit():
        return f"{_iso_seconds(int(us[:-6]))}.{us[-6:]}Z"
    seconds, micros = divmod(int(us), 1_000_000)
    return f"{_iso_seconds(seconds)}.{micros:06d}Z"


def usd(micros: int | str) -> float:
    # Correctly rounded division: the nearest double to n/10^6, whose shortest repr is that decimal.
    return int(micros) / MICROS


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def pairs(flat: Sequence[str]) -> Hash:
    """A flat [field, value, ...] reply (HGETALL, stream entry) as a dict."""
    it = iter(flat)
    return dict(zip(it, it, strict=True))


def session_out(h: Hash) -> Row:
    status = h["status"]
    return {
        "session_id": h["session_id"],
        "user_id": h["user_id"],
        "title": h["title"],
        "status": status,
        "conversation_data": orjson.Fragment(h["conversation_data"]),
        "metadata": orjson.Fragment(h["metadata"]),
        "is_active": status == "active",
        "message_count": int(h["message_count"]),
        "total_tokens": int(h["total_tokens"]),
        "total_cost": usd(h["cost_micros"]),
        "session_summary": h["session_summary"],
        "created_at": iso(h["created_at"]),
        "updated_at": iso(h["updated_at"]),
        "last_activity": iso(h["last_activity"]),
    }


_SUMMARY_FIELDS = (
    "session_id", "user_id", "title", "status", "message_count", "total_tokens", "total_cost", "has_memory",
    "is_active", "session_summary", "created_at", "last_activity",
)  # fmt: skip


def summary_out(h: Hash) -> Row:
    full = session_out(h)
    full["has_memory"] = int(h["memory_count"]) > 0
    return {k: full[k] for k in _SUMMARY_FIELDS}


def list_item_out(sid: str, h: Hash) -> Row:
    status = h["status"]
    return {
        "session_id": sid,
        "user_id": h["user_id"],
        "title": h["title"],
        "status": status,
        "is_active": status == "active",
        "message_count": int(h["message_count"]),
        "total_tokens": int(h["total_tokens"]),
        "total_cost": usd(h["cost_micros"]),
        "created_at": iso(h["created_at"]),
        "updated_at": iso(h["updated_at"]),
        "last_activity": iso(h["last_activity"]),
    }


def message_out(sid: str, uid: str, seq: int, f: Hash) -> Row:
    """``f`` is a message as stored in the stream (and as ``cold.py`` rebuilds it from Postgres)."""
    return message_row(sid, uid, seq, [f[name] for name in MESSAGE_FIELDS])


_ID, _ROLE, _CONTENT, _TYPE, _TOKENS, _COST, _META, _TS = map(
    MESSAGE_FIELDS.index, ("id", "role", "content", "type", "tokens", "cost", "meta", "ts")
)


def message_row(sid: str, uid: str, seq: int, v: Sequence[str]) -> Row:
    """A message from its values in MESSAGE_FIELDS order (as the page script returns them)."""
    return {
        "message_id": v[_ID],
        "session_id": sid,
        "user_id": uid,
        "sequence": seq,
        "role": v[_ROLE],
        "content": v[_CONTENT],
        "message_type": v[_TYPE],
        "metadata": orjson.Fragment(v[_META]),
        "tokens_used": int(v[_TOKENS]),
        "cost_usd": usd(v[_COST]),
        "created_at": iso(v[_TS]),
    }


_ENTRY_NAMES = list(MESSAGE_FIELDS)


def message_of_entry(sid: str, uid: str, seq: int, kv: list[str]) -> Row:
    """A message from its stream entry as XRANGE gives it ([field, value, ...]): the append writes the
    fields in MESSAGE_FIELDS order; any other order is read by name."""
    values = kv[1::2]
    if kv[0::2] != _ENTRY_NAMES:
        f = dict(zip(kv[0::2], values, strict=True))
        values = [f[name] for name in MESSAGE_FIELDS]
    return message_row(sid, uid, seq, values)


def memory_out(sid: str, uid: str, doc: str) -> Row:
    d = orjson.loads(doc)
    return {"memory_id": d.pop("memory_id"), "session_id": sid, "user_id": uid, **d}
