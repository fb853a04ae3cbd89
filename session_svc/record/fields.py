"""The storage record format: what a session, a message, a memory and an outbox entry look like in Redis.

This module is the one place that names them. The Lua scripts (``scripts.py``, the names generated into
their source), the JSON shaping (``shapes.py``), the cold reads (``cold.py``), the flusher
(``workers/flush.py``) and the tests take their field lists, entry kinds, memory types and the money
scale from here. Adding a field or a memory type is a change here plus a migration.

Every value is a string in Redis. Money is integer micro-dollars (``MICROS`` per dollar), timestamps
integer microseconds since the epoch.
"""

from __future__ import annotations

from enum import StrEnum

# Money: integer micro-dollars, never a binary float.
MICROS = 1_000_000


class MemoryType(StrEnum):
    preference = "preference"
    conversation = "conversation"
    entity = "entity"
    summary = "summary"
    custom = "custom"


# The memory index of a session holds one sorted set per type, and this one for all types.
MEMORY_ALL = "*"


# Session hash (``P:{bNN}:s:<sid>``) ----------------------------------------------------------------------

# What a session is: written to Postgres's ``sessions`` row, read back from it for a cold session.
SESSION_FIELDS = (
    "session_id", "user_id", "title", "status", "conversation_data", "metadata", "session_summary",
    "message_count", "total_tokens", "cost_micros", "memory_count", "created_at", "updated_at",
    "last_activity",
)  # fmt: skip
# Bookkeeping beside them, Redis only: version ``v`` (bumped by every write), flushed version ``fv``
# (the highest version committed to Postgres), ``mfirst`` (the first message sequence held in Redis;
# earlier ones are only in Postgres after a rehydration); and, only while an outbox entry of the session
# keeps failing, ``stuck`` (that entry's id).
BOOKKEEPING = ("v", "fv", "mfirst")
# The fields a listing needs (the two large JSON objects stay out).
LIST_FIELDS = (
    "user_id", "title", "status", "message_count", "total_tokens", "cost_micros", "created_at",
    "updated_at", "last_activity",
)  # fmt: skip

# A message: one entry of the session's message stream (``P:{bNN}:m:<sid>``, entry id ``<seq>-0``) --------

MESSAGE_FIELDS = ("id", "role", "content", "type", "tokens", "cost", "meta", "ts")

# A memory: one JSON document in the session's memory hash (``P:{bNN}:y:<sid>``, field = its seq) -------

MEMORY_DOC_FIELDS = ("memory_id", "memory_type", "content", "metadata", "created_at")

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
    message = "m"  # a message: the entry carries it whole
    memory = "y"  # a memory: the entry carries its JSON document


# Every entry names its session, user and the session version after the write.
ENTRY_HEAD = ("k", "sid", "uid", "v")
ENTRY_FIELDS: dict[Kind, tuple[str, ...]] = {
    Kind.session: ENTRY_HEAD,
    Kind.message: (*ENTRY_HEAD, "seq", *MESSAGE_FIELDS),
    Kind.memory: (*ENTRY_HEAD, "seq", "doc"),
}


def lua_strings(names: tuple[str, ...] | list[str]) -> str:
    """``'a', 'b'``: a list of names as Lua string literals, to generate into a script's source."""
    return ", ".join(f"'{n}'" for n in names)
