"""Draining the outbox in-process with the worker's own ``Flusher``, and reading its streams."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import redis as redis_sync
from redis.asyncio import Redis

from session_svc.record.keys import Keys
from session_svc.storage import outbox
from session_svc.storage.resources import Backend
from session_svc.storage.scripts import Scripts
from tests.support import new_name
from workers.flush import Flusher


def make_flusher(redis: Redis, pool: asyncpg.Pool, keys: Keys, schema: str, **kw: Any) -> Flusher:
    """A flusher that reclaims at once (``claim_idle_ms=0``): the test is its only consumer."""
    options: dict[str, Any] = {"batch_size": 500, "max_deliveries": 3, "claim_idle_ms": 0}
    options.update(kw)
    return Flusher(Backend(redis, keys, Scripts(redis), pool, schema), new_name("t-"), **options)


async def drain(flusher: Flusher, within: float = 15.0) -> int:
    """Read (or reclaim) and flush until the outbox backlog is 0. Returns how many entries it flushed."""
    await flusher.ensure_groups()
    flushed = 0
    deadline = time.monotonic() + within
    while True:
        entries = await flusher.read() or await flusher.reclaim()
        if entries:
            await flusher.flush(entries)
            flushed += len(entries)
        else:
            backlog = await outbox.backlog(flusher.redis, flusher.keys)
            if backlog.entries == 0:
                return flushed
            await asyncio.sleep(0.01)
        if time.monotonic() > deadline:
            raise AssertionError(f"outbox not drained after {within}s")


async def dead_letters(redis: Redis, keys: Keys) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for bucket in range(keys.buckets):
        out += [f for _id, f in await redis.xrange(keys.dead(bucket))]
    return out


async def pending_per_consumer(redis: Redis, keys: Keys) -> dict[str, int]:
    """Pending outbox entries per consumer, over every bucket."""
    out: dict[str, int] = {}
    for bucket in range(keys.buckets):
        try:
            consumers = await redis.xinfo_consumers(keys.outbox(bucket), outbox.GROUP)
        except redis_sync.ResponseError:
            continue
        for c in consumers:
            out[c["name"]] = out.get(c["name"], 0) + int(c["pending"])
    return out
