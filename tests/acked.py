"""The one model of acknowledged writes: every fault, failover and network test files each answer it got
here, by what that answer promises, and reconciles Postgres against it afterwards.

- 200: the write is in Postgres exactly once, equal to the answer (same id, sequence, content, cost,
  timestamps), and every counter a user sees (``message_count``, tokens, cost, memory count, the stats)
  equals what is stored;
- "nothing was written" (a 503 saying so, or a connection refused before the request was sent): the
  write is absent;
- "outcome unknown" (a 503 saying so, REDIS_WAIT_REPLICAS unconfirmed, or a connection that broke after
  the request was sent): the write may be there or not, but at most once and without a gap in the
  sequence numbers;
- anything else (a 500, a 503 of another kind, a 200 carrying another request's content) is ``wrong``
  and fails the check.

Every write carries content no other write sends, so a stored row names the request it came from.
``Load`` runs writers against any HTTP client (the in-process test client or an ``aiohttp.ClientSession``
on a real API process); ``Sample`` records each answer's timing for the figures.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import orjson

from session_svc.record.fields import MemoryType
from session_svc.record.keys import Keys
from session_svc.storage.redis_client import (
    REDIS_DOWN_DETAIL,
    REDIS_OOM_DETAIL,
    REDIS_UNKNOWN_DETAIL,
    REDIS_UNREPLICATED_DETAIL,
)
from tests import outbox_drain, pg_rows
from tests.helpers import SESSIONS, new_user, session_url
from tests.support import eventually

UNKNOWN_DETAILS = frozenset({REDIS_UNKNOWN_DETAIL, REDIS_UNREPLICATED_DETAIL})
REFUSED_DETAILS = frozenset({REDIS_DOWN_DETAIL, REDIS_OOM_DETAIL})
# Pseudo statuses of a real HTTP client: the connection was refused (nothing sent), or broke after the
# request was sent (the process died with it in hand).
NOT_SENT = 0
CUT = -1
MEMORY_TYPES = tuple(MemoryType)


@dataclass
class Sample:
    start: float
    elapsed: float
    status: int
    sid: str = ""


@dataclass
class Acked:
    """What the API answered to each write, filed by what the answer promises."""

    users: dict[str, str] = field(default_factory=dict)  # sid -> uid
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # acknowledged, per session
    memories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)  # contents of writes with an unknown outcome
    refused: set[str] = field(default_factory=set)  # contents of writes that wrote nothing
    oom: int = 0
    not_ok: list[str] = field(default_factory=list)  # every non-200 answer to a write
    wrong: list[str] = field(default_factory=list)  # answers that are never acceptable
    details: Counter[str] = field(default_factory=Counter)  # the 503 details seen
    samples: list[Sample] = field(default_factory=list)

    def session(self, body: dict[str, Any]) -> str:
        sid: str = body["session_id"]
        self.users[sid] = body["user_id"]
        self.messages[sid] = []
        self.memories[sid] = []
        return sid

    @property
    def acked_total(self) -> int:
        return sum(len(v) for v in self.messages.values())

    def file(self, what: str, sid: str, content: str, status: int, answer: dict[str, Any], t0: float) -> int:
        """One answer to a write of ``content`` (a message or memory; ``what`` names the kind)."""
        self.samples.append(Sample(t0, time.monotonic() - t0, status, sid))
        if status == 200:
            if what in ("message", "memory") and answer.get("content") != content:
                self.wrong.append(f"{what} {content!r} answered {answer}")
            elif what == "message":
                self.messages[sid].append(answer)
            elif what == "memory":
                self.memories[sid].append(answer)
            return status
        detail = answer.get("detail") if status == 503 else None
        self.not_ok.append(f"{what} to {sid}: {status} {answer}")
        if isinstance(detail, str):
            self.details[detail.split(":")[0][:80]] += 1
        if status == CUT or detail in UNKNOWN_DETAILS:
            self.unknown.add(content)
        elif status == NOT_SENT or detail in REFUSED_DETAILS:
            self.refused.add(content)
            self.oom += detail == REDIS_OOM_DETAIL
        else:
            self.wrong.append(f"{what} to {sid}: {status} {answer}")
        return status

    async def missing(self, pg: Any, schema: str) -> list[str]:
        """Acknowledged messages Postgres lacks (for a test that reports such losses, not forbids them)."""
        rows = await pg.fetch(
            f'SELECT message_id FROM "{schema}".session_messages WHERE session_id = ANY($1::text[])',
            list(self.users),
        )
        stored = {r["message_id"] for r in rows}
        return [m["message_id"] for ms in self.messages.values() for m in ms if m["message_id"] not in stored]

    async def reconcile(
        self, client: Any, redis: Any, keys: Keys, pg: Any, schema: str, *, exclusive: bool = True
    ) -> dict[str, int]:
        """Postgres against the answers (see the module docstring), after the worker drained everything.

        ``client`` is the API (what a user reads now), ``redis`` a raw decoded client on its Redis
        (hot sessions: flushed up to their version, not pinned, their stream equal to Postgres).
        ``exclusive``: the schema and key prefix hold only this model's sessions, so the table totals
        and the service-wide stats must equal the model's. Returns the figures of the outcomes.
        """
        assert not self.wrong, self.wrong[:5]
        sids = list(self.users)
        sessions = await pg_rows.pg_sessions(pg, schema, sids)
        assert set(sessions) == set(sids), set(sids) - set(sessions)
        totals: dict[str, Any] = {"total_messages": 0, "total_tokens": 0, "total_cost": Decimal(0)}
        stored_contents: set[str] = set()
        n_msg = n_mem = 0
        for sid, uid in self.users.items():
            rows = await pg_rows.pg_messages(pg, schema, sid)
            n_msg += len(rows)
            contents = [r["content"] for r in rows]
            assert len(set(contents)) == len(contents), (sid, "a message stored twice")
            assert [r["sequence"] for r in rows] == list(range(1, len(rows) + 1)), (sid, "a gap")
            by_id = {r["message_id"]: r for r in rows}
            for m in self.messages[sid]:
                assert by_id.get(m["message_id"]) == pg_rows.api_message(m), (sid, m)
            acked_ids = {m["message_id"] for m in self.messages[sid]}
            extra = {r["content"] for r in rows if r["message_id"] not in acked_ids}
            assert extra <= self.unknown, (sid, "stored, never acknowledged", extra - self.unknown)
            stored_contents |= set(contents)

            mems = await pg_rows.pg_memories(pg, schema, sid)
            n_mem += len(mems)
            # Memories written concurrently are numbered in the order Redis ran them: compare by id.
            assert [m.pop("seq") for m in mems] == list(range(1, len(mems) + 1)), sid
            mem_by_id = {m["memory_id"]: m for m in mems}
            for m in self.memories[sid]:
                assert mem_by_id.get(m["memory_id"]) == m, (sid, m)
            acked_mem = {m["memory_id"] for m in self.memories[sid]}
            extra = {m["content"] for m in mems if m["memory_id"] not in acked_mem}
            assert extra <= self.unknown, (sid, "memory stored, never acknowledged", extra - self.unknown)
            stored_contents |= {m["content"] for m in mems}

            resp = await client.get(session_url(sid), params={"user_id": uid})
            body = await resp.json()
            assert resp.status == 200, body
            h = await redis.hgetall(keys.for_user(uid).session(sid))
            if h:  # still hot: fully flushed and not pinned
                assert (h["fv"], h.get("stuck")) == (h["v"], None), (sid, h)
                stream = await redis.xrange(keys.for_user(uid).messages(sid))
                in_redis = {int(entry_id.partition("-")[0]): f["content"] for entry_id, f in stream}
                assert in_redis == {r["sequence"]: r["content"] for r in rows if r["sequence"] in in_redis}
            version = int(h["v"]) if h else sessions[sid]["version"]
            # Every field as the API answers it now, and the counters equal to what is stored.
            assert sessions[sid] == pg_rows.api_session(body, len(mems), version), sid
            assert body["message_count"] == len(rows), sid
            assert body["total_tokens"] == sum(r["tokens_used"] for r in rows), sid
            assert pg_rows.money(body["total_cost"]) == sum((r["cost_usd"] for r in rows), Decimal(0)), sid
            totals["total_messages"] += len(rows)
            totals["total_tokens"] += body["total_tokens"]
            totals["total_cost"] += pg_rows.money(body["total_cost"])
        assert not stored_contents & self.refused, ("stored, though refused", stored_contents & self.refused)
        assert await outbox_drain.dead_letters(redis, keys) == []
        if exclusive:
            counts = [
                await pg.fetchval(f'SELECT count(*) FROM "{schema}".{t}')
                for t in ("sessions", "session_messages", "session_memories")
            ]
            assert counts == [len(sids), n_msg, n_mem], counts
            stats = await (await client.get(f"{SESSIONS}/stats")).json()
            assert stats["total_sessions"] == len(sids), stats
            seen = {**{k: stats[k] for k in totals}, "total_cost": pg_rows.money(stats["total_cost"])}
            assert seen == totals, (seen, totals)
        return {
            "acked": self.acked_total + sum(len(v) for v in self.memories.values()),
            "unknown": len(self.unknown),
            "unknown_applied": len(self.unknown & stored_contents),
            "refused": len(self.refused),
            "acked_lost": 0,  # reconcile has failed if one is missing
        }


# Writes over HTTP, filed in the model -------------------------------------------------------------------


async def send(client: Any, method: str, url: str, params: dict[str, str], body: Any) -> tuple[int, Any]:
    """Status and JSON body; ``NOT_SENT`` / ``CUT`` when a real connection failed before / after sending."""
    try:
        resp = await client.request(method, url, params=params, json=body)
        try:
            text = await resp.text()
        finally:
            resp.release()
    except aiohttp.ClientConnectorError:
        return NOT_SENT, {}
    except (aiohttp.ClientError, TimeoutError):
        return CUT, {}
    try:
        answer = orjson.loads(text)
    except orjson.JSONDecodeError:
        answer = {"text": text[:500]}
    return int(resp.status), answer


async def create(client: Any, model: Acked, title: str = "") -> str:
    """A session, which must be acknowledged."""
    status, body = await send(client, "POST", SESSIONS, {}, {"user_id": new_user(), "title": title})
    assert status == 200, (status, body)
    return model.session(body)


async def message(
    client: Any, model: Acked, sid: str, content: str, cost: float = 0.000125, tokens: int | None = None
) -> int:
    body = {"role": "user", "content": content, "tokens_used": len(content) if tokens is None else tokens,
            "cost_usd": cost}  # fmt: skip
    t0 = time.monotonic()
    url = session_url(sid, "/messages")
    status, answer = await send(client, "POST", url, {"user_id": model.users[sid]}, body)
    return model.file("message", sid, content, status, answer, t0)


async def memory(client: Any, model: Acked, sid: str, n: int) -> int:
    content = f"memory {n} {uuid.uuid4().hex[:8]}"
    body = {"memory_type": MEMORY_TYPES[n % len(MEMORY_TYPES)], "content": content, "metadata": {"n": n}}
    t0 = time.monotonic()
    url = session_url(sid, "/memory")
    status, answer = await send(client, "POST", url, {"user_id": model.users[sid]}, body)
    return model.file("memory", sid, content, status, answer, t0)


async def retitle(client: Any, model: Acked, sid: str, title: str) -> int:
    t0 = time.monotonic()
    params = {"user_id": model.users[sid]}
    status, answer = await send(client, "PUT", session_url(sid), params, {"title": title})
    return model.file("title", sid, title, status, answer, t0)


class Load:
    """``writers`` tasks appending to ``sids`` through ``client`` until ``finish``; every answer filed in
    ``model``. ``pause`` between writes, ``backoff`` after a failed one."""

    def __init__(
        self,
        client: Any,
        model: Acked,
        sids: list[str],
        writers: int,
        size: int = 40,
        pause: float = 0.002,
        backoff: float = 0.0,
    ) -> None:
        self.client, self.model, self.sids = client, model, sids
        self.size, self.pause, self.backoff = size, pause, backoff
        self.stop = asyncio.Event()
        self.n = 0
        self.tasks = [asyncio.create_task(self._writer(w)) for w in range(writers)]

    async def _writer(self, w: int) -> None:
        rnd = random.Random(w)
        while not self.stop.is_set():
            self.n += 1
            content = f"w{w} n{self.n} {uuid.uuid4().hex[:12]} ".ljust(self.size, "x")
            status = await message(self.client, self.model, rnd.choice(self.sids), content, tokens=self.n % 7)
            await asyncio.sleep(self.pause if status == 200 else max(self.pause, self.backoff))

    async def acked(self, more: int, within: float = 30.0) -> float:
        """Until ``more`` further writes were acknowledged; returns how long that took."""
        t0 = time.monotonic()
        target = self.model.acked_total + more

        async def reached() -> bool:
            assert all(not t.done() for t in self.tasks), [t.exception() for t in self.tasks if t.done()]
            return self.model.acked_total >= target

        await eventually(reached, f"{more} more acknowledged writes", within)
        return time.monotonic() - t0

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


# Figures from the samples -------------------------------------------------------------------------------


def first_ok_after(samples: list[Sample], t: float) -> float:
    """Seconds from ``t`` to the first 200 of a request started after ``t``."""
    return min(s.start + s.elapsed for s in samples if s.start >= t and s.status == 200) - t


def during(samples: list[Sample], start: float, end: float) -> list[Sample]:
    """Requests started between ``start`` and ``end``."""
    return [s for s in samples if start <= s.start < end]


def within(samples: list[Sample], start: float, end: float) -> list[Sample]:
    """Requests made and answered between ``start`` and ``end`` (one made just before a link came back
    may be sent after it, and answered 200)."""
    return [s for s in samples if start <= s.start and s.start + s.elapsed < end]


def ms(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (seconds) in milliseconds, 0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


async def table_count(pg: asyncpg.Connection, schema: str, table: str) -> int:
    return int(await pg.fetchval(f'SELECT count(*) FROM "{schema}".{table}'))
