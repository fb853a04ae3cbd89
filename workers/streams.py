"""The outbox streams as the flusher reads them: the consumer group, new and pending entries, reclaims
from dead consumers, the release of a stopping worker's entries, and trimming below the oldest pending.

``OutboxReader`` holds a worker's consumer and its tunables; ``flush.Flusher`` extends it with the
writing to Postgres and the loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from session_svc.record.keys import Keys
from session_svc.storage.outbox import GROUP
from session_svc.storage.redis_client import AnyRedis
from session_svc.storage.resources import Backend
from session_svc.storage.scripts import Scripts
from workers.rows import Entry

log = logging.getLogger("workers.flush")

# Seconds the drain sleeps when the outbox is empty.
IDLE_SLEEP_S = 0.05
# A consumer name idle this long with nothing pending is forgotten (every worker start adds one).
CONSUMER_IDLE_MS = 86_400_000
# Idle time given to the entries a stopping worker releases: past any FLUSH_CLAIM_IDLE_MS, so that every
# worker's XAUTOCLAIM takes them at once.
RELEASED_IDLE_MS = 86_400_000


@dataclass
class OutboxReader:
    """The outbox side of one worker's drain (consumer ``consumer``); tunables from Settings (FLUSH_*)."""

    backend: Backend
    consumer: str
    batch_size: int
    max_deliveries: int
    claim_idle_ms: int
    idle_sleep: float = IDLE_SLEEP_S
    consumer_idle_ms: int = CONSUMER_IDLE_MS
    # For the heartbeat: when a batch last committed (epoch s), and why the drain is paused, if it is.
    last_commit: float = 0.0
    last_error: str = ""
    # The last read left entries pending because WAIT did not confirm them (REDIS_WAIT_REPLICAS).
    unconfirmed: bool = False

    def __post_init__(self) -> None:
        if self.backend.pg is None:
            raise ValueError("the outbox drain needs PostgreSQL (DATABASE_URL)")

    @property
    def redis(self) -> AnyRedis:
        return self.backend.redis

    @property
    def pg(self) -> asyncpg.Pool:
        assert self.backend.pg is not None  # checked at construction
        return self.backend.pg

    @property
    def keys(self) -> Keys:
        return self.backend.keys

    @property
    def schema(self) -> str:
        return self.backend.schema

    @property
    def scripts(self) -> Scripts:
        return self.backend.scripts

    # Reading ---------------------------------------------------------------------------------------

    async def ensure_groups(self) -> None:
        if self.backend.cluster:  # no scripts in redis-py's cluster pipelines: calls at once (coalesced)
            await asyncio.gather(
                *(self.scripts.ensure_group(self.keys, b, GROUP, None) for b in range(self.keys.buckets))
            )
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in range(self.keys.buckets):
                await self.scripts.ensure_group(self.keys, bucket, GROUP, client=pipe)
            await pipe.execute()

    async def read(self, new: bool = True) -> list[Entry]:
        """New entries (``>``), or this consumer's own pending ones (``0``, after a restart).

        With REDIS_WAIT_REPLICAS, a ``WAIT`` follows the reads on each node's connection, and the
        entries of a node whose replicas did not all confirm are left pending (``unconfirmed``): a
        failover could take them back, and a message Postgres held that Redis lost would make its
        sequence number be given again to another message, which Postgres would then refuse."""
        self.unconfirmed = False
        n, timeout_ms = self.backend.wait
        async with self.redis.pipeline(transaction=False) as pipe:
            for bucket in range(self.keys.buckets):
                pipe.xreadgroup(
                    GROUP,
                    self.consumer,
                    {self.keys.outbox(bucket): ">" if new else "0"},
                    count=self.batch_size,
                )
            nodes = self._nodes() if n else []
            for node, _buckets in nodes:
                target = {"target_nodes": node} if node is not None else {}
                pipe.execute_command("WAIT", n, timeout_ms, **target)
            replies = await pipe.execute(raise_on_error=False)
        if nodes:
            acked = replies[self.keys.buckets :]
            replies = replies[: self.keys.buckets]
            short = {b for (_node, buckets), a in zip(nodes, acked, strict=True)
                     if isinstance(a, Exception) or int(a) < n for b in buckets}  # fmt: skip
            if short:
                self.unconfirmed = True
                log.warning(
                    "outbox entries of %d buckets not confirmed on %d replicas; left pending", len(short), n
                )
                replies = [None if b in short else r for b, r in enumerate(replies)]
        entries: list[Entry] = []
        for bucket, reply in enumerate(replies):
            if isinstance(reply, ResponseError):
                if "NOGROUP" in str(reply):
                    await self.ensure_groups()
                    continue
                raise reply
            for _stream, items in reply or []:
                entries += [Entry(bucket, eid, f) for eid, f in items if f]
        return entries

    async def reclaim(self) -> list[Entry]:
        """Entries left pending by a dead (or stalled) consumer, taken over by this one."""
        entries: list[Entry] = []
        for bucket in range(self.keys.buckets):
            stream = self.keys.outbox(bucket)
            try:
                reply = await self.redis.xautoclaim(
                    stream, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=self.batch_size
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    continue
                raise
            entries += [Entry(bucket, eid, f) for eid, f in reply[1] if f]
        return entries

    async def release(self) -> int:
        """On the way out: hand this consumer's pending entries (a batch cut short by the shutdown
        timeout, one that failed) over to the other workers. They stay pending, so nothing is lost, but
        XCLAIM ... IDLE makes them look idle for RELEASED_IDLE_MS, so that the next XAUTOCLAIM of any
        worker (at its start, or its next maintenance round) takes them at once instead of
        FLUSH_CLAIM_IDLE_MS later. JUSTID: this is not a delivery, the delivery counter stays as it is.
        Returns how many entries were released."""
        released = 0
        for bucket in range(self.keys.buckets):
            stream, start = self.keys.outbox(bucket), "-"
            while True:
                try:
                    pending = await self.redis.xpending_range(
                        stream, GROUP, start, "+", self.batch_size, consumername=self.consumer
                    )
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        break
                    raise
                ids = [p["message_id"] for p in pending]
                if ids:
                    await self.redis.xclaim(
                        stream, GROUP, self.consumer, 0, ids, idle=RELEASED_IDLE_MS, justid=True
                    )
                    released += len(ids)
                if len(ids) < self.batch_size:
                    break
                start = "(" + ids[-1]
        return released

    # Housekeeping of the streams -------------------------------------------------------------------

    async def trim(self) -> None:
        """Drop acknowledged entries: everything below the oldest pending or undelivered one."""
        for bucket in range(self.keys.buckets):
            stream = self.keys.outbox(bucket)
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:
                continue
            group = next((g for g in groups if g["name"] == GROUP), None)
            if group is None:
                continue
            floor = group["last-delivered-id"]
            if int(group["pending"]):
                oldest = (await self.redis.xpending(stream, GROUP))["min"]
                if oldest:  # may have been acknowledged meanwhile
                    floor = min(floor, oldest, key=_id_key)
            await self.redis.xtrim(stream, minid=floor)
            await self._forget_idle_consumers(stream)

    async def _forget_idle_consumers(self, stream: str) -> None:
        """Every worker start adds a consumer name; drop those with nothing pending that have been idle
        for ``consumer_idle_ms``. (A live one that is merely quiet is re-created by its next read.)"""
        for c in await self.redis.xinfo_consumers(stream, GROUP):
            if (
                c["name"] != self.consumer
                and not int(c["pending"])
                and int(c["idle"]) >= self.consumer_idle_ms
            ):
                await self.redis.xgroup_delconsumer(stream, GROUP, c["name"])

    def _nodes(self) -> list[tuple[Any, list[int]]]:
        """The node of each group of buckets (``None``: the standalone Redis), for the WAITs of ``read``."""
        if not isinstance(self.redis, RedisCluster):
            return [(None, list(range(self.keys.buckets)))]
        nodes: dict[str, tuple[Any, list[int]]] = {}
        for bucket in range(self.keys.buckets):
            node = self.redis.get_node_from_key(self.keys.outbox(bucket))
            if node is None:
                raise RedisConnectionError(f"no Redis Cluster node serves bucket {bucket} now")
            nodes.setdefault(node.name, (node, []))[1].append(bucket)
        return list(nodes.values())


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
