"""Script calls made in the same turn of the event loop, sent to Redis together: one pipeline, one write
and one read on one pooled connection per Redis node, instead of a connection checkout and a round trip
each (what ioredis calls auto-pipelining). Under load, dozens of requests reach their script in the same
turn; alone, a call waits for nothing but the end of the current turn.

A batch is a non-transactional pipeline of EVALSHAs: each script is still atomic on its own, and one
failing (an error reply, ``OOM``, ``NOSCRIPT``) fails only its own caller. A script Redis does not
know (a restarted or flushed Redis, a new node, a promoted replica) is loaded on that node and its calls
are sent again: NOSCRIPT means it did not run. A connection failure fails every call sent on that
connection with the same honesty as a single call (``redis_client``): the caller's request learns whether
the batch may have reached Redis (outcome unknown) or was never sent, through the same per-request flag.

On Redis Cluster (``Route`` below) the calls of a turn are grouped by the node that holds their first
key's slot (every key of a script shares one bucket tag, hence one slot), and each node's group goes as
one pipeline on a connection of that node's own pool, all nodes at once. A call answered ``MOVED`` did
not run: the slot map is read again and the call re-sent once to the new owner. ``ASK``, ``TRYAGAIN``,
``CLUSTERDOWN`` and ``MASTERDOWN`` also mean "not run": the call fails as *nothing was written*
(``NotExecuted``), never retried blindly. A connection failure marks the slot map stale, so that the
next batch reads it again: after a failover the promoted replica is found within one refresh.

With ``REDIS_WAIT_REPLICAS=N`` a ``WAIT N timeout`` follows the write scripts of a pipeline on the same
connection (no extra round trip): when fewer than N replicas confirm, those writes fail with
``ReplicationUnconfirmed`` (503, outcome unknown) instead of a 2xx a failover could take back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterParser, RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import (
    AskError,
    ClusterDownError,
    DataError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

from session_svc.storage import redis_client
from session_svc.storage.redis_client import REDIS_DOWN, NotExecuted, ReplicationUnconfirmed

Arg = str | int | float

# Error replies of a cluster that say the command did not run.
_NOT_RUN = (AskError, TryAgainError, ClusterDownError)
# Seconds between two readings of the slot map (a failover is announced by many failing calls at once).
MAP_REFRESH_MIN_S = 0.2


@dataclass(slots=True)
class _Call:
    sha: str
    source: str
    keys: Sequence[str]
    args: Sequence[Arg]
    durable: bool  # a write whose reply waits for WAIT's replicas (REDIS_WAIT_REPLICAS)
    future: asyncio.Future[tuple[bool, Any, bool]]  # (ok, reply or exception, outcome unknown)


class Route:
    """Where a call goes: the one pool of a standalone Redis, or the pool of the node that owns the
    call's slot on a cluster (pools made on first use, one per node, each with its own breaker)."""

    def __init__(self, redis: Redis | RedisCluster) -> None:
        self.redis = redis
        self.cluster = redis if isinstance(redis, RedisCluster) else None
        self._pools: dict[str, ConnectionPool] = {}
        self._stale = self.cluster is not None and self.cluster._initialize
        self._read_at = 0.0
        self._reading: asyncio.Lock | None = None

    def mark_stale(self) -> None:
        self._stale = self.cluster is not None

    async def refresh(self) -> None:
        """Read the slot map again (at most every MAP_REFRESH_MIN_S; concurrent callers share one)."""
        assert self.cluster is not None
        if self._reading is None:
            self._reading = asyncio.Lock()
        async with self._reading:
            if not self._stale or time.monotonic() - self._read_at < MAP_REFRESH_MIN_S:
                return
            self._read_at = time.monotonic()
            try:
                if self.cluster._initialize:  # never initialized (the cluster was down at start)
                    _ = await self.cluster.initialize()  # the slot map and redis-py's command table
                else:
                    await self.cluster.nodes_manager.initialize()
            except Exception as exc:  # no seed answers: nothing can be sent
                raise NotExecuted(f"Redis Cluster slot map unavailable: {exc!r}") from exc
            self._stale = False

    async def group(self, batch: Sequence[_Call]) -> dict[ConnectionPool, list[_Call]]:
        if self.cluster is None:
            return {cast(ConnectionPool, self.redis.connection_pool): list(batch)}
        if self._stale:
            await self.refresh()
        out: dict[ConnectionPool, list[_Call]] = {}
        manager = self.cluster.nodes_manager
        for c in batch:
            try:
                node = manager.get_node_from_slot(self.cluster.keyslot(c.keys[0]))
            except Exception as exc:  # a slot no node serves right now
                self.mark_stale()
                c.future.set_result((False, NotExecuted(f"no Redis node serves this key: {exc!r}"), False))
                continue
            out.setdefault(self._pool(node.host, int(node.port)), []).append(c)
        return out

    def _pool(self, host: str, port: int) -> ConnectionPool:
        name = f"{host}:{port}"
        pool = self._pools.get(name)
        if pool is None:
            assert self.cluster is not None
            kw = self.cluster.get_connection_kwargs()
            pool = self._pools[name] = redis_client.guarded_pool(
                host=host,
                port=port,
                max_connections=int(kw.get("max_connections") or 64),
                socket_timeout=kw.get("socket_timeout"),
                socket_connect_timeout=kw.get("socket_connect_timeout"),
                password=kw.get("password"),
                username=kw.get("username"),
                parser_class=ClusterParser,
                **getattr(self.cluster, "pool_options", {}),
            )
        return pool

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()


class Coalescer:
    def __init__(self, redis: Redis | RedisCluster, wait_replicas: int = 0, wait_timeout_ms: int = 0) -> None:
        self.redis = redis
        self.route = Route(redis)
        self.wait = (wait_replicas, wait_timeout_ms) if wait_replicas > 0 else None
        self._pending: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(
        self, sha: str, source: str, keys: Sequence[str], args: Sequence[Arg], durable: bool = False
    ) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any, bool]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)
        self._pending.append(_Call(sha, source, keys, args, durable, future))
        ok, value, unknown = await future
        if ok:
            return value
        if unknown:
            redis_client.mark_outcome_unknown()  # in this request's context, not the batch's
        raise value

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: Sequence[_Call], redirects: int = 1) -> None:
        try:
            groups = await self.route.group(batch)
        except Exception as exc:
            _fail(batch, exc, False)
            return
        if len(groups) == 1:  # the usual case on a standalone Redis: no task per node
            [(pool, calls)] = groups.items()
            await self._node(pool, calls, redirects)
            return
        await asyncio.gather(*(self._node(pool, calls, redirects) for pool, calls in groups.items()))

    async def _node(self, pool: ConnectionPool, batch: list[_Call], redirects: int) -> None:
        """One node's share of a batch. Run as a task of its own per node (``gather``), so that the
        outcome flag it reads is this node's alone."""
        redis_client.reset_outcome()  # this task's own flag: did this batch reach Redis?
        breaker: redis_client.Breaker | None = getattr(pool, "breaker", None)  # none on a cluster node
        failures = breaker.failures if breaker is not None else 0
        try:
            replies = await self._pipeline(batch, pool)
            again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if again:
                await _load(pool, {batch[i].source for i in again})
                for i, reply in zip(
                    again, await self._pipeline([batch[i] for i in again], pool), strict=True
                ):
                    replies[i] = reply
        except Exception as exc:
            unknown = redis_client.outcome_unknown()
            if breaker is not None and breaker.failures > failures:
                # The connection told the breaker once that Redis did not answer, for every caller of
                # the batch. Each of them met that failure, as each did on a connection of its own
                # before coalescing: count them all, or a black-holed Redis would keep every request
                # waiting REDIS_SOCKET_TIMEOUT for three rounds (one batch each) before the breaker
                # opened, instead of one.
                for _ in batch[1:]:
                    breaker.failure()
            if isinstance(exc, REDIS_DOWN):
                self.route.mark_stale()  # a failover may have moved this node's slots
            _fail(batch, exc, unknown)
            return
        moved: list[_Call] = []
        for c, reply in zip(batch, replies, strict=True):
            if c.future.done():  # a caller cancelled meanwhile: its script ran all the same
                continue
            if isinstance(reply, MovedError) and redirects > 0:
                moved.append(c)
            elif isinstance(reply, _NOT_RUN):
                self.route.mark_stale()
                c.future.set_result((False, NotExecuted(f"Redis Cluster did not run it: {reply}"), False))
            elif isinstance(reply, ReplicationUnconfirmed):
                c.future.set_result((False, reply, True))
            else:
                c.future.set_result((not isinstance(reply, Exception), reply, False))
        if moved:  # not run: send them again once, to the slot's new owner
            self.route.mark_stale()
            await self._run(moved, redirects - 1)

    async def _pipeline(self, batch: Sequence[_Call], pool: ConnectionPool) -> list[Any]:
        """Every call of ``batch`` written at once on one pooled connection, then one reply read per
        call: an error reply is that call's result, a connection failure fails them all. What redis-py's
        pipeline does, without its per-command machinery (a third of the cost of a batch). With WAIT,
        ``WAIT n timeout`` goes last when the batch holds a durable write, and its reply decides them."""
        replies: list[Any] = [None] * len(batch)
        chunks: list[bytes] = []
        sent: list[int] = []
        for i, c in enumerate(batch):
            try:
                chunks.append(_pack(c))
                sent.append(i)
            except (DataError, UnicodeEncodeError) as exc:  # cannot be sent: only this call fails
                replies[i] = exc if isinstance(exc, DataError) else DataError(f"cannot encode: {exc}")
        if not sent:
            return replies
        wait = self.wait if self.wait and any(batch[i].durable for i in sent) else None
        if wait is not None:
            chunks.append(_pack_command(b"WAIT", str(wait[0]).encode(), str(wait[1]).encode()))
        conn = await pool.get_connection("EVALSHA")  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(b"".join(chunks), check_health=False)
            for i in sent:
                try:
                    replies[i] = await conn.read_response()
                except ResponseError as exc:  # Redis answered this call with an error
                    replies[i] = exc
            if wait is not None:
                acked = int(await conn.read_response())
                if acked < wait[0]:
                    for i in sent:
                        if batch[i].durable and not isinstance(replies[i], Exception):
                            replies[i] = ReplicationUnconfirmed(acked, wait[0])
        except BaseException:
            # Replies may still be on their way: this connection's stream is out of step. Never reuse it.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return replies

    async def aclose(self) -> None:
        """At the very end of the process: batches still in flight (a hung Redis) are cancelled, not
        waited for (their callers are gone already); their connections are dropped."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.route.aclose()


def _fail(batch: Sequence[_Call], exc: Exception, unknown: bool) -> None:
    for c in batch:
        if not c.future.done():
            c.future.set_result((False, exc, unknown))


async def _load(pool: ConnectionPool, sources: set[str]) -> None:
    """SCRIPT LOAD each of ``sources`` on the node behind ``pool``."""
    conn = await pool.get_connection("SCRIPT")  # type: ignore[no-untyped-call]
    try:
        for source in sources:
            await conn.send_command("SCRIPT", "LOAD", source)
            await conn.read_response()
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


def _arg(value: Arg) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):  # an int, but never a Redis argument (redis-py refuses it too)
        raise DataError("a bool is not a Redis argument")
    return repr(value).encode()  # int or float, as redis-py writes them


def _pack(c: _Call) -> bytes:
    """``EVALSHA sha numkeys key... arg...`` in RESP: an array of bulk strings."""
    return _pack_command(
        b"EVALSHA", c.sha.encode(), str(len(c.keys)).encode(), *map(_arg, c.keys), *map(_arg, c.args)
    )


def _pack_command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for b in parts:
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)
