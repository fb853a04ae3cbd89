"""The guide's three tables, with what the guide leaves out.

Added beyond the guide: ``title``; ``memory_count``; ``version`` (the Redis session version last
written, which orders upserts); message and memory ``seq`` (unique per session: the order of record
and the idempotency key of the write-through); exact money as NUMERIC with 6 decimals; timestamps with
time zone. ``is_active`` is derived from ``status`` so the two can never disagree.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None


def upgrade(schema: str) -> None:
    s = f'"{schema}"'
    op.execute(f"""
        CREATE TABLE {s}.sessions (
            session_id        VARCHAR(255) PRIMARY KEY,
            user_id           VARCHAR(255) NOT NULL,
            title             TEXT NOT NULL DEFAULT '',
            status            VARCHAR(50) NOT NULL DEFAULT 'active'
                              CHECK (status IN ('active', 'completed', 'archived', 'ended')),
            is_active         BOOLEAN GENERATED ALWAYS AS (status = 'active') STORED,
            conversation_data JSONB NOT NULL DEFAULT '{{}}',
            metadata          JSONB NOT NULL DEFAULT '{{}}',
            message_count     INTEGER NOT NULL DEFAULT 0,
            memory_count      INTEGER NOT NULL DEFAULT 0,
            total_tokens      BIGINT NOT NULL DEFAULT 0,
            total_cost        NUMERIC(20, 6) NOT NULL DEFAULT 0,
            session_summary   TEXT NOT NULL DEFAULT '',
            created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
            updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
            last_activity     TIMESTAMPTZ NOT NULL DEFAULT now(),
            expires_at        TIMESTAMPTZ,
            version           BIGINT NOT NULL
        )""")
    # The user listing (newest activity first), its active-only variant, and the housekeeping sweeps.
    op.execute(f"CREATE INDEX sessions_user_activity ON {s}.sessions (user_id, last_activity DESC)")
    op.execute(
        f"CREATE INDEX sessions_user_active ON {s}.sessions (user_id, last_activity DESC) WHERE is_active"
    )
    op.execute(f"CREATE INDEX sessions_status_activity ON {s}.sessions (status, last_activity)")
    op.execute(f"""
        CREATE TABLE {s}.session_messages (
            message_id   VARCHAR(255) NOT NULL UNIQUE,
            session_id   VARCHAR(255) NOT NULL REFERENCES {s}.sessions (session_id),
            seq          BIGINT NOT NULL,
            user_id      VARCHAR(255) NOT NULL,
            role         VARCHAR(50) NOT NULL,
            content      TEXT NOT NULL,
            message_type VARCHAR(50) NOT NULL DEFAULT 'chat',
            metadata     JSONB NOT NULL DEFAULT '{{}}',
            tokens_used  INTEGER NOT NULL DEFAULT 0,
            cost_usd     NUMERIC(18, 6) NOT NULL DEFAULT 0,
            created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (session_id, seq)
        )""")
    op.execute(f"CREATE INDEX session_messages_user ON {s}.session_messages (user_id)")
    op.execute(f"""
        CREATE TABLE {s}.session_memories (
            memory_id   VARCHAR(255) NOT NULL UNIQUE,
            session_id  VARCHAR(255) NOT NULL REFERENCES {s}.sessions (session_id),
            seq         INTEGER NOT NULL,
            user_id     VARCHAR(255) NOT NULL,
            memory_type VARCHAR(100) NOT NULL,
            content     TEXT NOT NULL,
            metadata    JSONB NOT NULL DEFAULT '{{}}',
            created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (session_id, seq)
        )""")
    op.execute(f"CREATE INDEX session_memories_type ON {s}.session_memories (session_id, memory_type, seq)")
    op.execute(f"CREATE INDEX session_memories_user ON {s}.session_memories (user_id)")
