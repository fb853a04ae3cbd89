"""The outbox: one Redis stream per bucket, written by the API's scripts, drained by the workers.

Entry fields (all strings): ``k`` kind (``s`` session changed, ``m`` message, ``y`` memory), ``sid``,
``uid``, ``v`` (the session version after the write), and for messages/memories their ``seq`` and
payload. Session entries carry no payload: the worker upserts the session's current hash, guarded by
its version, so replays and reordering are harmless.

The consumer group is created by the workers at id ``0``, so entries written before any worker ran are
drained too. Dead letters go to a per-bucket ``:dead`` stream (same slot).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from session_svc.keys import Keys

GROUP = "flush"


@dataclass(frozen=True, slots=True)
class Backlog:
    entries: int  # written but not yet committed to Postgres (pending + never delivered)
    oldest_age_s: float  # age of the oldest of those, 0 when there is none
    dead_letters: int


def _ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


async def backlog(redis: Redis, keys: Keys) -> Backlog:
    """Computed from stream metadata only (XINFO/XPENDING/one-entry XRANGE per bucket): cheap."""
    entries = 0
    oldest_ms: int | None = None
    dead = 0
    for bucket in range(keys.buckets):
        stream = keys.outbox(bucket)
        dead += await redis.xlen(keys.dead(bucket))
        try:
            groups = await redis.xinfo_groups(stream)
        except ResponseError:  # no such stream yet
            continue
        group = next((g for g in groups if g["name"] == GROUP), None)
        if group is None:
            entries += await redis.xlen(stream)
            first = await redis.xrange(stream, count=1)
            candidates = [_ms(first[0][0])] if first else []
        else:
            pending = int(group["pending"])
            first_new = await redis.xrange(stream, min="(" + group["last-delivered-id"], count=1)
            lag = group.get("lag")
            undelivered = int(lag) if lag is not None else await _count_after(redis, stream, group)
            entries += pending + undelivered
            candidates = [_ms(first_new[0][0])] if first_new else []
            if pending:
                summary = await redis.xpending(stream, GROUP)
                if summary["min"]:  # may have been acknowledged since XINFO
                    candidates.append(_ms(summary["min"]))
        for ms in candidates:
            oldest_ms = ms if oldest_ms is None else min(oldest_ms, ms)
    age = max(0.0, time.time() - oldest_ms / 1000) if oldest_ms is not None else 0.0
    return Backlog(entries, age, dead)


async def _count_after(redis: Redis, stream: str, group: dict[str, str]) -> int:
    # Redis 6.2 has no ``lag`` in XINFO GROUPS; count the undelivered tail instead.
    return len(await redis.xrange(stream, min="(" + group["last-delivered-id"], count=100_000))
