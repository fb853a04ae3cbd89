"""Write-through: drain the outbox streams into PostgreSQL, in batches, idempotently.

The loop, per round: read new entries of every bucket (one pipelined round trip), take each touched
session's current hash and the messages and memories its entries point at (one more round trip),
upsert sessions, then insert messages and memories, all in one transaction; after COMMIT record the
flushed version on each session (``fv``) and XACK, in one atomic script that also runs on a full
Redis (retried until it lands, see ``_done``). While a batch commits, the next one is read and its
rows built (``run``'s read-ahead); batches still commit one at a time, in order. So:

- a worker killed before COMMIT leaves its entries pending; another worker (or itself, restarted with
  the same WORKER_NAME) reclaims them with XAUTOCLAIM and writes them again;
- a worker stopped (SIGTERM) finishes the batch in hand within SHUTDOWN_TIMEOUT; what it could not
  finish it releases (``release``): still pending, but taken over by the next XAUTOCLAIM of any worker
  instead of FLUSH_CLAIM_IDLE_MS later;
- killed between COMMIT and XACK, the replay finds the rows already there (messages and memories are
  keyed by (user, session, seq) and inserted with ON CONFLICT DO NOTHING on that key; sessions carry
  a version and an older version never overwrites a newer one);
- Postgres down: the batch is retried with backoff, entries stay pending, the outbox grows, the API
  keeps answering from Redis;
- an entry that fails on its own (poison) is retried on redelivery, and after FLUSH_MAX_DELIVERIES
  deliveries is moved to the bucket's dead-letter stream; its session is marked ``stuck`` so the
  expiry sweep keeps it in Redis until an operator has looked.
The outbox is trimmed only below the oldest entry not yet acknowledged (never by length).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from session_svc.errors import PG_UNAVAILABLE
from session_svc.record.fields import Kind
from session_svc.storage.outbox import GROUP
from workers.rows import (
    INSERT_MEMORIES,
    INSERT_MESSAGES,
    UPSERT_SESSIONS,
    Content,
    Entry,
    Table,
    content_of,
    memory_row,
    message_row,
    pointers,
    runs,
    session_row,
    table,
    well_formed,
)
from workers.streams import OutboxReader

log = logging.getLogger("workers.flush")

ROWS = Counter("session_flush_rows_total", "Rows written to PostgreSQL by the outbox drain", ["kind"])
BATCHES = Counter("session_flush_batches_total", "Outbox batches committed")
FAILURES = Counter("session_flush_failures_total", "Outbox batches that failed", ["reason"])
DEAD = Counter("session_flush_dead_letters_total", "Outbox entries moved to a dead-letter stream")
LAST_BATCH = Gauge("session_flush_last_batch_rows", "Entries in the last committed batch")
for _kind in ("session", "message", "memory"):
    ROWS.labels(_kind)  # exported as 0 from the start, so rate() sees the first increase
for _reason in ("unavailable", "data", "entry", "error"):
    FAILURES.labels(_reason)
FLUSH_SECONDS = Histogram(
    "session_flush_duration_seconds",
    "Time to write one batch to PostgreSQL and acknowledge it in Redis",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

# Seconds between maintenance rounds (trim, reclaim, forget idle consumers); backoff after a failed
# round, doubling from the first to the second.
MAINTENANCE_EVERY_S = 5.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 5.0
UNAVAILABLE: tuple[type[BaseException], ...] = (*PG_UNAVAILABLE, RedisConnectionError, RedisTimeoutError)


@dataclass(frozen=True, slots=True)
class Rows:
    """What one batch writes: its entry count, and the rows of each table."""

    entries: int
    sessions: Table
    messages: Table
    memories: Table


@dataclass(frozen=True, slots=True)
class Batch:
    """Entries read from the outbox (well-formed or not), and the rows the well-formed ones become; or,
    when a field does not parse, no rows and the error (the entries are then written one by one)."""

    entries: Sequence[Entry]
    good: list[Entry]
    malformed: list[Entry]
    rows: Rows | None
    error: Exception | None = None


@dataclass
class Flusher(OutboxReader):
    """The drain of one worker: what ``OutboxReader`` reads, written to Postgres in batches."""

    # Writing ---------------------------------------------------------------------------------------

    async def flush(self, entries: Sequence[Entry]) -> None:
        """Commit ``entries`` to Postgres, then mark and acknowledge them. Raises if Postgres is down."""
        if entries:
            await self._flush(await self._prepare(entries))

    async def _read_ahead(self) -> Batch:
        """The next batch, read and turned into rows while the one before it commits."""
        return await self._prepare(await self.read())

    async def _prepare(self, entries: Sequence[Entry]) -> Batch:
        """``entries`` and the rows they become. A data error (a field that does not parse) stays in the
        batch, for ``_flush`` to write its entries one by one; any other error is raised."""
        good: list[Entry] = []
        malformed: list[Entry] = []
        for e in entries:
            (good if well_formed(e) else malformed).append(e)
        try:
            return Batch(entries, good, malformed, await self._rows(good))
        except Exception as exc:
            if not _data_error(exc):
                raise
            return Batch(entries, good, malformed, None, exc)

    async def _flush(self, batch: Batch) -> None:
        with FLUSH_SECONDS.time():
            for e in batch.malformed:
                await self._dead_letter(e, "malformed entry")
            error = batch.error
            if batch.rows is not None:
                try:
                    await self._write(batch.rows)
                except Exception as exc:
                    if not _data_error(exc):
                        raise
                    error = exc
            if error is None:
                await self._done(batch.good)
                return
            # Some entry cannot be written. Write them one by one so the rest goes through.
            FAILURES.labels("data").inc()
            log.warning("batch of %d failed (%r); retrying entry by entry", len(batch.good), error)
            for e in batch.good:
                try:
                    await self._commit([e])
                except Exception as one_exc:
                    if not _data_error(one_exc):
                        raise
                    await self._failed(e, repr(one_exc))
                else:
                    await self._done([e])

    async def _commit(self, entries: Sequence[Entry]) -> None:
        await self._write(await self._rows(entries))

    async def _rows(self, entries: Sequence[Entry]) -> Rows:
        versions = _max_versions(entries)
        snapshots, content = await self._read_records(versions, entries)
        # In primary key order (user, session): workers upserting the same sessions lock their rows in
        # the same order, so one waits for the other instead of both failing on a deadlock.
        sessions = sorted(
            (session_row(h) for h in snapshots if h),
            key=lambda row: (str(row["user_id"]), str(row["session_id"])),
        )
        messages = [message_row(e, content_of(e, content)) for e in entries if e.f["k"] == Kind.message]
        memories = [memory_row(e, content_of(e, content)) for e in entries if e.f["k"] == Kind.memory]
        return Rows(len(entries), table(sessions), table(messages), table(memories))

    async def _write(self, rows: Rows) -> None:
        """One transaction: the session upserts, then the message and memory inserts."""
        s = f'"{self.schema}"'
        statements = (
            (UPSERT_SESSIONS, rows.sessions), (INSERT_MESSAGES, rows.messages),
            (INSERT_MEMORIES, rows.memories),
        )  # fmt: skip
        async with self.pg.acquire() as conn, conn.transaction():
            for sql, table in statements:
                if table.rows:
                    await conn.execute(sql.format(s=s), table.doc)
        ROWS.labels("session").inc(rows.sessions.rows)
        ROWS.labels("message").inc(rows.messages.rows)
        ROWS.labels("memory").inc(rows.memories.rows)
        BATCHES.inc()
        LAST_BATCH.set(rows.entries)
        self.last_commit = time.time()

    async def _read_records(
        self, versions: dict[tuple[int, str], int], entries: Sequence[Entry]
    ) -> tuple[list[dict[str, str]], Content]:
        """One pipelined round trip for the whole batch: each touched session's hash, and the content
        the batch's message and memory entries point at: per session, one XRANGE over the sequences its
        message entries name (they are nearly always consecutive) and one HMGET of its memories."""
        reads: list[tuple[int, str, str, list[int]]] = []  # (bucket, sid, kind, seqs) per command
        for (bucket, sid, kind), seqs in pointers(entries).items():
            if kind == Kind.message:
                reads += [(bucket, sid, kind, run) for run in runs(seqs)]
            else:
                reads.append((bucket, sid, kind, seqs))
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket, sid in versions:
                pipe.hgetall(self.keys.session(bucket, sid))
            for bucket, sid, kind, seqs in reads:
                if kind == Kind.message:
                    pipe.xrange(self.keys.messages(bucket, sid), f"{seqs[0]}-0", f"{seqs[-1]}-0")
                else:
                    pipe.hmget(self.keys.memories(bucket, sid), seqs)
            replies = list(await pipe.execute())
        snapshots = replies[: len(versions)]
        content: Content = {}
        for (bucket, sid, kind, seqs), reply in zip(reads, replies[len(versions) :], strict=True):
            if kind == Kind.message:
                for eid, kv in reply:
                    content[(bucket, sid, kind, int(eid.partition("-")[0]))] = kv
            else:
                for seq, doc in zip(seqs, reply, strict=True):
                    if doc is not None:
                        content[(bucket, sid, kind, seq)] = {"doc": doc}
        return snapshots, content

    async def _done(self, entries: Sequence[Entry]) -> None:
        """After COMMIT: per bucket, raise each session's flushed version and acknowledge, atomically.

        Retried with backoff while Redis is unreachable: the rows are committed, and giving up would
        make the entries be written again (harmless, but the whole batch). If the worker dies first,
        the entries stay pending and are replayed idempotently, then marked by whoever replays them.
        """
        ids: dict[int, list[str]] = defaultdict(list)
        sessions: dict[tuple[int, str], tuple[int, list[str]]] = {}  # highest version, entry ids
        for e in entries:
            ids[e.bucket].append(e.id)
            key, v = (e.bucket, e.f["sid"]), int(e.f["v"])
            if (seen := sessions.get(key)) is None:
                sessions[key] = (v, [e.id])
            else:
                seen[1].append(e.id)
                if v > seen[0]:
                    sessions[key] = (v, seen[1])
        triples: dict[int, list[str]] = defaultdict(list)
        for (bucket, sid), (v, eids) in sessions.items():
            triples[bucket] += [sid, str(v), "," + ",".join(eids) + ","]

        async def mark() -> None:  # idempotent (acks and fv only move forward): safe to send again
            if self.backend.cluster:  # one call per bucket, at once (no scripts in cluster pipelines)
                await asyncio.gather(
                    *(self.scripts.mark_flushed(self.keys, b, GROUP, eids, triples[b], None)
                      for b, eids in ids.items())
                )  # fmt: skip
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for bucket, eids in ids.items():
                    await self.scripts.mark_flushed(
                        self.keys, bucket, GROUP, eids, triples[bucket], client=pipe
                    )
                await pipe.execute()

        await _retrying(mark, what="recording a flushed batch")

    async def _failed(self, e: Entry, reason: str) -> None:
        """One entry could not be written. Keep it pending for redelivery, or dead-letter it."""
        FAILURES.labels("entry").inc()
        # Mark the session (only if it is in Redis) so the sweep keeps it there.
        await self.scripts.mark_stuck(self.keys, e.bucket, e.f.get("sid", ""), e.id)
        info = await self.redis.xpending_range(self.keys.outbox(e.bucket), GROUP, e.id, e.id, 1)
        deliveries = int(info[0]["times_delivered"]) if info else self.max_deliveries
        if deliveries >= self.max_deliveries:
            await self._dead_letter(e, reason)
        else:
            log.warning(
                "entry %s failed (delivery %d of %d): %s", e.id, deliveries, self.max_deliveries, reason
            )

    async def _dead_letter(self, e: Entry, reason: str) -> None:
        DEAD.inc()
        log.error("dead-lettering outbox entry %s of bucket %d: %s", e.id, e.bucket, reason)
        dead = {**e.f, "outbox_id": e.id, "error": reason[:1000]}
        await self.scripts.dead_letter(self.keys, e.bucket, GROUP, e.id, dead)

    # The loop --------------------------------------------------------------------------------------

    async def run(
        self, stop: asyncio.Event | None = None, maintenance_every: float = MAINTENANCE_EVERY_S
    ) -> None:
        """Drain until ``stop`` is set. Batches commit one at a time, in the order they were read; the
        next one is read and turned into rows (``ahead``) while the one before it commits, so that this
        process, Redis and Postgres work at the same time. Once ``stop`` is set nothing more is read; a
        batch already read ahead is in hand, and is committed too."""
        stop = stop or asyncio.Event()
        backoff = 0.0
        last_maintenance = 0.0
        own_pending = True
        ahead: asyncio.Task[Batch] | None = None
        try:
            while ahead is not None or not stop.is_set():
                try:
                    maintenance_due = time.monotonic() - last_maintenance > maintenance_every
                    if ahead is not None:
                        task, ahead = ahead, None
                        batch = await task
                    elif own_pending:
                        # Our own pending entries (after a restart under the same name, or a failed
                        # batch). Keep going while a bucket gives a full batch; whatever stays pending
                        # after that (a poison entry) is redelivered by XAUTOCLAIM, counting deliveries.
                        await self.ensure_groups()
                        batch = await self._prepare(await self.read(new=False))
                        own_pending = _full_batch(batch.entries, self.batch_size)
                    elif maintenance_due:
                        last_maintenance = time.monotonic()
                        await self.trim()
                        batch = await self._prepare(await self.reclaim())
                    else:
                        batch = await self._prepare(await self.read())
                    own_pending = own_pending or self.unconfirmed  # read them again, confirmed
                    if batch.entries:
                        if not (own_pending or maintenance_due or stop.is_set()):
                            ahead = asyncio.create_task(self._read_ahead(), name="outbox-read-ahead")
                        await self._flush(batch)
                    else:
                        await asyncio.sleep(self.idle_sleep)
                    backoff = 0.0
                    self.last_error = ""
                except Exception as exc:
                    # Nothing may kill the drain. Whatever was read (a batch read ahead included) stays
                    # pending for this consumer; re-read it first once things work again.
                    await _cancel(ahead)
                    ahead = None
                    backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, backoff * 2))
                    self.last_error = f"outbox drain paused: {exc!r}"[:300]
                    if isinstance(exc, UNAVAILABLE):
                        FAILURES.labels("unavailable").inc()
                        log.warning("flush paused %.1fs: %r", backoff, exc)
                    else:
                        FAILURES.labels("error").inc()
                        log.exception("flush failed; retrying in %.1fs", backoff)
                    own_pending = True
                    await asyncio.sleep(backoff)
        finally:
            await _cancel(ahead)  # cancelled while stopping: its entries stay pending, to be released


async def _cancel(task: asyncio.Task[Batch] | None) -> None:
    """Cancel a read ahead and wait for it to end. Entries it read stay pending for this consumer."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# SQLSTATE classes that say nothing about the data: connection (08), transaction rollback such as
# deadlock or serialization failure (40), insufficient resources (53), operator intervention such as a
# cancelled statement or shutdown (57). Retried with backoff; they never count towards dead-lettering.
_TRANSIENT_SQLSTATE = ("08", "40", "53", "57")


def _data_error(exc: BaseException) -> bool:
    """True when ``exc`` says "this data cannot be written"; false when Postgres is unreachable or the
    failure is transient (the same batch will go through later)."""
    if isinstance(exc, PG_UNAVAILABLE):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return not str(exc.sqlstate or "").startswith(_TRANSIENT_SQLSTATE)
    return isinstance(exc, (ValueError, KeyError, TypeError))


def _full_batch(entries: Sequence[Entry], batch_size: int) -> bool:
    per_bucket: dict[int, int] = defaultdict(int)
    for e in entries:
        per_bucket[e.bucket] += 1
    return any(n >= batch_size for n in per_bucket.values())


def _max_versions(entries: Sequence[Entry]) -> dict[tuple[int, str], int]:
    out: dict[tuple[int, str], int] = {}
    for e in entries:
        key = (e.bucket, e.f["sid"])
        out[key] = max(out.get(key, 0), int(e.f["v"]))
    return out


async def _retrying(call: Callable[[], Awaitable[Any]], what: str, attempts: int = 8) -> None:
    """Bookkeeping that must land: retry while Redis is unreachable (0.1 s doubling to 2 s, ~8 s in
    all), then let the error reach the drain loop, which re-reads this consumer's pending entries."""
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            await call()
            return
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if attempt == attempts:
                raise
            log.warning("%s failed (attempt %d): %r; retrying in %.1fs", what, attempt, exc, delay)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)
