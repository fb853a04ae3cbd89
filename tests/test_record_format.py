"""``record.py`` names the storage format; everything that writes or reads it must agree with it: the
Lua scripts (Redis hash, message stream, outbox entries), the memory documents, and the cold reads
that rebuild the same records from Postgres."""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from session_svc.record.fields import (
    BOOKKEEPING,
    ENTRY_FIELDS,
    MEMORY_DOC_FIELDS,
    MESSAGE_FIELDS,
    SESSION_FIELDS,
    Kind,
)
from session_svc.storage import cold
from session_svc.storage.resources import Backend
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
