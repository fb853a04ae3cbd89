"""``record/fields.py`` is the table of the record; every layer must agree with it: the Lua scripts
(Redis hash, message stream, outbox entries), the memory documents, the cold reads that rebuild the same
records from Postgres, the Postgres schema itself, the JSON shapes and the response models. The layers
generated from the table are exercised end to end; the ones written out by hand (shapes, models, the
migrations) are compared with it, so a copy that drifts fails here."""

from __future__ import annotations

import re
import typing
from enum import StrEnum
from typing import Any

import asyncpg
import orjson
from pydantic import BaseModel
from redis.asyncio import Redis

from session_svc.record import models, shapes
from session_svc.record.fields import (
    BOOKKEEPING,
    ENTRY_FIELDS,
    LIST_FIELDS,
    MEMORY,
    MEMORY_CONTEXT,
    MEMORY_DOC_FIELDS,
    MESSAGE,
    MESSAGE_CONTEXT,
    MESSAGE_FIELDS,
    ROW_KEY,
    SESSION,
    SESSION_DERIVED,
    SESSION_FIELDS,
    SESSION_ROW,
    SUMMARY_DERIVED,
    Conv,
    Field,
    Kind,
    SessionStatus,
    new_session_record,
)
from session_svc.storage import cold
from session_svc.storage.resources import Backend
from session_svc.storage.scripts import Reply, Scripts
from tests import outbox_drain
from tests.helpers import add_memory, add_message, make_session, new_user
from workers.expiry import sweep
from workers.flush import Flusher


async def test_every_tier_writes_and_reads_the_record_format(
    client: Any, backend: Backend, redis: Redis, flusher: Flusher
) -> None:
    uid = new_user()
    sid = (await make_session(client, uid, title="t"))["session_id"]
    await add_message(client, sid, uid, content="hi", cost_usd=0.5)
    await add_memory(client, sid, uid, memory_type="entity", content="x")
    uk = backend.keys.for_user(uid)

    # Redis: the session hash, its message stream, its memory documents, the outbox entries.
    assert set(await redis.hgetall(uk.session(sid))) == {*SESSION_FIELDS, *BOOKKEEPING}
    [(_, message)] = await redis.xrange(uk.messages(sid))
    assert tuple(message) == MESSAGE_FIELDS
    [doc] = (await redis.hgetall(uk.memories(sid))).values()
    assert tuple(orjson.loads(doc)) == MEMORY_DOC_FIELDS
    entries = [f for _, f in await redis.xrange(uk.outbox) if f["sid"] == sid]
    assert [f["k"] for f in entries] == [Kind.session, Kind.message, Kind.memory]
    assert [tuple(f) for f in entries] == [ENTRY_FIELDS[Kind(f["k"])] for f in entries]

    # Postgres, read back as the same records once the session has left Redis.
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1
    assert backend.pg is not None
    h = await cold.load_session(backend.pg, backend.schema, uid, sid)
    assert h is not None and tuple(h) == (*SESSION_FIELDS, "v")
    [(seq, fields)] = await cold.load_messages(backend.pg, backend.schema, uid, sid, 1, 1)
    assert (seq, fields) == (1, message)
    [(_, cold_doc)] = await cold.load_memory_docs(backend.pg, backend.schema, uid, sid)
    assert orjson.loads(cold_doc) == orjson.loads(doc)


# What a unit is in each tier: its Postgres type (information_schema's data_type) and its JSON type.
_PG_TYPES = {
    Conv.text: {"text", "character varying"}, Conv.json: {"jsonb"}, Conv.int: {"integer", "bigint"},
    Conv.money: {"numeric"}, Conv.time: {"timestamp with time zone"}, Conv.iso: {"timestamp with time zone"},
}  # fmt: skip
_JSON_TYPES: dict[Conv, tuple[type, ...]] = {
    Conv.text: (str,), Conv.json: (dict,), Conv.int: (int,), Conv.money: (float,), Conv.time: (str,),
    Conv.iso: (str,),
}  # fmt: skip


async def test_the_postgres_schema_has_every_column_of_the_table_in_its_unit(
    pg: asyncpg.Connection, db_schema: str
) -> None:
    rows = await pg.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = $1",
        db_schema,
    )
    columns = {(r["table_name"], r["column_name"]): r["data_type"] for r in rows}
    wrong = []
    for table, fields in (("sessions", SESSION_ROW), ("session_messages", (*ROW_KEY, *MESSAGE)),
                          ("session_memories", (*ROW_KEY, *MEMORY))):  # fmt: skip
        for f in fields:
            pg_type = columns.get((table, f.column))
            if pg_type not in _PG_TYPES[f.conv]:
                wrong.append(f"{table}.{f.column}: {pg_type}, the table says {f.conv}")
    assert wrong == []
    # The statuses the schema accepts are the declared ones.
    check = await pg.fetchval(
        """SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c
           JOIN pg_namespace n ON n.oid = c.connamespace
           WHERE n.nspname = $1 AND c.conrelid = ($1 || '.sessions')::regclass AND c.contype = 'c'
             AND pg_get_constraintdef(c.oid) LIKE '%status%'""",
        db_schema,
    )
    assert set(re.findall(r"'(\w+)'", check)) == {s.value for s in SessionStatus}


def _model_types(model: type[BaseModel]) -> dict[str, Any]:
    return typing.get_type_hints(model)


def _check_model(model: type[BaseModel], fields: tuple[Field, ...], extra: set[str]) -> list[str]:
    """The model's fields are the table's JSON names plus ``extra``, each of its unit's JSON type."""
    hints = _model_types(model)
    wrong = []
    if set(hints) != {f.json for f in fields if f.json} | extra:
        wrong.append(f"{model.__name__}: {sorted(hints)}")
    for f in fields:
        if f.json is None:
            continue
        hint = hints.get(f.json)
        origin = typing.get_origin(hint) or hint
        enum = f.conv is Conv.text and isinstance(origin, type) and issubclass(origin, StrEnum)
        ok = enum or (isinstance(origin, type) and issubclass(origin, _JSON_TYPES[f.conv]))
        if not ok:
            wrong.append(f"{model.__name__}.{f.json}: {hint}, the table says {f.conv}")
    return wrong


def test_the_response_models_and_json_shapes_follow_the_table() -> None:
    h = new_session_record("s", "u", "t", '{"a":1}', "{}", "sum", 1_700_000_000_000_000)
    listed = tuple(f for f in SESSION if f.name in LIST_FIELDS or f.name == "session_id")
    summary = tuple(f for f in SESSION if f.json in models.SessionSummaryOut.model_fields)
    wrong = [
        *_check_model(models.SessionOut, SESSION, set(SESSION_DERIVED)),
        *_check_model(models.SessionListItem, listed, {"is_active"}),
        *_check_model(models.SessionSummaryOut, summary, set(SESSION_DERIVED) | set(SUMMARY_DERIVED)),
        *_check_model(models.MessageOut, MESSAGE, set(MESSAGE_CONTEXT)),
        *_check_model(models.MemoryOut, MEMORY, set(MEMORY_CONTEXT)),
    ]
    assert wrong == []
    # The shapes built from stored records answer exactly what the models document.
    message = {"id": "m", "role": "user", "content": "c", "type": "chat", "tokens": "3", "cost": "1500",
               "meta": "{}", "ts": "1700000000000001"}  # fmt: skip
    doc = orjson.dumps({"memory_id": "y", "memory_type": "entity", "content": "c", "metadata": {},
                        "created_at": "2023-11-14T22:13:20.000000Z"}).decode()  # fmt: skip
    for shaped, model in (
        (shapes.session_out(h), models.SessionOut),
        (shapes.list_item_out("s", {n: h[n] for n in LIST_FIELDS}), models.SessionListItem),
        (shapes.summary_out(h), models.SessionSummaryOut),
        (shapes.message_out("s", "u", 1, message), models.MessageOut),
        (shapes.memory_out("s", "u", doc), models.MemoryOut),
    ):
        assert list(orjson.loads(orjson.dumps(shaped))) == list(model.model_fields), model.__name__
        model.model_validate(orjson.loads(orjson.dumps(shaped)))
    assert set(message) == set(MESSAGE_FIELDS) and tuple(orjson.loads(doc)) == MEMORY_DOC_FIELDS


def test_scripts_spell_replies_and_statuses_by_their_generated_names() -> None:
    """No script body quotes a reply or a status: each uses the names bound from ``Reply`` and
    ``SessionStatus``, so the Lua and the decoder cannot drift apart."""
    words = {r.value for r in Reply} | {s.value for s in SessionStatus}
    quoted = []
    scripts = Scripts(Redis())  # registering needs no connection
    for script in (v for v in vars(scripts).values()):
        for s in script.values() if isinstance(script, dict) else [script]:
            if not hasattr(s, "lua"):
                continue
            body = s.lua.body
            quoted += [f"{s.name}: '{w}'" for w in sorted(words) if f"'{w}'" in body]
    assert quoted == []


def test_timestamps_and_messages_read_from_stored_strings_equal_the_general_path() -> None:
    """The page's fast paths (a stored timestamp cut as a string, a stream entry unpacked in field order)
    answer exactly what the general conversions do, and an entry in another field order is read by name."""
    for us in (1_000_001, 1_796_414_092_000_000, 1_796_414_092_424_413, 32_503_680_000_999_999):
        assert shapes.iso(str(us)) == shapes.iso(us)
    assert shapes.iso("999999") == shapes.iso(999_999) == "1970-01-01T00:00:00.999999Z"
    stored = {"id": "m1", "role": "user", "content": "hi", "type": "chat", "tokens": "3", "cost": "7",
              "meta": '{"a":1}', "ts": "1796414092424413"}  # fmt: skip
    general = shapes.message_out("s", "u", 4, stored)
    in_order = [x for f in MESSAGE_FIELDS for x in (f, stored[f])]
    shuffled = [x for f in reversed(MESSAGE_FIELDS) for x in (f, stored[f])]
    for kv in (in_order, shuffled):
        assert orjson.dumps(shapes.message_of_entry("s", "u", 4, kv)) == orjson.dumps(general)
