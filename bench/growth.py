"""Benchmarks: does a request cost the same as the data grows ("growth"), and what does the data cost in
Redis memory ("memory")?

``growth`` fills Redis fast (the service's own Lua scripts, pipelined, never HTTP), checks the data is
what it claims, then measures each read or write with wrk beside the same request on a small case,
measured in the same run and interleaved round by round, so the ratio holds on any machine:

- get a session / append a message with ``GROWTH_SESSIONS`` hot sessions in Redis, beside a second API
  process on its own key prefix holding ``GROWTH_SMALL_SESSIONS``;
- a user's session list (first and middle page) of a user with ``GROWTH_USER_SESSIONS`` sessions, beside
  a user with 10;
- a page of 20 messages (first, middle, last) of a session with ``GROWTH_MESSAGES`` messages, beside a
  session with 20;
- cold reads (get, page of messages, user list) of sessions flushed to Postgres by the worker and then
  evicted from Redis (the expiry sweep's own ``EVICT`` script), beside the same reads of sessions
  still hot; wrk's script walks a list of distinct sessions (users for the list). Reads do not bring a
  session back into Redis (only a write does), which is checked after the measurement;
- a cold user list of sessions holding ``GROWTH_DOC_BYTES`` of ``conversation_data`` each, beside the
  cold list of sessions holding ``{}`` (a listing does not show it, so it must not cost more).

``memory`` runs on a private ``redis-server`` (so that ``used_memory`` deltas count nothing but this
data): ``INFO memory`` around creating sessions and appending messages of the benchmark's chat size,
before and after the worker flushed them and trimmed the outbox, ``MEMORY USAGE`` of one session's keys,
and a projection to a million sessions.

Sizes come from the environment so that a development run can be small (see ``_size`` below).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench.common import (
    PORT,
    POST_LUA,
    PREFIX,
    PY,
    ROOT,
    SCHEMA,
    _median,
    backlog,
    drop_prefix,
    stop,
    wait_http,
    wrk,
)
from session_svc.record.keys import Keys, UserKeys, bucket_of
from session_svc.record.shapes import now_us
from session_svc.settings import Settings
from session_svc.storage.scripts import Script, Scripts
from workers.flush import MAINTENANCE_EVERY_S


def _size(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


# The message every populated session gets: the very body wrk posts in the other benchmarks.
_TYPICAL = json.loads(re.search(r"wrk\.body = '(.*)'", POST_LUA).group(1))  # type: ignore[union-attr]
_MESSAGE = {
    "role": _TYPICAL["role"],
    "content": _TYPICAL["content"],
    "type": "chat",
    "tokens": str(_TYPICAL["tokens_used"]),
    "cost": str(round(_TYPICAL["cost_usd"] * 1_000_000)),
    "meta": json.dumps(_TYPICAL["metadata"], separators=(",", ":")),
}
# A session as the guide's example creates one.
_TITLE, _METADATA = "Test Session", '{"source":"web_app"}'

PAGE = 20  # a page of messages, and the sessions of one user in the hot/cold groups
SMALL_PREFIX = f"{PREFIX}s"  # the small case of "hot sessions": its own key prefix and API process
SMALL_PORT = PORT + 1


# Populating: the service's own scripts, thousands per pipeline ------------------------------------------


class Filler:
    """Creates sessions and appends messages through ``Scripts`` with coalescing on: every call made in
    one loop turn goes to Redis as one pipeline of EVALSHAs (``session_svc/storage/coalesce.py``)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, batch: int) -> None:
        self.scripts = Scripts(redis, coalesce=True)
        self.keys = keys
        self.batch = batch

    async def _run(self, calls: Iterable[Callable[[], Awaitable[Any]]]) -> None:
        pending: list[Awaitable[Any]] = []

        async def flush() -> None:
            replies = await asyncio.gather(*pending)
            bad = [r for r in replies if r[0] != "ok"]
            if bad:
                raise SystemExit(f"populate: {len(bad)} scripts refused, e.g. {bad[0]}")
            pending.clear()

        for call in calls:
            pending.append(call())
            if len(pending) >= self.batch:
                await flush()
        if pending:
            await flush()

    async def sessions(self, owners: Sequence[tuple[str, str]], conversation_data: str = "{}") -> None:
        """``owners``: (user id, session id)."""

        def create(uid: str, sid: str) -> Callable[[], Awaitable[Any]]:
            uk = self.keys.for_user(uid)
            return lambda: self.scripts.create_session(
                uk, sid, title=_TITLE, conversation_data=conversation_data, metadata=_METADATA, summary="",
                now=now_us(),
            )  # fmt: skip

        await self._run(create(uid, sid) for uid, sid in owners)

    async def messages(self, targets: Iterable[tuple[str, str]]) -> None:
        """One message per (user id, session id) of ``targets``, in that order."""

        def append(uid: str, sid: str) -> Callable[[], Awaitable[Any]]:
            uk = self.keys.for_user(uid)
            return lambda: self.scripts.append_message(
                uk, sid, {**_MESSAGE, "id": str(uuid.uuid4()), "ts": str(now_us())}
            )

        await self._run(append(uid, sid) for uid, sid in targets)


def _ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def _group(name: str, users: int) -> list[tuple[str, str]]:
    """``users`` users of ``PAGE`` sessions each: (user id, session id)."""
    return [(f"{name}{u}", sid) for u in range(users) for sid in _ids(PAGE)]


def _each(owners: Sequence[tuple[str, str]], times: int) -> Iterable[tuple[str, str]]:
    for _ in range(times):
        yield from owners


@dataclass
class Data:
    """What ``growth`` put in Redis, by role."""

    hot: list[tuple[str, str]]  # GROWTH_SESSIONS sessions, 10 per user (big prefix)
    small: list[tuple[str, str]]  # GROWTH_SMALL_SESSIONS sessions (small prefix)
    big_user: list[str]  # session ids of user "biguser"
    small_user: list[str]  # session ids of user "smalluser" (10)
    long_sid: str  # user "long": GROWTH_MESSAGES messages
    short_sid: str  # user "short": PAGE messages
    warm: list[tuple[str, str]]  # hot group: users of PAGE sessions with PAGE messages each
    cold: list[tuple[str, str]]  # the same shape, flushed then evicted
    cold_docs: list[tuple[str, str]]  # users of PAGE sessions with a large conversation_data, evicted
    doc_bytes: int  # the size of that conversation_data


async def _populate(big: Settings, small: Settings, batch: int) -> Data:
    n_hot = _size("GROWTH_SESSIONS", 100_000)
    n_user = _size("GROWTH_USER_SESSIONS", 10_000)
    n_msgs = _size("GROWTH_MESSAGES", 100_000)
    n_cold = _size("GROWTH_COLD_SESSIONS", 10_000)
    n_warm = _size("GROWTH_WARM_SESSIONS", 1_000)
    sids = _ids(n_hot)
    d = Data(
        hot=[(f"g{i // 10}", sid) for i, sid in enumerate(sids)],
        small=[(f"g{i // 10}", sid) for i, sid in enumerate(_ids(_size("GROWTH_SMALL_SESSIONS", 10)))],
        big_user=_ids(n_user),
        small_user=_ids(10),
        long_sid=str(uuid.uuid4()),
        short_sid=str(uuid.uuid4()),
        warm=_group("w", max(1, n_warm // PAGE)),
        cold=_group("c", max(1, n_cold // PAGE)),
        cold_docs=_group("d", max(1, _size("GROWTH_DOC_SESSIONS", 500) // PAGE)),
        doc_bytes=_size("GROWTH_DOC_BYTES", 16_384),
    )
    r = aioredis.Redis.from_url(big.redis_url, decode_responses=True)
    try:
        fill = Filler(r, Keys(big.key_prefix, big.redis_buckets), batch)
        t0 = time.monotonic()
        await fill.sessions(d.hot)
        await fill.sessions([("biguser", s) for s in d.big_user] + [("smalluser", s) for s in d.small_user])
        await fill.sessions([("long", d.long_sid), ("short", d.short_sid)])
        await fill.messages(_each([("long", d.long_sid)], n_msgs))
        await fill.messages(_each([("short", d.short_sid)], PAGE))
        await fill.sessions(d.warm + d.cold)
        await fill.messages(_each(d.warm + d.cold, PAGE))
        doc = json.dumps({"history": "x" * (d.doc_bytes - 16)}, separators=(",", ":"))
        await fill.sessions(d.cold_docs, conversation_data=doc)
        small_fill = Filler(r, Keys(small.key_prefix, small.redis_buckets), batch)
        await small_fill.sessions(d.small)
        print(f"populated in {time.monotonic() - t0:.1f}s")
    finally:
        await r.aclose()
    return d


# Flushing to Postgres and evicting ------------------------------------------------------------------


def _start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    # SESSION_HOT_TTL: the sweep evicts nothing; only what this benchmark evicts itself leaves Redis.
    wenv = {**env, "SESSION_HOT_TTL": "86400", "WORKER_NAME": f"{env['KEY_PREFIX']}-bench"}
    return subprocess.Popen([PY, "-m", "workers"], env=wenv, cwd=ROOT)


async def _outbox_len(r: aioredis.Redis, keys: Keys) -> int:
    async with r.pipeline(transaction=False) as pipe:
        for b in range(keys.buckets):
            pipe.xlen(keys.outbox(b))
        return sum(await pipe.execute())


async def _flush_all(env: dict[str, str], settings: Settings, trimmed: bool = False) -> float:
    """Run the worker until the outbox is drained into Postgres and, if ``trimmed``, until its
    maintenance has trimmed the acknowledged entries (the length has not changed for longer than a
    maintenance period). The trim is ``XTRIM MINID ~``: whole stream nodes only, so up to one node per
    bucket stays. Returns the seconds the drain took."""
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    worker = _start_worker(env)
    t0 = time.monotonic()
    try:
        while (await backlog(r, settings))[0] > 0:
            if worker.poll() is not None:
                raise SystemExit("the worker exited")
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - t0
        length, since = await _outbox_len(r, keys), time.monotonic()
        while trimmed and time.monotonic() - since < MAINTENANCE_EVERY_S + 1.5:
            await asyncio.sleep(0.2)
            if (now := await _outbox_len(r, keys)) != length:
                length, since = now, time.monotonic()
        return elapsed
    finally:
        stop([worker])
        await r.aclose()


def _by_bucket(owners: Iterable[tuple[str, str]], buckets: int) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for uid, sid in owners:
        out[bucket_of(uid, buckets)].append(sid)
    return out


async def _evict(settings: Settings, owners: Sequence[tuple[str, str]]) -> None:
    """The sweep's own script (``Scripts.evict``), with a cutoff in the future: every flushed session of
    ``owners`` leaves Redis now, exactly as an idle one would."""
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    scripts = Scripts(r)
    evicted = 0
    for bucket, sids in _by_bucket(owners, keys.buckets).items():
        for i in range(0, len(sids), 500):
            evicted += int(await scripts.evict(keys, bucket, now_us() + 60_000_000, sids[i : i + 500]))
    await r.aclose()
    if evicted != len(owners):
        raise SystemExit(f"evicted {evicted} of {len(owners)} sessions (not all flushed?)")


# Checking the data is what the table says -------------------------------------------------------------


async def _replies(r: aioredis.Redis, commands: Iterable[tuple[str, ...]]) -> list[Any]:
    """One pipeline of ``commands`` (each a command and its arguments); their replies."""
    async with r.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute())


async def _verify(big: Settings, small: Settings, d: Data) -> dict[str, Any]:
    r = aioredis.Redis.from_url(big.redis_url, decode_responses=True)
    kb, ks = Keys(big.key_prefix, big.redis_buckets), Keys(small.key_prefix, small.redis_buckets)
    facts: dict[str, Any] = {}

    def session_keys(o: tuple[str, str]) -> tuple[str, str]:
        uk = kb.for_user(o[0])
        return uk.session(o[1]), uk.messages(o[1])

    try:
        for name, k in (("big", kb), ("small", ks)):
            zcards = await _replies(r, (("ZCARD", k.hot(b)) for b in range(k.buckets)))
            facts[f"hot sessions ({name} prefix)"] = sum(zcards)
        for user in ("biguser", "smalluser"):
            facts[f"sessions of {user}"] = await r.zcard(kb.for_user(user).sessions)
        for user, sid in (("long", d.long_sid), ("short", d.short_sid)):
            skey, mkey = session_keys((user, sid))
            count = int(await r.hget(skey, "message_count") or 0)
            facts[f"messages of the {user} session"] = (count, await r.xlen(mkey))
        warm = await _replies(r, (("EXISTS", session_keys(o)[0]) for o in d.warm))
        facts["warm sessions in Redis"] = sum(warm)
        cold = await _replies(r, (("EXISTS", *session_keys(o)) for o in d.cold + d.cold_docs))
        facts["cold sessions still in Redis (session or messages key)"] = sum(cold)
        listed = await _replies(
            r, (("ZSCORE", kb.for_user(uid).sessions, sid) for uid, sid in d.cold + d.cold_docs)
        )
        facts["cold sessions in their user's index"] = sum(x is not None for x in listed)
        rehydrations = await _replies(r, (("HGET", kb.stats(b), "rehydrations") for b in range(kb.buckets)))
        facts["rehydrations (big prefix)"] = sum(int(x or 0) for x in rehydrations)
    finally:
        await r.aclose()
    pg = await asyncpg.connect(big.database_url)
    try:
        cold_ids = [sid for _, sid in d.cold]
        facts["cold sessions in Postgres"] = await pg.fetchval(
            f'SELECT count(*) FROM "{SCHEMA}".sessions WHERE session_id = ANY($1::text[])',
            cold_ids + [sid for _, sid in d.cold_docs],
        )
        facts["conversation_data bytes of a large-document session"] = await pg.fetchval(
            f'SELECT length(conversation_data::text) FROM "{SCHEMA}".sessions WHERE session_id = $1',
            d.cold_docs[0][1],
        )
        facts["their messages in Postgres"] = await pg.fetchval(
            f'SELECT count(*) FROM "{SCHEMA}".session_messages WHERE session_id = ANY($1::text[])', cold_ids
        )
    finally:
        await pg.close()
    return facts


def _check(facts: dict[str, Any], d: Data) -> None:
    n_msgs = _size("GROWTH_MESSAGES", 100_000)
    want = {
        "sessions of biguser": len(d.big_user),
        "sessions of smalluser": len(d.small_user),
        "messages of the long session": (n_msgs, n_msgs),
        "messages of the short session": (PAGE, PAGE),
        "warm sessions in Redis": len(d.warm),
        "cold sessions still in Redis (session or messages key)": 0,
        "cold sessions in their user's index": len(d.cold) + len(d.cold_docs),
        "cold sessions in Postgres": len(d.cold) + len(d.cold_docs),
        "their messages in Postgres": len(d.cold) * PAGE,
        "rehydrations (big prefix)": 0,
    }
    for name, value in facts.items():
        print(f"  {name:58} {value}")
    wrong = {n: (facts[n], v) for n, v in want.items() if facts[n] != v}
    if facts["conversation_data bytes of a large-document session"] < d.doc_bytes - 32:
        wrong["conversation_data bytes"] = (
            facts["conversation_data bytes of a large-document session"],
            d.doc_bytes,
        )
    if facts["hot sessions (big prefix)"] < len(d.hot):
        wrong["hot sessions (big prefix)"] = (facts["hot sessions (big prefix)"], f">= {len(d.hot)}")
    if wrong:
        raise SystemExit(f"the data is not as described: {wrong}")


# Measuring -----------------------------------------------------------------------------------------------


def _cycle_lua(paths: Sequence[str], offset: int) -> str:
    """A wrk script requesting ``paths`` in turn, from ``offset`` on (one thread: one counter)."""
    listed = ",\n".join(json.dumps(p) for p in paths)
    return f"""
local paths = {{
{listed}
}}
local i = {offset % len(paths)}
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
"""


@dataclass(frozen=True)
class Row:
    name: str
    base: str  # the small case's row name ("" for a small case itself)
    path: str
    lua: str | None = None
    port: int = PORT
    cycle: Sequence[str] = ()  # paths wrk walks through (cold and hot group reads)


def _rows(d: Data, n_hot: int) -> list[Row]:
    """``n_hot``: sessions held in Redis under the big prefix, as counted."""
    s = "/api/v1/sessions"
    n_user, n_msgs = len(d.big_user), _size("GROWTH_MESSAGES", 100_000)
    small_uid, small_sid = d.small[0]
    hot_uid, hot_sid = d.hot[0]
    last = math.ceil(n_msgs / PAGE)
    page = f"page_size={PAGE}"

    def get(o: tuple[str, str]) -> str:
        return f"{s}/{o[1]}?user_id={o[0]}"

    def msgs(o: tuple[str, str]) -> str:
        return f"{s}/{o[1]}/messages?user_id={o[0]}&page=1&{page}"

    def users(group: Sequence[tuple[str, str]]) -> list[str]:
        return [f"/api/v1/users/{u}/sessions?page=1&{page}" for u in dict.fromkeys(uid for uid, _ in group)]

    small_get = f"get a session, {len(d.small)} hot sessions"
    small_post = f"append a message, {len(d.small)} hot sessions"
    small_list = "user list, user of 10, page 1 of 10"
    small_page = f"messages, session of {PAGE}, page 1 of {PAGE}"
    warm = f"hot group ({len(d.warm)} sessions, walked)"
    cold = f"cold ({len(d.cold)} evicted sessions, walked)"
    return [
        Row(small_get, "", get((small_uid, small_sid)), port=SMALL_PORT),
        Row(f"get a session, {n_hot:,} hot sessions", small_get, get((hot_uid, hot_sid))),
        Row(small_post, "", f"{s}/{small_sid}/messages?user_id={small_uid}", POST_LUA, port=SMALL_PORT),
        Row(f"append a message, {n_hot:,} hot sessions", small_post,
            f"{s}/{hot_sid}/messages?user_id={hot_uid}", POST_LUA),
        Row(small_list, "", "/api/v1/users/smalluser/sessions?page=1&page_size=10"),
        Row(f"user list, user of {n_user:,}, page 1 of 10", small_list,
            "/api/v1/users/biguser/sessions?page=1&page_size=10"),
        Row(f"user list, user of {n_user:,}, middle page of 10", small_list,
            f"/api/v1/users/biguser/sessions?page={max(1, n_user // 20)}&page_size=10"),
        Row(small_page, "", msgs(("short", d.short_sid))),
        Row(f"messages, session of {n_msgs:,}, first page of {PAGE}", small_page, msgs(("long", d.long_sid))),
        Row(f"messages, session of {n_msgs:,}, middle page of {PAGE}", small_page,
            f"{s}/{d.long_sid}/messages?user_id=long&page={max(1, last // 2)}&{page}"),
        Row(f"messages, session of {n_msgs:,}, last page of {PAGE}", small_page,
            f"{s}/{d.long_sid}/messages?user_id=long&page={last}&{page}"),
        Row(f"get a session, {warm}", "", "/", cycle=[get(o) for o in d.warm]),
        Row(f"get a session, {cold}", f"get a session, {warm}", "/", cycle=[get(o) for o in d.cold]),
        Row(f"messages page 1 of {PAGE}, {warm}", "", "/", cycle=[msgs(o) for o in d.warm]),
        Row(f"messages page 1 of {PAGE}, {cold}", f"messages page 1 of {PAGE}, {warm}", "/",
            cycle=[msgs(o) for o in d.cold]),
        Row(f"user list of {PAGE}, {warm}", "", "/", cycle=users(d.warm)),
        Row(f"user list of {PAGE}, {cold}", f"user list of {PAGE}, {warm}", "/", cycle=users(d.cold)),
        Row(f"user list of {PAGE}, cold, {d.doc_bytes // 1024} KiB conversation_data each",
            f"user list of {PAGE}, {cold}", "/", cycle=users(d.cold_docs)),
    ]  # fmt: skip


Result = tuple[float, float, float]


def _measure(
    rows: Sequence[Row], conns: Sequence[str], repeats: int, duration: str
) -> dict[tuple[str, str], list[Result]]:
    runs: dict[tuple[str, str], list[Result]] = defaultdict(list)
    offsets: dict[str, int] = defaultdict(int)  # where the next walk of a row starts
    most: dict[str, float] = defaultdict(float)
    plan = [("warm-up", "1s", conns[-1])] + [(str(i), duration, c) for c in conns for i in range(repeats)]
    for label, length, c in plan:
        for row in rows:
            lua = _cycle_lua(row.cycle, offsets[row.name]) if row.cycle else row.lua
            result = wrk(row.path, lua, c, length, f"http://127.0.0.1:{row.port}")
            if label != "warm-up":
                runs[(row.name, c)].append(result)
            if row.cycle:
                done = result[0] * float(length.rstrip("s"))
                offsets[row.name] += int(done)
                most[row.name] = max(most[row.name], done)
    for row in rows:
        if row.cycle:
            print(
                f"  {row.name}: walks {len(row.cycle):,} distinct paths; "
                f"at most ~{most[row.name]:,.0f} requests in one run, {offsets[row.name]:,} in all"
            )
    return runs


def _table(rows: Sequence[Row], runs: dict[tuple[str, str], list[Result]], conns: Sequence[str]) -> None:
    print(f"{'row':60} {'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'p50 x':>6} {'p99 x':>6}")
    for c in conns:
        for row in rows:
            rps, p50, p99 = _median(runs[(row.name, c)])
            if row.base:
                _, b50, b99 = _median(runs[(row.base, c)])
                ratio = f"{p50 / b50:5.2f}x {p99 / b99:5.2f}x"
            else:
                ratio = f"{'small':>6} {'case':>6}"
            print(f"{row.name:60} {c:>5} {rps:8.0f} {p50:7.2f} {p99:7.2f} {ratio}")


def growth(env: dict[str, str]) -> None:
    """Cost as data grows: every row beside its small case, interleaved, medians of BENCH_REPEATS."""
    repeats = _size("BENCH_REPEATS", 3)
    duration = os.environ.get("GROWTH_ROW_DURATION", "5s")
    conns = os.environ.get("GROWTH_CONNECTIONS", "1,16").split(",")
    batch = _size("GROWTH_BATCH", 2000)
    small_env = {**env, "KEY_PREFIX": SMALL_PREFIX, "SERVICE_PORT": str(SMALL_PORT)}
    big, small = Settings.from_env(env), Settings.from_env(small_env)
    started: list[subprocess.Popen[bytes]] = []
    try:
        for e in (env, small_env):
            started.append(subprocess.Popen([PY, "-m", "session_svc"], env=e, cwd=ROOT))
        wait_http()
        wait_http(f"http://127.0.0.1:{SMALL_PORT}")
        d = asyncio.run(_populate(big, small, batch))
        took = asyncio.run(_flush_all(env, big))
        evict = d.cold + d.cold_docs
        print(f"worker flushed everything to Postgres in {took:.1f}s; evicting {len(evict):,} sessions")
        asyncio.run(_evict(big, evict))
        print("before measuring:")
        facts = asyncio.run(_verify(big, small, d))
        _check(facts, d)
        rows = _rows(d, facts["hot sessions (big prefix)"])
        print(
            f"\n# growth: wrk -t1 -d{duration}, medians of {repeats} interleaved rounds, one API process "
            f"per data set, load generator on the same {os.cpu_count()} cores"
        )
        runs = _measure(rows, conns, repeats, duration)
        print("after measuring:")
        after = asyncio.run(_verify(big, small, d))
        for name in ("cold sessions still in Redis (session or messages key)", "rehydrations (big prefix)"):
            print(f"  {name:58} {after[name]}")
        _table(rows, runs, conns)
    finally:
        stop(started)
        for prefix in (PREFIX, SMALL_PREFIX):
            asyncio.run(drop_prefix(big.redis_url, prefix))


# Memory --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _used(r: aioredis.Redis) -> tuple[int, int]:
    """``used_memory``, and the same less what this benchmark's own client connection holds (its query
    buffer after a pipeline of thousands of scripts: tens of KiB that come and go)."""
    info = await r.info("memory")
    return int(info["used_memory"]), int(info["used_memory"]) - int(info["mem_clients_normal"])


async def _usage(r: aioredis.Redis, keys: Sequence[str]) -> int:
    return sum([int(await r.memory_usage(k, samples=0) or 0) for k in keys])


async def _memory(env: dict[str, str], settings: Settings) -> None:
    n = _size("MEMORY_SESSIONS", 5_000)
    m = _size("MEMORY_MESSAGES", 50)
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    scripts = Scripts(r)
    for script in vars(scripts).values():  # every script in the cache before the first reading
        if isinstance(script, Script):
            await r.script_load(script.lua.source)
    await r.hset(keys.meta, "buckets", str(keys.buckets))
    owners = [(f"m{i}", sid) for i, sid in enumerate(_ids(n))]
    uid, sid = owners[0]
    uk: UserKeys = keys.for_user(uid)
    own = [uk.session(sid), uk.messages(sid), uk.sessions, uk.active]
    outboxes = [keys.outbox(b) for b in range(keys.buckets)]
    fill = Filler(r, keys, _size("GROWTH_BATCH", 2000))
    # stage, used_memory, the same less client buffers, the sample session's keys, the outbox streams,
    # outbox entries
    readings: list[tuple[str, int, int, int, int, int]] = []

    async def reading(stage: str) -> None:
        (used, data), own_b, out_b = await _used(r), await _usage(r, own), await _usage(r, outboxes)
        readings.append((stage, used, data, own_b, out_b, await _outbox_len(r, keys)))

    try:
        await reading("empty")
        await fill.sessions(owners)
        await reading(f"{n:,} sessions created")
        await _flush_all(env, settings, trimmed=True)
        await reading("flushed, outbox trimmed")
        await fill.messages(_each(owners, m))
        await reading(f"{m} messages appended to each")
        await _flush_all(env, settings, trimmed=True)
        await reading("flushed, outbox trimmed")
        per_key = {k.split(":", 2)[2].split(":")[0]: await _usage(r, [k]) for k in own}
        msgs_in_pg = 0
        pg = await asyncpg.connect(settings.database_url)
        msgs_in_pg = await pg.fetchval(
            f'SELECT count(*) FROM "{SCHEMA}".session_messages WHERE session_id = ANY($1::text[])',
            [s for _, s in owners],
        )
        await pg.close()
    finally:
        await r.aclose()
    if msgs_in_pg != n * m:
        raise SystemExit(f"Postgres holds {msgs_in_pg} messages, not {n * m}")

    print(
        f"\n# Redis memory: {n:,} sessions (each its own user), {m} messages each of "
        f"{len(_MESSAGE['content'])} characters (the benchmark's POST body); private redis-server, "
        "no persistence"
    )
    print(
        f"{'stage':36} {'used_memory':>13} {'less clients':>13} {'Δ':>12} {'one session':>12} "
        f"{'outboxes':>10} {'entries':>8}"
    )
    for i, (stage, used, data, own_b, out_b, entries) in enumerate(readings):
        delta = data - readings[i - 1][2] if i else 0
        print(f"{stage:36} {used:13,} {data:13,} {delta:+12,} {own_b:12,} {out_b:10,} {entries:8,}")
    print(
        "MEMORY USAGE of one session's keys after the flush: "
        + ", ".join(f"{k}: {v:,} B" for k, v in per_key.items())
    )
    u = [x[2] for x in readings]
    per_session = ((u[1] - u[0]) / n, (u[2] - u[0]) / n)
    per_message = ((u[3] - u[2]) / (n * m), (u[4] - u[2]) / (n * m))
    print(f"\n{'':36} {'per session':>12} {'per message':>12} {'1M sessions x 50 messages':>26}")
    for label, ps, pm in (
        ("not yet flushed (outbox holds it)", per_session[0], per_message[0]),
        ("flushed, outbox drained", per_session[1], per_message[1]),
    ):
        total = 1_000_000 * ps + 50_000_000 * pm
        print(f"{label:36} {ps:10,.0f} B {pm:10,.0f} B {total / 2**30:22.1f} GiB")


def memory(env: dict[str, str]) -> None:
    """Redis memory per session and per message, on a private redis-server: no persistence (it changes
    no data structure) and no latency tracking (Redis 7 allocates a histogram of about 25 KiB for each
    command name the first time it runs: 660 KiB of ``used_memory`` that come from the worker's first
    round, not from the data)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--latency-tracking", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    menv = {**env, "REDIS_URL": url, "ARQ_REDIS_URL": url}
    try:
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        asyncio.run(_memory(menv, Settings.from_env(menv)))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(workdir, ignore_errors=True)
