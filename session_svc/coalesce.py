"""Script calls made in the same turn of the event loop, sent to Redis together: one pipeline, one write
and one read on one pooled connection, instead of a connection checkout and a round trip each (what
ioredis calls auto-pipelining). Under load, dozens of requests reach their script in the same turn;
alone, a call waits for nothing but the end of the current turn.

A batch is a non-transactional pipeline of EVALSHAs: each script is still atomic on its own, and one
failing (an error reply, ``OOM``, ``NOSCRIPT``) fails only its own caller. A script Redis does not
know (a restarted or flushed Redis, a new node) is loaded and its calls are sent again: NOSCRIPT means
it did not run. A connection failure fails every call of the batch with the same honesty as a single
call (``redis_client``): the caller's request learns whether the batch may have reached Redis (outcome
unknown) or was never sent, through the same per-request flag.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import DataError, NoScriptError, ResponseError

from session_svc import redis_client

Arg = str | int | float


@dataclass(slots=True)
class _Call:
    sha: str
    source: str
    keys: Sequence[str]
    args: Sequence[Arg]
    future: asyncio.Future[tuple[bool, Any, bool]]  # (ok, reply or exception, outcome unknown)


class Coalescer:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, sha: str, source: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any, bool]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)
        self._pending.append(_Call(sha, source, keys, args, future))
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

    async def _run(self, batch: list[_Call]) -> None:
        redis_client.reset_outcome()  # this task's own flag: did this batch reach Redis?
        breaker: redis_client.Breaker | None = getattr(self.redis.connection_pool, "breaker", None)
        failures = breaker.failures if breaker is not None else 0
        try:
            replies = await self._pipeline(batch)
            again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if again:
                for source in {batch[i].source for i in again}:
                    await self.redis.script_load(source)
                for i, reply in zip(again, await self._pipeline([batch[i] for i in again]), strict=True):
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
            for c in batch:
                if not c.future.done():
                    c.future.set_result((False, exc, unknown))
            return
        for c, reply in zip(batch, replies, strict=True):
            if not c.future.done():  # a caller cancelled meanwhile: its script ran all the same
                c.future.set_result((not isinstance(reply, Exception), reply, False))

    async def _pipeline(self, batch: Sequence[_Call]) -> list[Any]:
        """Every call of ``batch`` written at once on one pooled connection, then one reply read per
        call: an error reply is that call's result, a connection failure fails them all. What redis-py's
        pipeline does, without its per-command machinery (a third of the cost of a batch)."""
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
        pool = self.redis.connection_pool
        conn = await pool.get_connection("EVALSHA")  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(b"".join(chunks), check_health=False)
            for i in sent:
                try:
                    replies[i] = await conn.read_response()
                except ResponseError as exc:  # Redis answered this call with an error
                    replies[i] = exc
        except BaseException:
            # Replies may still be on their way: this connection's stream is out of step. Never reuse it.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return replies


def _arg(value: Arg) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):  # an int, but never a Redis argument (redis-py refuses it too)
        raise DataError("a bool is not a Redis argument")
    return repr(value).encode()  # int or float, as redis-py writes them


def _pack(c: _Call) -> bytes:
    """``EVALSHA sha numkeys key... arg...`` in RESP: an array of bulk strings."""
    parts = [c.sha.encode(), str(len(c.keys)).encode(), *map(_arg, c.keys), *map(_arg, c.args)]
    out = [b"*%d\r\n$7\r\nEVALSHA\r\n" % (len(parts) + 1)]
    for b in parts:
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)
