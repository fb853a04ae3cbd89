"""Idle expiry (sessions leave Redis once they are safe in Postgres) and the guide's housekeeping.

Both are plain functions over a ``Backend``, safe to run twice or concurrently (arq cron jobs can).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from redis.exceptions import OutOfMemoryError

from session_svc.domain import store
from session_svc.record.fields import SessionStatus, sql_timestamptz_to_us, sql_us_to_timestamptz
from session_svc.record.keys import bucket_of
from session_svc.record.shapes import now_us
from session_svc.storage import outbox, redis_client
from session_svc.storage.resources import Backend

log = logging.getLogger("workers.expiry")

_DAY_US = 86_400 * 1_000_000


async def sweep(b: Backend, hot_ttl_s: int, page: int = 500) -> int:
    """Evict sessions untouched for ``hot_ttl_s`` whose every write is in Postgres. Returns how many.

    Candidates come from each bucket's ``hot`` set (no SCAN). The eviction itself is one script per
    page, which re-checks idleness and ``v == fv`` atomically, so a write racing the sweep wins.
    """
    cutoff = now_us() - hot_ttl_s * 1_000_000
    total = 0
    for bucket in range(b.keys.buckets):
        hot = b.keys.hot(bucket)
        kept = 0  # candidates left in place (not yet flushed): skip past them
        while True:
            sids = await b.redis.zrangebyscore(hot, "-inf", cutoff, start=kept, num=page)
            if not sids:
                break
            evicted = int(await b.scripts.evict(b.keys, bucket, cutoff, sids))
            total += evicted
            kept += len(sids) - evicted
    if total:
        log.info("evicted %d idle sessions from Redis", total)
    return total


async def trim_user_indexes(b: Backend, retention_s: int, page: int = 1000, pages: int = 50) -> int:
    """Bound the user indexes: sessions that are not active, have left Redis and were last written more
    than ``retention_s`` ago leave their user's index (``scripts.TRIM_USER_INDEXES``). They stay listed,
    from Postgres (``store.list_user_sessions``), counted by the user's ``trimmed`` hash; a GET or a
    write finds them in Postgres. Returns how many were trimmed.

    Candidates come from Postgres (index ``sessions_trim``: not active, by last write), a window at a
    time: from where the previous run stopped (``P:trimmed_until``) to now less the retention, in pages
    in (updated_at, session_id) order, so that a run costs what was written in its window, never a
    scan, and Redis holds nothing for it. At most ``pages`` pages per run (the first run after an
    upgrade has every older session to go through): the mark advances after each page, and the next
    run goes on from there. A session written again later (its status changed: active sessions are
    never trimmed) falls into a later window. Safe to run twice or concurrently: a second trim of the
    same session finds it gone from the index and counts nothing.
    """
    if b.pg is None:
        return 0
    until = now_us() - retention_s * 1_000_000
    mark = await b.redis.get(b.keys.trimmed_until) or "0/"
    since, _, after_sid = mark.partition("/")
    after_us = int(since)
    if after_us >= until:
        return 0
    total, done = 0, False
    for _ in range(pages):
        rows = await b.pg.fetch(
            f"""SELECT session_id, user_id, {sql_timestamptz_to_us("updated_at")} AS up
                FROM "{b.schema}".sessions
                WHERE status <> '{SessionStatus.active}' AND updated_at < {sql_us_to_timestamptz("$1")}
                  AND (updated_at, session_id) > ({sql_us_to_timestamptz("$2")}, $3)
                ORDER BY updated_at, session_id LIMIT $4""",
            until,
            after_us,
            after_sid,
            page,
        )
        if not rows:
            done = True
            break
        per_bucket: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for r in rows:
            per_bucket[bucket_of(r["user_id"], b.keys.buckets)].append((r["session_id"], r["user_id"]))
        if b.cluster:  # no scripts in redis-py's cluster pipelines: one call per bucket, at once
            counts = await asyncio.gather(
                *(b.scripts.trim_user_indexes(b.keys, bucket, sessions, client=None)
                  for bucket, sessions in per_bucket.items())
            )  # fmt: skip
        else:
            async with b.redis.pipeline(transaction=False) as pipe:
                for bucket, sessions in per_bucket.items():
                    await b.scripts.trim_user_indexes(b.keys, bucket, sessions, client=pipe)
                counts = await pipe.execute()
        total += sum(int(n) for n in counts)
        after_us, after_sid = int(rows[-1]["up"]), rows[-1]["session_id"]
        if len(rows) < page:
            done = True
            break
        await b.redis.set(b.keys.trimmed_until, f"{after_us}/{after_sid}")
    if done:
        await b.redis.set(b.keys.trimmed_until, f"{until}/")
    if total:
        log.info("trimmed %d old sessions from their users' indexes", total)
    return total


async def relieve_memory(b: Backend, high_water: float, page: int = 200) -> int:
    """While Redis uses more than ``high_water`` of its maxmemory, evict flushed sessions whatever their
    idle time, least recently written first (across buckets), a page at a time. Returns how many.

    Sessions written in the last second are spared (a write that just rehydrated one must land first);
    unflushed and stuck ones are never evicted, by the same script as the idle sweep.
    """
    skip = [0] * b.keys.buckets  # per bucket: oldest candidates that were not evictable
    total = 0
    while True:
        mem = await redis_client.memory(b.redis)
        if not mem.limit or mem.ratio < high_water:
            break
        async with b.redis.pipeline(transaction=False) as pipe:
            for bucket in range(b.keys.buckets):
                pipe.zrange(b.keys.hot(bucket), skip[bucket], skip[bucket] + page - 1, withscores=True)
            pages: list[list[tuple[str, float]]] = await pipe.execute()
        cutoff = now_us() - SPARE_RECENT_US
        oldest = sorted(
            (score, bucket, sid) for bucket, rows in enumerate(pages) for sid, score in rows if score < cutoff
        )[:page]
        if not oldest:
            break
        chosen: dict[int, list[str]] = defaultdict(list)
        for _score, bucket, sid in oldest:
            chosen[bucket].append(sid)
        evicted = 0
        for bucket, sids in chosen.items():
            n = int(await b.scripts.evict(b.keys, bucket, cutoff, sids))
            skip[bucket] += len(sids) - n
            evicted += n
        total += evicted
    if total:
        log.warning(
            "Redis memory above %.0f%% of maxmemory: evicted %d flushed sessions", high_water * 100, total
        )
    return total


# Memory relief spares sessions written this recently (microseconds): a write that just rehydrated one
# must land before it can leave again.
SPARE_RECENT_US = 1_000_000

# Reconciliation writes a lost session back to the outbox in chunks of at most this many entries (each
# points at its content, about 64 bytes), checking Redis memory between chunks.
RESYNC_ENTRIES = 100


async def reconcile(b: Backend, stale_after_s: int = 300, high_water: float = 1.0) -> int:
    """Re-send the writes of sessions that are unflushed although the outbox holds nothing that old.

    Normally every write's outbox entry is flushed within a second, and ``fv`` catches up with ``v``.
    A session last written before the oldest entry still in the outbox (and more than ``stale_after_s``
    ago, a margin for clock skew between API hosts and Redis) that still has ``v > fv`` has lost
    entries: it would never be flushed, nor ever leave Redis. Its data is written to the outbox again
    (idempotent), in bounded chunks. The run stops (to be resumed by the next one) as soon as Redis
    memory is above ``high_water`` of maxmemory or Redis refuses a chunk for lack of memory: re-sending
    must never be what fills Redis. Returns how many sessions were re-sent completely.
    """
    pending = await outbox.backlog(b.redis, b.keys)
    cutoff = now_us() - int(max(stale_after_s, pending.oldest_age_s) * 1_000_000)
    resent = 0
    try:
        for bucket in range(b.keys.buckets):
            for sid in await b.redis.zrangebyscore(b.keys.hot(bucket), "-inf", cutoff):
                phase, cursor, written = "m", 0, 0
                while phase != "done":
                    if (await redis_client.memory(b.redis)).ratio >= high_water:
                        log.warning("reconciliation paused: Redis memory above the high-water mark")
                        return resent
                    phase, cursor, n = await b.scripts.resync(
                        b.keys, bucket, sid, phase, cursor, RESYNC_ENTRIES
                    )
                    cursor, written = int(cursor), written + int(n)
                if written:
                    resent += 1
    except OutOfMemoryError:
        log.warning("reconciliation stopped: Redis is out of memory")
    finally:
        if resent:
            log.warning("reconciliation re-sent %d sessions whose outbox entries were lost", resent)
    return resent


async def housekeeping(
    b: Backend, end_idle_after_days: int, archive_completed_after_days: int, high_water: float = 1.0
) -> int:
    """End active sessions idle for N days; archive completed ones after M days (0 = off).

    Candidates come from Postgres (the only place that holds every session, hot and cold); each change
    goes through the same script as a user's PUT, guarded by "still idle", so it reaches the outbox
    like any other write and never overrides fresh activity.
    """
    if b.pg is None or (end_idle_after_days <= 0 and archive_completed_after_days <= 0):
        return 0
    if (await redis_client.memory(b.redis)).ratio >= high_water:
        log.warning("housekeeping skipped: Redis memory above the high-water mark")
        return 0
    changed = 0
    for from_status, to_status, days in (
        ("active", "ended", end_idle_after_days),
        ("completed", "archived", archive_completed_after_days),
    ):
        if days <= 0:
            continue
        cutoff_us = now_us() - days * _DAY_US
        rows = await b.pg.fetch(
            f"""SELECT session_id, user_id FROM "{b.schema}".sessions
                WHERE status = $1 AND last_activity < {sql_us_to_timestamptz("$2")}
                ORDER BY last_activity LIMIT 1000""",
            from_status,
            cutoff_us,
        )
        for r in rows:
            if await store.set_status_if_idle(b, r["session_id"], r["user_id"], to_status, cutoff_us):
                changed += 1
    if changed:
        log.info("housekeeping changed the status of %d sessions", changed)
    return changed
