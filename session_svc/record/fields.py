"""The table of the record: every field of a session, a message and a memory, declared once.

Each ``Field`` names the value in Redis (a hash field, a stream field, a key of a memory's JSON
document), its Postgres column, its name in the guide's JSON, and its unit (``Conv``). From these
tuples come the Lua field lists (``storage/scripts``), the flusher's statements and rows
(``workers/rows.py``), the cold read's columns (``storage/cold.py``) and the create record
(``domain/store.py``); the JSON shaping (``shapes.py``) and the response models (``models.py``) are
written out for speed and checked against it by ``tests/test_record_table.py``, as is the Postgres
schema. Adding a field: a row here, a migration, and its line in ``shapes.py`` and ``models.py``.

Every value is a string in Redis. Money is integer micro-dollars (``MICROS`` per dollar), timestamps
integer microseconds since the epoch; the SQL conversions between those and ``numeric`` dollars and
``timestamptz`` are the ``sql_*`` helpers below, used by every statement that converts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# Money: integer micro-dollars, never a binary float.
MICROS = 1_000_000


class Conv(StrEnum):
    """How a field's stored string is typed, in Redis, in Postgres and in JSON."""

    text = "text"  # text everywhere
    json = "json"  # a JSON document: text in Redis (as orjson wrote it), jsonb, embedded as is
    int = "int"  # a decimal integer; an integer column; a JSON number
    money = "money"  # integer micro-dollars; numeric dollars; the nearest double
    time = "time"  # integer microseconds since the epoch; timestamptz; ISO 8601 UTC with µs and Z
    iso = "iso"  # ISO 8601 text already (a memory document's time); timestamptz; as is


# SQL conversions of the units, exact (numeric and integer arithmetic, never a float) ------------------


def sql_us_to_timestamptz(us: str) -> str:
    """Integer microseconds since the epoch (an expression or ``$n``) as a timestamptz."""
    return f"('epoch'::timestamptz + {us} * interval '1 microsecond')"


def sql_timestamptz_to_us(column: str) -> str:
    return f"(extract(epoch FROM {column}) * 1000000)::bigint"


def sql_micros_to_usd(micros: str) -> str:
    return f"({micros}::numeric / {MICROS})"


def sql_usd_to_micros(column: str) -> str:
    return f"({column} * {MICROS})::bigint"


@dataclass(frozen=True, slots=True)
class Field:
    name: str  # in Redis
    column: str  # in Postgres
    json: str | None  # in the guide's JSON (None: not shown under its own name)
    conv: Conv = Conv.text
    mutable: bool = True  # an upsert of a newer version overwrites it

    @property
    def recordset_type(self) -> str:
        """Its type in the flusher's ``json_to_recordset`` (the JSON rows carry Redis values)."""
        return "bigint" if self.conv in (Conv.int, Conv.money, Conv.time) else "text"

    def from_row(self) -> str:
        """SQL: the column's value from the flusher's recordset column ``name``."""
        n = self.name
        return {
            Conv.json: f"{n}::jsonb",
            Conv.money: sql_micros_to_usd(n),
            Conv.time: sql_us_to_timestamptz(n),
            Conv.iso: f"{n}::timestamptz",
        }.get(self.conv, n)

    def to_redis(self) -> str:
        """SQL: the column as Redis holds the field (text), named as in Redis (for the cold reads)."""
        c = self.column
        expr = {
            Conv.json: f"{c}::text",
            Conv.int: f"{c}::text",
            Conv.money: f"{sql_usd_to_micros(c)}::text",
            Conv.time: f"{sql_timestamptz_to_us(c)}::text",
            Conv.iso: f"to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        }.get(self.conv, c)
        return expr if expr == self.name else f"{expr} AS {self.name}"

    def row_value(self, value: str) -> str | int:
        """A Redis value as the flusher's JSON row carries it."""
        return int(value) if self.conv in (Conv.int, Conv.money, Conv.time) else value


def names(fields: tuple[Field, ...]) -> tuple[str, ...]:
    return tuple(f.name for f in fields)


# Statuses -------------------------------------------------------------------------------------------


class SessionStatus(StrEnum):
    active = "active"
    completed = "completed"
    archived = "archived"
    ended = "ended"


# The guide's state machine: active -> completed -> archived, active -> ended. Archived and ended
# sessions are read-only; a completed one still takes memories (e.g. its summary), not messages.
TRANSITIONS: dict[SessionStatus, tuple[SessionStatus, ...]] = {
    SessionStatus.active: (SessionStatus.completed, SessionStatus.ended),
    SessionStatus.completed: (SessionStatus.archived,),
}
READ_ONLY = (SessionStatus.archived, SessionStatus.ended)


class MemoryType(StrEnum):
    preference = "preference"
    conversation = "conversation"
    entity = "entity"
    summary = "summary"
    custom = "custom"


# The memory index of a session holds one sorted set per type, and this one for all types.
MEMORY_ALL = "*"


# A session: the hash ``P:{bNN}:s:<sid>``, the ``sessions`` row ---------------------------------------

SESSION: tuple[Field, ...] = (
    Field("session_id", "session_id", "session_id", mutable=False),
    Field("user_id", "user_id", "user_id", mutable=False),
    Field("title", "title", "title"),
    Field("status", "status", "status"),
    Field("conversation_data", "conversation_data", "conversation_data", Conv.json),
    Field("metadata", "metadata", "metadata", Conv.json),
    Field("session_summary", "session_summary", "session_summary"),
    Field("message_count", "message_count", "message_count", Conv.int),
    Field("total_tokens", "total_tokens", "total_tokens", Conv.int),
    Field("cost_micros", "total_cost", "total_cost", Conv.money),
    Field("memory_count", "memory_count", None, Conv.int),  # shown as ``has_memory``
    Field("created_at", "created_at", "created_at", Conv.time, mutable=False),
    Field("updated_at", "updated_at", "updated_at", Conv.time),
    Field("last_activity", "last_activity", "last_activity", Conv.time),
)
# Its version: bumped by every write in Redis, kept in Postgres so that an older snapshot never
# overwrites a newer one and a session read back has the ETag it had.
VERSION = Field("v", "version", None, Conv.int)
SESSION_ROW = (*SESSION, VERSION)
SESSION_FIELDS = names(SESSION)
# Bookkeeping beside them, Redis only: version ``v``, flushed version ``fv`` (the highest version
# committed to Postgres), ``mfirst`` (the first message sequence held in Redis; earlier ones are only in
# Postgres after a rehydration), ``oid`` (the id of the session's newest outbox entry: the sweep evicts
# the session only once the outbox group has acknowledged every entry up to it, since message and
# memory entries point at content that only the session's keys hold); and, only while an outbox entry
# of the session keeps failing, ``stuck`` (that entry's id).
BOOKKEEPING = ("v", "fv", "mfirst", "oid")
# The fields a listing needs (the two large JSON objects stay out).
LIST_FIELDS = tuple(
    f.name for f in SESSION if f.name not in ("session_id", "conversation_data", "metadata",
                                              "session_summary", "memory_count")
)  # fmt: skip
# Shown in the guide's session JSON besides the table's fields, derived from them.
SESSION_DERIVED = ("is_active",)  # status == active
SUMMARY_DERIVED = ("has_memory",)  # memory_count > 0


def new_session_record(
    sid: str, uid: str, title: str, conversation_data: str, metadata: str, summary: str, now: int
) -> dict[str, str]:
    """A session as its create writes it: every field of SESSION and the bookkeeping, as strings."""
    values = {
        "session_id": sid, "user_id": uid, "title": title, "status": SessionStatus.active.value,
        "conversation_data": conversation_data, "metadata": metadata, "session_summary": summary,
    }  # fmt: skip
    start = {Conv.int: "0", Conv.money: "0", Conv.time: str(now)}
    record = {f.name: values[f.name] if f.name in values else start[f.conv] for f in SESSION}
    return {**record, "v": "1", "fv": "0", "mfirst": "1"}


# A message: one entry of the session's stream ``P:{bNN}:m:<sid>`` (entry id ``<seq>-0``), a
# ``session_messages`` row. Short Redis names: they are stored with every entry. -----------------------

MESSAGE: tuple[Field, ...] = (
    Field("id", "message_id", "message_id"),
    Field("role", "role", "role"),
    Field("content", "content", "content"),
    Field("type", "message_type", "message_type"),
    Field("tokens", "tokens_used", "tokens_used", Conv.int),
    Field("cost", "cost_usd", "cost_usd", Conv.money),
    Field("meta", "metadata", "metadata", Conv.json),
    Field("ts", "created_at", "created_at", Conv.time),
)
MESSAGE_FIELDS = names(MESSAGE)
# Shown in the guide's message JSON besides the table's fields: where it belongs, from the key.
MESSAGE_CONTEXT = ("session_id", "user_id", "sequence")

# A memory: one JSON document in the session's memory hash ``P:{bNN}:y:<sid>`` (field = its seq), a
# ``session_memories`` row. ----------------------------------------------------------------------------

MEMORY: tuple[Field, ...] = (
    Field("memory_id", "memory_id", "memory_id"),
    Field("memory_type", "memory_type", "memory_type"),
    Field("content", "content", "content"),
    Field("metadata", "metadata", "metadata", Conv.json),
    Field("created_at", "created_at", "created_at", Conv.iso),
)
MEMORY_DOC_FIELDS = names(MEMORY)
MEMORY_CONTEXT = ("session_id", "user_id")

# What places a message or memory row: from its outbox entry (``sid``, ``uid``, ``seq``).
ROW_KEY: tuple[Field, ...] = (
    Field("sid", "session_id", None),
    Field("uid", "user_id", None),
    Field("seq", "seq", None, Conv.int),
)

# A bucket's counters (``P:{bNN}:stats``) ---------------------------------------------------------------
# Changed by the API's scripts in the same step as the write they count, so they are exact and
# service-wide once summed over the buckets: ``sessions`` (ever created); one field per session status,
# named by it (sessions in that status now); ``messages`` and ``role:<role>``; ``tokens``;
# ``cost_micros``; ``memories`` and ``memory:<type>``; ``rehydrations`` (sessions read back from
# Postgres into Redis).
ROLE_STAT = "role:"
MEMORY_STAT = "memory:"

# Outbox entries (``P:{bNN}:outbox``) -----------------------------------------------------------------------


class Kind(StrEnum):
    """``k`` of an outbox entry."""

    session = "s"  # the session changed: the flusher upserts its current hash
    message = "m"  # a message: the entry points at it (``seq`` in the session's stream)
    memory = "y"  # a memory: the entry points at it (``seq`` in the session's memory hash)


# Every entry names its session, user and the session version after the write; message and memory
# entries the ``seq`` whose content the flusher reads from the session's keys (one copy of the content
# in Redis, not two). Entries written by release 1.0 carried the content too (``ENTRY_CONTENT_1_0``):
# the flusher still takes those as they are (docs/decisions.md, "Pointer entries").
ENTRY_HEAD = ("k", "sid", "uid", "v")
ENTRY_FIELDS: dict[Kind, tuple[str, ...]] = {
    Kind.session: ENTRY_HEAD,
    Kind.message: (*ENTRY_HEAD, "seq"),
    Kind.memory: (*ENTRY_HEAD, "seq"),
}
ENTRY_CONTENT_1_0: dict[Kind, tuple[str, ...]] = {Kind.message: MESSAGE_FIELDS, Kind.memory: ("doc",)}


def lua_strings(names: tuple[str, ...] | list[str]) -> str:
    """``'a', 'b'``: a list of names as Lua string literals, to generate into a script's source."""
    return ", ".join(f"'{n}'" for n in names)
