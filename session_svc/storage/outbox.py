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

from session_svc.record.keys import Keys
from session_svc.storage.redis_client import AnyRedis

GROUP = "flush"


@dataclass(frozen=True, slots=True)
class Backlog:
    entries: int  # written but not yet committed to Postgres (pending + never delivered)
    oldest_age_s: float  # age of the oldest of those, 0 when there is none
    dead_letters: int


def _ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


async def backlog(redis: AnyRedis, keys: Keys) -> Backlog:
    """From stream metadata only, in two pipelined round trips whatever the bucket count: first each
    bucket's group info and dead-letter count, then its oldest pending and oldest undelivered entry.
    On Redis Cluster each round trip is one pipeline per master, sent to all at once (redis-py's
    cluster pipeline groups the commands by node); every command names one bucket's key."""
    async with redis.pipeline(transaction=False) as pipe:
        for bucket in range(keys.buckets):
            pipe.xlen(keys.dead(bucket))
            pipe.xinfo_groups(keys.outbox(bucket))
        first = await pipe.execute(raise_on_error=False)
    dead = sum(int(n) for n in first[0::2] if not isinstance(n, Exception))
    entries = 0
    # What each reply of the second round trip means: a count to add, or entries whose oldest id counts
    # (with the group's lag, to count only if there is an undelivered entry at all).
    meaning: list[tuple[str, int]] = []
    async with redis.pipeline(transaction=False) as pipe:
        for bucket, groups in enumerate(first[1::2]):
            stream = keys.outbox(bucket)
            if isinstance(groups, Exception):  # no such stream yet: nothing written there
                continue
            group = next((g for g in groups if g["name"] == GROUP), None)
            if group is None:  # no worker has run yet: everything is undelivered
                pipe.xlen(stream)
                pipe.xrange(stream, count=1)
                meaning += [("count", 0), ("first", 0)]
                continue
            after = "(" + group["last-delivered-id"]
            entries += int(group["pending"])
            if group.get("lag") is None:  # Redis 6.2, or a stream with deletions: count the tail
                pipe.xrange(stream, min=after, count=100_000)
                meaning.append(("tail", 0))
            else:
                # Trusted only when something is undelivered: after an XDEL, Redis 7.0 can report a lag
                # of 1 with nothing left to read.
                pipe.xrange(stream, min=after, count=1)
                meaning.append(("oldest", int(group["lag"])))
            if int(group["pending"]):
                pipe.xpending(stream, GROUP)
                meaning.append(("pending", 0))
        second = await pipe.execute()
    ids: list[str] = []
    for (kind, lag), reply in zip(meaning, second, strict=True):
        if kind == "count":
            entries += int(reply)
        elif kind == "pending":
            ids += [reply["min"]] if reply["min"] else []  # may have been acknowledged meanwhile
        else:
            if reply and kind != "first":
                entries += len(reply) if kind == "tail" else max(lag, 1)
            ids += [entry_id for entry_id, _ in reply[:1]]
    oldest_ms = min((_ms(i) for i in ids), default=None)
    age = max(0.0, time.time() - oldest_ms / 1000) if oldest_ms is not None else 0.0
    return Backlog(entries, age, dead)
