"""What the flusher writes: outbox entries and session snapshots as Postgres rows, and the statements.

All of it is generated from the record's table (``session_svc/record/fields.py``): a row is a JSON
object keyed by the fields' Redis names, a batch one JSON array per table, read by the statement's
``json_to_recordset`` and converted to the columns' units in SQL (``Field.from_row``), exactly.

Each statement names its conflict target, the table's primary key, which starts with the distribution
column ``user_id`` (migration 0002): a distributed Postgres routes each row to its user's shard and
checks it there. One JSON parameter rather than arrays (unnest): Postgres costs the same, but asyncpg
type-checks every array element while it sends the statement, and orjson builds the document while the
batch before it commits (docs/performance.md has the figures).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from session_svc.record import fields as record
from session_svc.record.fields import MEMORY, MESSAGE, ROW_KEY, SESSION_ROW, Conv, Field, Kind


@dataclass(frozen=True, slots=True)
class Entry:
    bucket: int
    id: str
    f: dict[str, str]


@dataclass(frozen=True, slots=True)
class Table:
    """The rows one statement writes: how many, and all of them as one JSON array (its parameter)."""

    rows: int
    doc: str


def table(rows: list[dict[str, Any]]) -> Table:
    return Table(len(rows), orjson.dumps(rows).decode() if rows else "")


# The fields each kind of entry carries, by the kind's letter.
_REQUIRED = {kind.value: frozenset(fields) for kind, fields in record.ENTRY_FIELDS.items()}


def well_formed(e: Entry) -> bool:
    required = _REQUIRED.get(e.f.get("k", ""))
    return required is not None and required <= e.f.keys()


def session_row(h: dict[str, str]) -> dict[str, Any]:
    """A session hash (``HGETALL``) as a row of the upsert."""
    return {f.name: f.row_value(h[f.name]) for f in SESSION_ROW}


_MESSAGE_ROW = (*ROW_KEY, *MESSAGE)

# What the entries of a batch point at: (bucket, sid, kind, seq) -> the stored fields (a message's
# stream fields; a memory's ``doc``).
Content = dict[tuple[int, str, str, int], dict[str, str]]


def pointers(entries: Sequence[Entry]) -> dict[tuple[int, str, str], list[int]]:
    """Per (bucket, sid, kind), the sorted sequences whose content the flusher must read from the
    session's keys: those of message and memory entries that do not carry it (release 1.0's did)."""
    out: dict[tuple[int, str, str], list[int]] = {}
    for e in entries:
        if e.f["k"] in record.ENTRY_CONTENT_1_0 and not _carries_content(e):
            out.setdefault((e.bucket, e.f["sid"], e.f["k"]), []).append(int(e.f["seq"]))
    for seqs in out.values():
        seqs.sort()
    return out


# A gap in a session's sequences longer than this starts another XRANGE (rather than reading the gap).
RUN_GAP = 16


def runs(seqs: Sequence[int]) -> list[list[int]]:
    """Sorted sequences cut into runs without a gap over ``RUN_GAP``: one XRANGE each."""
    out: list[list[int]] = []
    for seq in seqs:
        if out and seq - out[-1][-1] <= RUN_GAP:
            out[-1].append(seq)
        else:
            out.append([seq])
    return out


def _carries_content(e: Entry) -> bool:
    """A message or memory entry written by release 1.0: its content is in the entry itself."""
    return record.ENTRY_CONTENT_1_0[Kind(e.f["k"])][0] in e.f


def content_of(e: Entry, content: Content) -> dict[str, str]:
    """What ``e`` stands for: the fields it carries (release 1.0), or those read for it (KeyError if its
    content is not in Redis: a data error, so the entry goes its own way to the dead letters)."""
    if _carries_content(e):
        return e.f
    return content[(e.bucket, e.f["sid"], e.f["k"], int(e.f["seq"]))]


def message_row(e: Entry, content: dict[str, str]) -> dict[str, Any]:
    """A message entry and its stream fields as a row."""
    row: dict[str, Any] = {x.name: x.row_value(e.f[x.name]) for x in ROW_KEY}
    for x in MESSAGE:
        row[x.name] = x.row_value(content[x.name])
    return row


def memory_row(e: Entry, content: dict[str, str]) -> dict[str, Any]:
    """A memory entry and its JSON document as a row."""
    doc = orjson.loads(content["doc"])
    row: dict[str, Any] = {x.name: x.row_value(e.f[x.name]) for x in ROW_KEY}
    for x in MEMORY:
        row[x.name] = orjson.dumps(doc[x.name]).decode() if x.conv is Conv.json else doc[x.name]
    return row


def _insert(table_name: str, fields: Sequence[Field], conflict: str, update: str) -> str:
    columns = ", ".join(f.column for f in fields)
    values = ", ".join(f.from_row() for f in fields)
    recordset = ", ".join(f"{f.name} {f.recordset_type}" for f in fields)
    return (
        f"INSERT INTO {{s}}.{table_name} AS t ({columns})\n"
        f"SELECT {values}\n"
        f"FROM json_to_recordset($1::json) AS u({recordset})\n"
        f"ON CONFLICT ({conflict}) {update}"
    )


# A session's snapshot replaces an older version, never a newer one (batches may commit out of order).
UPSERT_SESSIONS = _insert(
    "sessions",
    SESSION_ROW,
    "user_id, session_id",
    "DO UPDATE SET "
    + ", ".join(f"{f.column} = EXCLUDED.{f.column}" for f in SESSION_ROW if f.mutable)
    + " WHERE t.version < EXCLUDED.version",
)
# Messages and memories are keyed by (user, session, seq): a replayed entry changes nothing.
INSERT_MESSAGES = _insert("session_messages", _MESSAGE_ROW, "user_id, session_id, seq", "DO NOTHING")
INSERT_MEMORIES = _insert("session_memories", (*ROW_KEY, *MEMORY), "user_id, session_id, seq", "DO NOTHING")
