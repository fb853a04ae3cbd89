"""Alembic environment: runs the migrations over asyncpg, into the schema named by ``DB_SCHEMA``.

Invoked by ``python -m session_svc.migrate`` (which sets ``sqlalchemy.url`` and the ``schema``
attribute). A session-level advisory lock makes concurrent runs (two deploys, parallel tests) queue
instead of racing; the version table lives in the same schema, so each schema migrates independently.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config
schema: str = config.attributes["schema"]


def _run(connection: Connection) -> None:
    connection.execute(text("SELECT pg_advisory_lock(hashtext(:s))"), {"s": "session_svc:" + schema})
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    connection.commit()
    context.configure(connection=connection, version_table_schema=schema, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations(schema=schema)
    connection.execute(text("SELECT pg_advisory_unlock(hashtext(:s))"), {"s": "session_svc:" + schema})
    connection.commit()


async def _main() -> None:
    engine = create_async_engine(config.get_main_option("sqlalchemy.url") or "")
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


asyncio.run(_main())
