"""The schema is ready for a distributed Postgres (Citus): every key starts with ``user_id``.

Checked mechanically from pg_catalog (so a table added later without the distribution column in its
keys fails here), and end to end on a database migrated from the first revision while it held data:
the rows survive, the API reads them, and the worker's upserts (``ON CONFLICT`` on the new keys) stay
idempotent when a batch is written twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from alembic import command
from redis.asyncio import Redis

from session_svc import migrate
from session_svc.http.appkeys import BACKEND
from session_svc.settings import Settings
from tests import outbox_drain, pg_rows
from tests.conftest import ServerUrls
from tests.helpers import add_memory, add_message, error_json, get_session, list_messages, new_user
from tests.support import drop_schema, new_name
from workers.rows import Entry

DISTRIBUTION_COLUMN = "user_id"


async def _key_violations(conn: asyncpg.Connection, schema: str) -> list[str]:
    """Every table of ``schema`` (but alembic's own) must have a primary key, and every primary key,
    unique constraint or index, exclusion constraint and foreign key (both sides) must include the
    distribution column: what Citus requires to enforce them inside one shard."""
    problems: list[str] = []
    tables = await conn.fetch(
        """SELECT c.oid, c.relname FROM pg_class c
           WHERE c.relnamespace = $1::regnamespace AND c.relkind IN ('r', 'p')
             AND c.relname <> 'alembic_version'""",
        schema,
    )
    assert tables, "no tables found"
    for t in tables:
        dist = await conn.fetchval(
            "SELECT attnum FROM pg_attribute WHERE attrelid = $1 AND attname = $2 AND NOT attisdropped",
            t["oid"],
            DISTRIBUTION_COLUMN,
        )
        if dist is None:
            problems.append(f"{t['relname']}: no {DISTRIBUTION_COLUMN} column")
            continue
        constraints = await conn.fetch(
            """SELECT conname, contype::text, conkey, confrelid, confkey FROM pg_constraint
               WHERE conrelid = $1 AND contype IN ('p', 'u', 'x', 'f')""",
            t["oid"],
        )
        if not any(c["contype"] == "p" for c in constraints):
            problems.append(f"{t['relname']}: no primary key")
        for c in constraints:
            if dist not in c["conkey"]:
                problems.append(f"{t['relname']}.{c['conname']}: {DISTRIBUTION_COLUMN} not in the key")
            if c["contype"] == "f":
                ref = await conn.fetchval(
                    "SELECT attnum FROM pg_attribute WHERE attrelid = $1 AND attname = $2",
                    c["confrelid"],
                    DISTRIBUTION_COLUMN,
                )
                if ref is None or ref not in c["confkey"]:
                    problems.append(f"{t['relname']}.{c['conname']}: references no {DISTRIBUTION_COLUMN}")
        unique_indexes = await conn.fetch(
            """SELECT indexrelid::regclass::text AS name, indkey::int2[] AS cols FROM pg_index
               WHERE indrelid = $1 AND indisunique""",
            t["oid"],
        )
        for ix in unique_indexes:
            if dist not in ix["cols"]:
                problems.append(f"{t['relname']}: unique index {ix['name']} lacks {DISTRIBUTION_COLUMN}")
    return problems


async def test_every_key_of_every_table_includes_the_distribution_column(pg: Any, db_schema: str) -> None:
    assert await _key_violations(pg, db_schema) == []


async def test_the_check_itself_catches_a_table_that_breaks_the_rule(pg: Any) -> None:
    """The rule's check is not vacuous: a table keyed by session id alone is reported."""
    schema = new_name("wt_rule_")
    await pg.execute(f'CREATE SCHEMA "{schema}"')
    try:
        await pg.execute(
            f'CREATE TABLE "{schema}".t (session_id text PRIMARY KEY, user_id text, k text UNIQUE)'
        )
        assert sorted(await _key_violations(pg, schema)) == [
            "t.t_k_key: user_id not in the key",
            "t.t_pkey: user_id not in the key",
            f"t: unique index {schema}.t_k_key lacks user_id",
            f"t: unique index {schema}.t_pkey lacks user_id",
        ]
    finally:
        await pg.execute(f'DROP SCHEMA "{schema}" CASCADE')


# A database that held data before the keys changed ------------------------------------------------------


@dataclass(frozen=True)
class Legacy:
    schema: str
    user: str
    sid: str
    sessions: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    memories: list[dict[str, Any]]


LEGACY_SID = "0b7c3a52-3f1e-4d59-9a43-5d0e4c1c2f01"


async def _fill_revision_1(database_url: str, schema: str, user: str) -> None:
    """Rows as the worker wrote them under revision 0001 (keys without user_id)."""
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        await conn.execute(
            """INSERT INTO sessions (session_id, user_id, title, status, message_count, memory_count,
                   total_tokens, total_cost, created_at, updated_at, last_activity, version)
               VALUES ($1, $2, 'from before', 'active', 2, 1, 7, 0.000300,
                   '2026-01-02T03:04:05.123456Z', '2026-01-02T03:04:06Z', '2026-01-02T03:04:06Z', 4)""",
            LEGACY_SID,
            user,
        )
        for seq, role in ((1, "user"), (2, "assistant")):
            await conn.execute(
                """INSERT INTO session_messages (message_id, session_id, seq, user_id, role, content,
                       tokens_used, cost_usd, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, 3, 0.000150, '2026-01-02T03:04:06Z')""",
                f"0b7c3a52-0000-4000-8000-00000000000{seq}",
                LEGACY_SID,
                seq,
                user,
                role,
                f"old {role}",
            )
        await conn.execute(
            """INSERT INTO session_memories (memory_id, session_id, seq, user_id, memory_type, content,
                   created_at)
               VALUES ('0b7c3a52-0000-4000-8000-0000000000aa', $1, 1, $2, 'entity', 'old memory',
                   '2026-01-02T03:04:06Z')""",
            LEGACY_SID,
            user,
        )
    finally:
        await conn.close()


async def _rows(database_url: str, schema: str) -> tuple[list[dict[str, Any]], ...]:
    conn = await asyncpg.connect(database_url)
    try:
        out = []
        for table in ("sessions", "session_messages", "session_memories"):
            rows = await conn.fetch(f'SELECT * FROM "{schema}".{table} ORDER BY 1, 2, 3')
            out.append([dict(r) for r in rows])
        return tuple(out)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def legacy(test_urls: ServerUrls) -> Iterator[Legacy]:
    """A schema at revision 0001 holding a session, its messages and a memory, then migrated to head.
    Synchronous: alembic runs its own event loop."""
    schema, user = new_name("wt_legacy_"), new_user()
    cfg = migrate.alembic_config(Settings(database_url=test_urls.database_url, db_schema=schema))
    try:
        command.upgrade(cfg, "0001")
        asyncio.run(_fill_revision_1(test_urls.database_url, schema, user))
        before = asyncio.run(_rows(test_urls.database_url, schema))
        command.upgrade(cfg, "head")
        yield Legacy(schema, user, LEGACY_SID, *before)
    finally:
        drop_schema(test_urls.database_url, schema)


async def test_the_migration_keeps_every_row_and_validates_the_new_keys(
    legacy: Legacy, test_urls: ServerUrls
) -> None:
    sessions, messages, memories = await _rows(test_urls.database_url, legacy.schema)
    assert (sessions, messages, memories) == (legacy.sessions, legacy.messages, legacy.memories)
    conn = await asyncpg.connect(test_urls.database_url)
    try:
        keys = await conn.fetch(
            """SELECT conname, pg_get_constraintdef(oid) AS def, convalidated FROM pg_constraint
               WHERE connamespace = $1::regnamespace AND contype IN ('p', 'u', 'f') ORDER BY conname""",
            legacy.schema,
        )
        assert await _key_violations(conn, legacy.schema) == []
        assert all(k["convalidated"] for k in keys), keys
        # A message whose user is not its session's user is refused by the new foreign key.
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                f"""INSERT INTO "{legacy.schema}".session_messages (message_id, session_id, seq, user_id,
                        role, content) VALUES ('x', $1, 9, 'someone-else', 'user', 'hi')""",
                legacy.sid,
            )
    finally:
        await conn.close()


async def test_a_migrated_database_serves_its_old_rows_and_flushes_idempotently(
    legacy: Legacy,
    make_client: Any,
    redis: Redis,
    pool: asyncpg.Pool,
    test_urls: ServerUrls,
) -> None:
    """The session written before the migration is read through the API (Redis never knew it), a write
    brings it back and continues its sequence, and a batch written twice leaves each row once."""
    client = await make_client(db_schema=legacy.schema)
    user, sid = legacy.user, legacy.sid
    got = await get_session(client, sid, user)
    assert (got["title"], got["message_count"], got["total_cost"]) == ("from before", 2, 0.0003)
    await error_json(await client.get(f"/api/v1/sessions/{sid}", params={"user_id": new_user()}), 404)

    third = await add_message(client, sid, user, content="after the migration", tokens_used=1)
    assert third["sequence"] == 3
    await add_memory(client, sid, user, memory_type="summary", content="new memory")

    flusher = outbox_drain.make_flusher(redis, pool, client.app[BACKEND].keys, legacy.schema)
    await flusher.ensure_groups()
    entries = await flusher.read()
    assert len(entries) == 2  # the message, the memory
    await flusher.flush(entries)
    await flusher.flush([Entry(e.bucket, e.id, dict(e.f)) for e in entries])  # a replay
    assert await outbox_drain.drain(flusher) == 0

    conn = await asyncpg.connect(test_urls.database_url)
    try:
        stored = await pg_rows.pg_messages(conn, legacy.schema, sid)
        assert [(m["sequence"], m["content"]) for m in stored] == [
            (1, "old user"),
            (2, "old assistant"),
            (3, "after the migration"),
        ]
        row = await conn.fetchrow(
            f'SELECT message_count, memory_count, total_tokens FROM "{legacy.schema}".sessions '
            "WHERE user_id = $1 AND session_id = $2",
            user,
            sid,
        )
        assert row is not None
        assert dict(row) == {"message_count": 3, "memory_count": 2, "total_tokens": 8}
        memories = await conn.fetchval(
            f'SELECT count(*) FROM "{legacy.schema}".session_memories WHERE user_id = $1', user
        )
        assert memories == 2
    finally:
        await conn.close()
    assert [m["sequence"] for m in (await list_messages(client, sid, user))["messages"]] == [1, 2, 3]
