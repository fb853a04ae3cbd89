"""The OpenAI Agents SDK's session stores under the chat-turn benchmark, run by ``bench/chat_turn.py``.

Runs in its own virtualenv (``var/venv-bench``, made by ``scripts/bench.sh`` from
``bench/agents-requirements.txt``), not in ``.venv``: ``openai-agents[redis]`` requires ``redis>=7``,
while the service pins redis-py 5.2.1 (arq pins ``redis<6``), so installing it beside the service
would replace the service's own Redis client. session_svc is not importable here; nor is anything of
``bench/`` but ``bench/turns.py``.

A line protocol on stdin/stdout, so that ``bench/chat_turn.py`` can interleave these rows with its own
round by round without paying the SDK's import once per cell: this process prints one JSON line
(``{"ready": ...}`` with the versions, or ``{"error": ...}``), then answers each request line
``{"row": ..., "conc": N, "duration": s, "warmup": s}`` with one JSON line of figures. At end of input
it drops what it created: the keys under its prefix and its PostgreSQL schema.

Rows: ``redis_session`` (``agents.extensions.memory.redis_session.RedisSession``, one shared
``redis.asyncio.Redis`` client for every conversation, keys under ``{prefix}:agents``),
``sqlalchemy_session`` (``agents.extensions.memory.sqlalchemy_session.SQLAlchemySession`` on one
``postgresql+asyncpg://`` engine, SQLAlchemy's default pool of 5 + 10 overflow, its tables in a
schema of this run's own via ``search_path``), and ``bare_redis`` (the ceiling of ``bench/turns.py``
with this venv's redis-py). Each turn: ``add_items([user])``, ``get_items(limit=50)``,
``add_items([reply])``.

Usage: ``python -m bench.chat_agents REDIS_URL DATABASE_URL PREFIX SCHEMA``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

from bench.turns import CONTEXT, SEED, Turn, assistant_item, bare_redis_turns, measure, user_item


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(redis_url: str, database_url: str, prefix: str, schema: str) -> None:
    try:
        import redis.asyncio as aioredis
        from agents.extensions.memory.redis_session import RedisSession
        from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine
    except ImportError as exc:
        _say({"error": f"the Agents SDK cannot be imported: {exc}"})
        return

    url = database_url.replace("postgresql://", "postgresql+asyncpg://", 1).replace(
        "postgres://", "postgresql+asyncpg://", 1
    )
    admin = create_async_engine(url)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        pg = {
            name: (await conn.execute(text(f"SHOW {name}"))).scalar()
            for name in ("synchronous_commit", "fsync", "server_version")
        }
    engine = create_async_engine(url, connect_args={"server_settings": {"search_path": schema}})
    r = aioredis.Redis.from_url(redis_url)
    agents_prefix = f"{prefix}:agents"
    cells = 0

    async def ensure_tables() -> None:
        s = SQLAlchemySession(f"{prefix}-init", engine=engine, create_tables=True)
        await s.get_items(limit=1)

    async def seeded(session: Any) -> Any:
        await session.add_items([user_item(j) if j % 2 == 0 else assistant_item(j) for j in range(SEED)])
        return session

    def make(session: Any) -> Turn:
        async def turn(i: int) -> None:
            await session.add_items([user_item(i)])
            context = await session.get_items(limit=CONTEXT)
            assert len(context) == CONTEXT or i < CONTEXT, len(context)
            await session.add_items([assistant_item(i)])

        return turn

    async def cell(row: str, conc: int) -> tuple[list[Turn], Callable[[], Awaitable[None]]]:
        nonlocal cells
        cells += 1
        ids = [f"{prefix}-{cells}-{k}" for k in range(conc)]
        if row == "bare_redis":
            return await bare_redis_turns(redis_url, prefix, conc)
        if row == "redis_session":
            sessions = [RedisSession(sid, redis_client=r, key_prefix=agents_prefix) for sid in ids]

            async def drop_redis() -> None:
                for s in sessions:
                    await s.clear_session()

            return [make(await seeded(s)) for s in sessions], drop_redis
        if row == "sqlalchemy_session":
            sessions = [SQLAlchemySession(sid, engine=engine) for sid in ids]

            async def drop_sql() -> None:
                async with engine.begin() as conn:
                    await conn.execute(text("TRUNCATE agent_messages, agent_sessions"))

            return [make(await seeded(s)) for s in sessions], drop_sql
        raise ValueError(row)

    try:
        await ensure_tables()
        _say(
            {
                "ready": True,
                "versions": {p: version(p) for p in ("openai-agents", "redis", "sqlalchemy", "asyncpg")},
                "postgres": pg,
            }
        )
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            req = json.loads(line)
            turns, drop = await cell(req["row"], int(req["conc"]))
            try:
                result = await measure(turns, float(req["duration"]), float(req["warmup"]))
            finally:
                await drop()
            _say(result)
    finally:
        with contextlib.suppress(Exception):
            batch = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
            for i in range(0, len(batch), 1000):
                await r.unlink(*batch[i : i + 1000])
        await r.aclose()
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()


if __name__ == "__main__":
    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(main(*sys.argv[1:5]))
