"""Idle expiry (sessions leave Redis once they are safe in Postgres) and the guide's housekeeping.

Both are plain functions over a ``Backend``, safe to run twice or concurrently (arq cron jobs can).
"""

from __future__ import annotations

import logging

from session_svc import lua, store
from session_svc.store import Backend

log = logging.getLogger("workers.expiry")

_DAY_US = 86_400 * 1_000_000


async def sweep(b: Backend, hot_ttl_s: int, page: int = 500) -> int:
    """Evict sessions untouched for ``hot_ttl_s`` whose every write is in Postgres. Returns how many.

    Candidates come from each bucket's ``hot`` set (no SCAN). The eviction itself is one script per
    page, which re-checks idleness and ``v == fv`` atomically, so a write racing the sweep wins.
    """
    evict = b.redis.register_script(lua.EVICT)
    cutoff = store.now_us() - hot_ttl_s * 1_000_000
    total = 0
    for bucket in range(b.keys.buckets):
        hot = b.keys.hot(bucket)
        kept = 0  # candidates left in place (not yet flushed): skip past them
        while True:
            sids = await b.redis.zrangebyscore(hot, "-inf", cutoff, start=kept, num=page)
            if not sids:
                break
            evicted = int(await evict(keys=[hot], args=[b.keys.tag(bucket) + ":", cutoff, *sids]))
            total += evicted
            kept += len(sids) - evicted
    if total:
        log.info("evicted %d idle sessions from Redis", total)
    return total


async def housekeeping(b: Backend, end_idle_after_days: int, archive_completed_after_days: int) -> int:
    """End active sessions idle for N days; archive completed ones after M days (0 = off).

    Candidates come from Postgres (the only place that holds every session, hot and cold); each change
    goes through the same script as a user's PUT, guarded by "still idle", so it reaches the outbox
    like any other write and never overrides fresh activity.
    """
    if b.pg is None:
        return 0
    changed = 0
    for from_status, to_status, days in (
        ("active", "ended", end_idle_after_days),
        ("completed", "archived", archive_completed_after_days),
    ):
        if days <= 0:
            continue
        cutoff_us = store.now_us() - days * _DAY_US
        rows = await b.pg.fetch(
            f"""SELECT session_id, user_id FROM "{b.schema}".sessions
                WHERE status = $1 AND last_activity < 'epoch'::timestamptz + $2 * interval '1 microsecond'
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
