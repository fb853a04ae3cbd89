"""Every primary and unique key (and every foreign key) starts with ``user_id``, the distribution column.

A distributed PostgreSQL (Citus) can only enforce a primary key, a unique constraint or a foreign key
on a distributed table when it includes the distribution column, because each is checked inside one
shard. The column is ``user_id`` (``docs/decisions.md``, "Postgres at scale"): every request names its
user, and a user's sessions, messages and memories then live on one shard. The keys become:

- ``sessions``: PRIMARY KEY (user_id, session_id); the listing's index gains ``session_id`` (its keyset
  order is (last_activity, session_id));
- ``session_messages``: PRIMARY KEY (user_id, session_id, seq), UNIQUE (user_id, message_id), FOREIGN
  KEY (user_id, session_id);
- ``session_memories``: PRIMARY KEY (user_id, session_id, seq), UNIQUE (user_id, memory_id), FOREIGN
  KEY (user_id, session_id).

Beside them, an index for the worker's trim of the user indexes in Redis (sessions that are not active,
by last write: ``workers/expiry.trim_user_indexes``).

Every table already carries ``user_id`` (NOT NULL), so nothing is backfilled. Each new key is a superset
of the old one, so existing data cannot violate it. On a database that already holds data the locks stay
short: the new unique indexes are built CONCURRENTLY first (outside the transaction; writes go on; a
leftover of an interrupted build is dropped and built again), then one short transaction swaps the
constraints onto them (``... USING INDEX``, no rebuild) and adds the foreign keys NOT VALID, and the
foreign keys are validated last (SHARE UPDATE EXCLUSIVE: writes go on). The worker pauses only for the
swap, and meanwhile the API keeps serving from Redis. A new install (empty tables) builds everything in
alembic's transaction instead. Applying it twice is a no-op (alembic's version).

Revision ID: 0002
Revises: 0001
"""

import contextlib

from alembic import op
from sqlalchemy import text

revision = "0002"
down_revision = "0001"

# (table, index, columns, unique, predicate): built CONCURRENTLY first; the unique ones then become the
# constraints, the others replace older indexes.
_INDEXES = (
    ("sessions", "sessions_pk_user", "user_id, session_id", True, ""),
    ("session_messages", "session_messages_pk_user", "user_id, session_id, seq", True, ""),
    ("session_messages", "session_messages_id_user", "user_id, message_id", True, ""),
    ("session_memories", "session_memories_pk_user", "user_id, session_id, seq", True, ""),
    ("session_memories", "session_memories_id_user", "user_id, memory_id", True, ""),
    # The user listing in its keyset order, all sessions and active ones.
    ("sessions", "sessions_user_keyset", "user_id, last_activity DESC, session_id DESC", False, ""),
    (
        "sessions", "sessions_user_keyset_active", "user_id, last_activity DESC, session_id DESC", False,
        "WHERE is_active",
    ),
    # The trim of the user indexes in Redis: sessions that are not active, by their last write.
    ("sessions", "sessions_trim", "updated_at, session_id", False, "WHERE status <> 'active'"),
    # A session's memories of one type (cold reads).
    ("session_memories", "session_memories_user_type", "user_id, session_id, memory_type, seq", False, ""),
)  # fmt: skip
# Replaced: by the keyset indexes, by the primary keys' prefix (user_id), by the typed index with user_id.
_OLD_INDEXES = (
    "sessions_user_activity", "sessions_user_active", "session_messages_user", "session_memories_user",
    "session_memories_type",
)  # fmt: skip
_CHILDREN = (("session_messages", "message_id"), ("session_memories", "memory_id"))


def upgrade(schema: str) -> None:
    s = f'"{schema}"'
    # CONCURRENTLY and the separate validation are for tables that hold data; they wait for every older
    # transaction of the database to end. A new install (empty tables, created in this same run) builds
    # everything in alembic's transaction instead, at once.
    holds_data = bool(op.get_bind().execute(text(f"SELECT EXISTS (SELECT 1 FROM {s}.sessions)")).scalar())
    outside = op.get_context().autocommit_block if holds_data else contextlib.nullcontext
    concurrently = "CONCURRENTLY " if holds_data else ""
    with outside():
        for table, index, columns, unique, where in _INDEXES:
            op.execute(f"DROP INDEX {concurrently}IF EXISTS {s}.{index}")  # an interrupted build's leftover
            kind = "UNIQUE INDEX" if unique else "INDEX"
            op.execute(f"CREATE {kind} {concurrently}{index} ON {s}.{table} ({columns}) {where}")
    # The swap: one short transaction (alembic's) that builds nothing. Written to run again after a
    # failed validation below (IF EXISTS), so the migration can simply be re-run.
    for table, _ in _CHILDREN:
        op.execute(f"""ALTER TABLE {s}.{table} DROP CONSTRAINT IF EXISTS {table}_session_id_fkey,
            DROP CONSTRAINT IF EXISTS {table}_session_fkey""")
    op.execute(f"""ALTER TABLE {s}.sessions DROP CONSTRAINT sessions_pkey,
        ADD CONSTRAINT sessions_pkey PRIMARY KEY USING INDEX sessions_pk_user""")
    for table, id_column in _CHILDREN:
        op.execute(f"""ALTER TABLE {s}.{table}
            DROP CONSTRAINT {table}_pkey, DROP CONSTRAINT {table}_{id_column}_key,
            ADD CONSTRAINT {table}_pkey PRIMARY KEY USING INDEX {table}_pk_user,
            ADD CONSTRAINT {table}_{id_column}_key UNIQUE USING INDEX {table}_id_user,
            ADD CONSTRAINT {table}_session_fkey FOREIGN KEY (user_id, session_id)
                REFERENCES {s}.sessions (user_id, session_id) NOT VALID""")
    for index in _OLD_INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {s}.{index}")
    # Checks the rows already there without blocking writes; a message or memory whose user_id is not
    # its session's fails here, with the foreign key in place (NOT VALID) for every new row.
    with outside():
        for table, _ in _CHILDREN:
            op.execute(f"ALTER TABLE {s}.{table} VALIDATE CONSTRAINT {table}_session_fkey")
