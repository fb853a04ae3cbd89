"""Every Lua script of the service and its workers, with one call contract.

Each script is a ``Lua``: the names of its KEYS and ARGV, and a body. Its source starts with those names
bound to locals (``local session, messages = KEYS[1], KEYS[2]``), generated from the declaration, so the
body never says ``KEYS[3]``; arguments past the named ones (a variable number of field/value pairs, of
session ids...) start at ARGV[``REST``]. ``Scripts.register`` registers them all once per client
(EVALSHA, with redis-py loading a script on NOSCRIPT), and each has a typed wrapper below that builds
its keys from ``keys.py`` and passes keys and arguments by name, so a wrong order cannot happen.

Conventions shared by the session-scoped scripts:
- All KEYS are in one hash slot (the user's bucket, see ``keys.py``).
- The first element of the reply is a status: ``ok``; ``missing`` (no such session for this user);
  ``cold`` (the session is known to the user's index but its data has left Redis: read it from
  Postgres, or rehydrate it before writing); ``conflict`` followed by the current status.
- Every write bumps the session's version ``v`` and appends one entry to the bucket's outbox stream in
  the same script, so an acknowledged write is always on its way to Postgres. The worker records the
  highest version it committed in ``fv``; the expiry sweep deletes a session only when ``v == fv``.
- Timestamps are integer microseconds since the epoch, passed in by the caller.
- Every write also scores the session in its bucket's ``hot`` set, which is how the expiry sweep finds
  idle sessions without scanning.
- On a full Redis (``maxmemory``), a write script is refused whole at its first write command (Redis
  checks memory there, and a script is atomic): nothing is written. Scripts that free memory or must
  land after a committed flush are declared ``allow-oom``.

Field names, entry kinds and memory types come from ``record.py``, key suffixes from ``keys.py``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import AsyncScript

from session_svc.ops.telemetry import RECORDER, REDIS_SECONDS
from session_svc.record import keys as k
from session_svc.record.fields import (
    LIST_FIELDS,
    MEMORY_ALL,
    MEMORY_STAT,
    MESSAGE_FIELDS,
    ROLE_STAT,
    Kind,
    MemoryType,
    lua_strings,
)
from session_svc.record.keys import UserKeys
from session_svc.storage.coalesce import Coalescer

Arg = str | int | float


@dataclass(frozen=True)
class Lua:
    keys: tuple[str, ...]
    args: tuple[str, ...]
    body: str
    allow_oom: bool = False

    @property
    def source(self) -> str:
        lines = ["#!lua flags=allow-oom"] if self.allow_oom else []
        if self.keys:
            bound = ", ".join(f"KEYS[{i}]" for i in range(1, len(self.keys) + 1))
            lines.append(f"local {', '.join(self.keys)} = {bound}")
        if self.args:
            bound = ", ".join(f"ARGV[{i}]" for i in range(1, len(self.args) + 1))
            lines.append(f"local {', '.join(self.args)} = {bound}")
        lines.append(f"local REST = {len(self.args) + 1}")
        return "\n".join(lines) + "\n" + self.body


# Idempotency records and rate limits -------------------------------------------------------------------

# Length of a request fingerprint (hex digits); a record starts with it.
FINGERPRINT_LEN = 32


def guarded(lua: Lua) -> Lua:
    """``lua`` behind the checks of a write sent with an Idempotency-Key or under a rate limit, in the
    same script (so still one round trip, and atomic with the write):

    1. Idempotency: if ``idem`` holds a record, the reply is ``{'replay', record}`` when it starts with
       this request's fingerprint ``idem_fp``, else ``{'mismatch'}``; nothing is written, nothing
       charged. ``idem_fp`` empty: no key was sent.
    2. Rate limit (``rl_rate`` writes per minute, ``'0'`` = off): the user's token bucket ``limit``
       (size ``rl_burst``) is refilled for the time since its last write; under one token, the reply is
       ``{'limited', seconds until one is there}`` and nothing is written.
    3. The write itself. Only an ``ok`` reply takes a token and records ``idem_fp .. idem_made ..
       extra`` for ``idem_ttl`` seconds, where ``extra`` is what the script made (a sequence number, or
       the session hash as JSON). Failures (missing, cold, conflict, precondition) are not recorded:
       they wrote nothing, and a retry is evaluated afresh (``cold`` is retried after a rehydration, and
       must not be taken for an answer).

    ``rl_now`` is the caller's clock (microseconds). A process whose clock is behind the bucket's last
    write refills nothing until it catches up: skew delays tokens, it never creates any.
    """
    body = f"""
local function write()
{lua.body}
end
if idem_fp ~= '' then
  local rec = redis.call('GET', idem)
  if rec then
    if string.sub(rec, 1, {FINGERPRINT_LEN}) == idem_fp then return {{'replay', rec}} end
    return {{'mismatch'}}
  end
end
local rl_per_us, rl_cap, rl_tokens, rl_ts
if rl_rate ~= '0' then
  rl_per_us, rl_cap, rl_ts = tonumber(rl_rate) / 60e6, tonumber(rl_burst), tonumber(rl_now)
  rl_tokens = rl_cap
  local b = redis.call('HMGET', limit, 't', 'ts')
  if b[1] then
    local last = tonumber(b[2])
    if rl_ts < last then rl_ts = last end
    rl_tokens = math.min(rl_cap, tonumber(b[1]) + (rl_ts - last) * rl_per_us)
  end
  if rl_tokens < 1 then return {{'limited', math.max(1, math.ceil((1 - rl_tokens) / rl_per_us / 1e6))}} end
end
local reply = write()
if reply[1] == 'ok' then
  if rl_rate ~= '0' then
    redis.call('HSET', limit, 't', rl_tokens - 1, 'ts', rl_ts)
    redis.call('PEXPIRE', limit, math.ceil(rl_cap / rl_per_us / 1000) + 1000)
  end
  if idem_fp ~= '' then
    local extra = reply[2] or ''
    if type(extra) == 'table' then extra = cjson.encode(extra) end
    redis.call('SET', idem, idem_fp .. idem_made .. extra, 'EX', idem_ttl)
  end
end
return reply
"""
    guard_args = ("idem_fp", "idem_made", "idem_ttl", "rl_rate", "rl_burst", "rl_now")
    return Lua(keys=(*lua.keys, "idem", "limit"), args=(*lua.args, *guard_args), body=body)


class Guard(NamedTuple):
    """The checks of one guarded write (``guarded``): its idempotency record and the user's limit.
    (A named tuple: built on every guarded write, and a frozen dataclass costs several times more.)"""

    idem_key: str  # the record's key (in the user's bucket); unused when ``fingerprint`` is empty
    fingerprint: str  # FINGERPRINT_LEN hex digits, or "" without an Idempotency-Key
    made: str  # what the caller made for this request (ids, times), stored to rebuild the answer
    ttl: int  # seconds the record is kept
    limit_key: str
    rate: int  # writes per minute, 0 = no limit
    burst: int
    now: int  # microseconds

    def keys(self) -> dict[str, str]:
        return {"idem": self.idem_key, "limit": self.limit_key}

    def args(self) -> dict[str, Arg]:
        return {"idem_fp": self.fingerprint, "idem_made": self.made, "idem_ttl": self.ttl,
                "rl_rate": self.rate, "rl_burst": self.burst, "rl_now": self.now}  # fmt: skip


class Script:
    """One registered script, called with its keys and arguments by name; a direct call is timed
    (``session_redis_call_duration_seconds{script=name}``), a call queued on a pipeline is not."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        lua: Lua,
        name: str,
        coalescer: Coalescer | None = None,
        durable: bool = False,
    ) -> None:
        """``durable``: a write the API acknowledges; with REDIS_WAIT_REPLICAS its reply waits for WAIT."""
        self.lua = lua
        self.name = name
        self.durable = durable
        self._labels = (name,)
        self._source = lua.source  # built once: ``Lua.source`` assembles it on every access
        self._script: AsyncScript = redis.register_script(self._source)  # type: ignore[misc]
        self._coalescer = coalescer

    def __call__(
        self,
        keys: Mapping[str, str],
        args: Mapping[str, Arg],
        rest: Sequence[Arg] = (),
        client: Pipeline | ClusterPipeline | None = None,
    ) -> Awaitable[Any]:
        if len(keys) != len(self.lua.keys) or len(args) != len(self.lua.args):
            raise TypeError(f"expected keys {self.lua.keys} and args {self.lua.args}")
        key_list = [keys[n] for n in self.lua.keys]
        arg_list = [*(args[n] for n in self.lua.args), *rest]
        if client is None and self._coalescer is not None:
            call = self._coalescer.call(self._script.sha, self._source, key_list, arg_list, self.durable)
        else:
            call = self._script(keys=key_list, args=arg_list, client=client)  # type: ignore[arg-type]
        return call if client is not None or not RECORDER.enabled else self._timed(call)

    async def _timed(self, call: Awaitable[Any]) -> Any:
        start = time.perf_counter()
        try:
            return await call
        finally:
            RECORDER.observe(REDIS_SECONDS, self._labels, time.perf_counter() - start)


# Shared Lua: ownership and the user's indexes -----------------------------------------------------------

_OWNER = """
local function owner_state(skey, uidx, sid, uid)
  local owner = redis.call('HGET', skey, 'user_id')
  if not owner then
    if redis.call('ZSCORE', uidx, sid) then return 'cold' end
    return 'missing'
  end
  if owner ~= uid then return 'missing' end
  return nil
end
local function touch(uidx, aidx, status, now, sid)
  redis.call('ZADD', uidx, now, sid)
  if status == 'active' then redis.call('ZADD', aidx, now, sid) end
end
"""

# The message's stream fields, each from the argument ``msg_<field>``; generated from record.py.
_MESSAGE_ARGS = tuple(f"msg_{f}" for f in MESSAGE_FIELDS)
_MESSAGE_PAIRS = ", ".join(f"'{f}', msg_{f}" for f in MESSAGE_FIELDS)
_MESSAGE_ARG_OF = tuple(zip(_MESSAGE_ARGS, MESSAGE_FIELDS, strict=True))


# The API's scripts ---------------------------------------------------------------------------------------

CREATE_SESSION = Lua(
    keys=("session", "user_index", "active_index", "stats", "outbox", "hot"),
    args=("sid", "uid", "title", "conversation_data", "metadata", "session_summary", "now"),
    body=f"""
if redis.call('EXISTS', session) == 1 then return {{'conflict', 'exists'}} end
redis.call('HSET', session, 'session_id', sid, 'user_id', uid, 'title', title, 'status', 'active',
  'conversation_data', conversation_data, 'metadata', metadata, 'session_summary', session_summary,
  'message_count', 0, 'total_tokens', 0, 'cost_micros', 0, 'memory_count', 0,
  'created_at', now, 'updated_at', now, 'last_activity', now, 'v', 1, 'fv', 0, 'mfirst', 1)
redis.call('ZADD', user_index, now, sid)
redis.call('ZADD', active_index, now, sid)
redis.call('HINCRBY', stats, 'sessions', 1)
redis.call('HINCRBY', stats, 'active', 1)
redis.call('XADD', outbox, '*', 'k', '{Kind.session}', 'sid', sid, 'uid', uid, 'v', 1)
redis.call('ZADD', hot, now, sid)
return {{'ok'}}
""",
)

GET_SESSION = Lua(
    keys=("session", "user_index"),
    args=("sid", "uid"),
    body=_OWNER
    + """
local state = owner_state(session, user_index, sid, uid)
if state then return {state} end
return {'ok', redis.call('HGETALL', session)}
""",
)

# The guide's state machine: active -> completed -> archived, active -> ended. Asking for the current
# status is allowed; a request that changes nothing writes nothing (so ending twice is a no-op).
# ``idle_before`` (housekeeping): change the session only if its last activity is older than that.
# ``if_match`` (If-Match): "" or "*" (any session), else the versions it may have, as ",3,4,"; any other
# version is ``{'precondition', v}`` and nothing changes. REST: field/value pairs to set.
UPDATE_SESSION = Lua(
    keys=("session", "user_index", "active_index", "stats", "outbox", "hot"),
    args=("sid", "uid", "now", "new_status", "idle_before", "if_match"),
    body=_OWNER
    + f"""
local state = owner_state(session, user_index, sid, uid)
if state then return {{state}} end
if if_match ~= '' and if_match ~= '*' then
  local v = redis.call('HGET', session, 'v')
  if not string.find(if_match, ',' .. v .. ',', 1, true) then return {{'precondition', v}} end
end
local cur = redis.call('HGET', session, 'status')
local moves = {{active = {{completed = true, ended = true}}, completed = {{archived = true}}}}
if idle_before ~= '' and tonumber(redis.call('HGET', session, 'last_activity')) >= tonumber(idle_before) then
  return {{'conflict', 'busy'}}
end
if new_status ~= '' and new_status ~= cur then
  if not (moves[cur] and moves[cur][new_status]) then return {{'conflict', cur}} end
elseif #ARGV < REST then
  return {{'ok', redis.call('HGETALL', session)}}
end
if new_status ~= '' and new_status ~= cur then
  redis.call('HSET', session, 'status', new_status)
  if cur == 'active' then redis.call('ZREM', active_index, sid) end
  redis.call('HINCRBY', stats, cur, -1)
  redis.call('HINCRBY', stats, new_status, 1)
end
for i = REST, #ARGV, 2 do redis.call('HSET', session, ARGV[i], ARGV[i + 1]) end
redis.call('HSET', session, 'updated_at', now)
local v = redis.call('HINCRBY', session, 'v', 1)
redis.call('XADD', outbox, '*', 'k', '{Kind.session}', 'sid', sid, 'uid', uid, 'v', v)
redis.call('ZADD', hot, now, sid)
return {{'ok', redis.call('HGETALL', session)}}
""",
)

# Counters and the sequence number change in the same step as the append; the message's stream id is
# <seq>-0, so a page of messages is one XRANGE. ``msg_ts`` is the time of the write.
APPEND_MESSAGE = Lua(
    keys=("session", "messages", "user_index", "active_index", "stats", "outbox", "hot"),
    args=("sid", "uid", *_MESSAGE_ARGS),
    body=_OWNER
    + f"""
local state = owner_state(session, user_index, sid, uid)
if state then return {{state}} end
local status = redis.call('HGET', session, 'status')
if status ~= 'active' then return {{'conflict', status}} end
local seq = redis.call('HINCRBY', session, 'message_count', 1)
redis.call('HINCRBY', session, 'total_tokens', msg_tokens)
redis.call('HINCRBY', session, 'cost_micros', msg_cost)
local v = redis.call('HINCRBY', session, 'v', 1)
redis.call('HSET', session, 'updated_at', msg_ts, 'last_activity', msg_ts)
redis.call('XADD', messages, seq .. '-0', {_MESSAGE_PAIRS})
touch(user_index, active_index, status, msg_ts, sid)
redis.call('HINCRBY', stats, 'messages', 1)
redis.call('HINCRBY', stats, '{ROLE_STAT}' .. msg_role, 1)
redis.call('HINCRBY', stats, 'tokens', msg_tokens)
redis.call('HINCRBY', stats, 'cost_micros', msg_cost)
redis.call('XADD', outbox, '*', 'k', '{Kind.message}', 'sid', sid, 'uid', uid, 'v', v, 'seq', seq,
  {_MESSAGE_PAIRS})
redis.call('ZADD', hot, msg_ts, sid)
return {{'ok', seq}}
""",
)

# Messages below ``mfirst`` are only in Postgres (the session was rehydrated after leaving Redis).
LIST_MESSAGES = Lua(
    keys=("session", "messages", "user_index"),
    args=("sid", "uid", "lo", "hi"),
    body=_OWNER
    + "local FIELDS = {"
    + ", ".join(f"'{f}'" for f in MESSAGE_FIELDS)
    + "}\n"
    + """
local state = owner_state(session, user_index, sid, uid)
if state then return {state} end
local h = redis.call('HMGET', session, 'message_count', 'mfirst')
local from = math.max(tonumber(lo), tonumber(h[2]))
local out = {'ok', h[1], h[2]}
if from <= tonumber(hi) then
  -- Flat: each entry's id, then its fields' values in FIELDS order (a third of the reply's elements).
  for _, e in ipairs(redis.call('XRANGE', messages, from .. '-0', hi .. '-0')) do
    local kv, f = e[2], {}
    for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
    out[#out + 1] = e[1]
    for _, name in ipairs(FIELDS) do out[#out + 1] = f[name] or false end
  end
end
return out
""",
)

# Archived and ended sessions are read-only; a completed one still takes memories (e.g. its summary).
CREATE_MEMORY = Lua(
    keys=(
        "session",
        "memories",
        "index_all",
        "index_type",
        "user_index",
        "active_index",
        "stats",
        "outbox",
        "hot",
    ),
    args=("sid", "uid", "now", "memory_type", "doc"),
    body=_OWNER
    + f"""
local state = owner_state(session, user_index, sid, uid)
if state then return {{state}} end
local status = redis.call('HGET', session, 'status')
if status == 'archived' or status == 'ended' then return {{'conflict', status}} end
local seq = redis.call('HINCRBY', session, 'memory_count', 1)
local v = redis.call('HINCRBY', session, 'v', 1)
redis.call('HSET', session, 'updated_at', now, 'last_activity', now)
redis.call('HSET', memories, seq, doc)
redis.call('ZADD', index_all, seq, seq)
redis.call('ZADD', index_type, seq, seq)
touch(user_index, active_index, status, now, sid)
redis.call('HINCRBY', stats, 'memories', 1)
redis.call('HINCRBY', stats, '{MEMORY_STAT}' .. memory_type, 1)
redis.call('XADD', outbox, '*', 'k', '{Kind.memory}', 'sid', sid, 'uid', uid, 'v', v, 'seq', seq,
  'doc', doc)
redis.call('ZADD', hot, now, sid)
return {{'ok', seq}}
""",
)

# ``start``/``stop``: ranks, newest first.
LIST_MEMORIES = Lua(
    keys=("session", "memories", "index", "user_index"),
    args=("sid", "uid", "start", "stop"),
    body=_OWNER
    + """
local state = owner_state(session, user_index, sid, uid)
if state then return {state} end
local total = redis.call('ZCARD', index)
local seqs = redis.call('ZREVRANGE', index, start, stop)
local docs = {}
if #seqs > 0 then docs = redis.call('HMGET', memories, unpack(seqs)) end
return {'ok', total, seqs, docs}
""",
)

# ``start``/``stop``: ranks, newest activity first. The session keys are built here from the bucket's
# prefix rather than passed in, because the page is only known here; they share the index's hash tag,
# so the script still touches a single slot.
# The sweep trims old sessions out of the index (``trimmed``: how many, and ``w``, the latest last
# activity among them). Then the full listing is the index entries newer than ``w`` (``newer``, the
# first ranks), followed by every session of the user with last activity <= w, which only Postgres
# holds in full (keyset (last_activity, session_id) <= w); ``total`` adds the trimmed count. With
# ``every`` = 0 (the active index: active sessions are never trimmed) it is the index alone.
# A trimmed session written again is back in the index, newer than ``w``, while Postgres may still have
# its old row (until the worker commits the write): those (``back:<sid>`` in ``trimmed``, unflushed)
# are named in ``skip``, for the Postgres part to leave out. Read-only, so it runs on a full Redis.
# Reply: {total, sids, rows, newer, w or '', skip}.
LIST_USER_SESSIONS = Lua(
    keys=("user_index", "trimmed"),
    args=("bucket_prefix", "start", "stop", "every"),
    body=f"""
local total = redis.call('ZCARD', user_index)
local newer, w, skip = total, '', {{}}
if every == '1' then
  local t = redis.call('HMGET', trimmed, 'n', 'w')
  if t[1] and tonumber(t[1]) > 0 then
    w = t[2]
    newer = redis.call('ZCOUNT', user_index, '(' .. w, '+inf')
    total = total + tonumber(t[1])
    local fields = redis.call('HKEYS', trimmed)
    for _, f in ipairs(fields) do
      if string.sub(f, 1, 5) == 'back:' then
        local sid = string.sub(f, 6)
        local h = redis.call('HMGET', bucket_prefix .. '{k.SESSION}:' .. sid, 'v', 'fv')
        local score = redis.call('ZSCORE', user_index, sid)
        if h[1] and h[1] ~= h[2] and score and tonumber(score) > tonumber(w) then skip[#skip + 1] = sid end
      end
    end
  end
end
local sids, rows = {{}}, {{}}
local last = math.min(tonumber(stop), newer - 1)
if tonumber(start) <= last then sids = redis.call('ZREVRANGE', user_index, start, last) end
for i, sid in ipairs(sids) do
  rows[i] = redis.call('HMGET', bucket_prefix .. '{k.SESSION}:' .. sid, {lua_strings(LIST_FIELDS)})
end
return {{total, sids, rows, newer, w, skip}}
""",
)

# Brings a cold session back from Postgres. REST: ``n`` field/value pairs of the session hash, then
# (seq, memory_type, doc) triples. If another request already did, it changes nothing. If the row
# read from Postgres is older than the version the session had when it was last evicted (the read
# raced another rehydrate-write-flush-evict cycle), it refuses (-1): the caller reads Postgres again.
# The session counts as written now for the sweep, so it is not evicted again before the write lands.
REHYDRATE = Lua(
    keys=(
        "session",
        "memories",
        "user_index",
        "active_index",
        "index_prefix",
        "hot",
        "gone",
        "stats",
        "trimmed",
    ),
    args=("sid", "now", "n"),
    body=f"""
if redis.call('EXISTS', session) == 1 then return 0 end
local last = REST - 1 + 2 * tonumber(n)
local h = {{}}
for i = REST, last, 2 do h[ARGV[i]] = ARGV[i + 1] end
local evicted_at = redis.call('GET', gone)
if evicted_at and tonumber(evicted_at) > tonumber(h['v']) then return -1 end
for i = REST, last, 2 do redis.call('HSET', session, ARGV[i], ARGV[i + 1]) end
for i = last + 1, #ARGV, 3 do
  redis.call('HSET', memories, ARGV[i], ARGV[i + 2])
  redis.call('ZADD', index_prefix .. '{MEMORY_ALL}', ARGV[i], ARGV[i])
  redis.call('ZADD', index_prefix .. ARGV[i + 1], ARGV[i], ARGV[i])
end
if not redis.call('ZSCORE', user_index, sid) then
  -- Trimmed from the index by the sweep: counted there no more, and marked ``back`` until it leaves
  -- Redis again (see LIST_USER_SESSIONS).
  local n = tonumber(redis.call('HGET', trimmed, 'n') or '0')
  if n > 1 then
    redis.call('HINCRBY', trimmed, 'n', -1)
    redis.call('HSET', trimmed, 'back:' .. sid, 1)
  elseif n == 1 then
    redis.call('DEL', trimmed)
  end
end
redis.call('ZADD', user_index, 'NX', h['last_activity'], sid)
if h['status'] == 'active' then redis.call('ZADD', active_index, 'NX', h['last_activity'], sid) end
redis.call('ZADD', hot, now, sid)
redis.call('DEL', gone)
redis.call('HINCRBY', stats, 'rehydrations', 1)
return 1
""",
)


# The workers' scripts ------------------------------------------------------------------------------------

# How long the eviction marker ``g:<sid>`` outlives an eviction: longer than any request in flight.
GONE_TTL_S = 86_400

# Every memory index key of a session, from its prefix ``P:{bNN}:yi:<sid>:``.
_INDEX_KEYS = ", ".join(f"yi .. '{t}'" for t in (MEMORY_ALL, *MemoryType))

# REST: session ids. Evicts those that are idle (hot-set score, i.e. last write or rehydration, before
# ``cutoff``) and fully flushed (v == fv), unless an outbox entry of theirs failed (``stuck``: kept
# until an operator has looked at the dead letter). A write that raced the sweep has bumped v and the
# score and wins: the session stays. Never a blind DEL, never a TTL on unflushed data. The user's
# indexes keep the session id (that is how a cold session is still listed and found), and a marker
# ``g:<sid>`` keeps the version it left with, so a stale copy read before the eviction can never be
# brought back. The marker only has to outlive a request that read Postgres before the eviction: it
# expires after a day. A ``back`` mark in the user's ``trimmed`` hash (see LIST_USER_SESSIONS) goes
# with the session: its row in Postgres is current now. ``allow-oom``: eviction is how a full Redis gets
# its memory back.
EVICT = Lua(
    keys=("hot",),
    args=("bucket_prefix", "cutoff"),
    allow_oom=True,
    body=f"""
local evicted = 0
for i = REST, #ARGV do
  local sid = ARGV[i]
  local skey = bucket_prefix .. '{k.SESSION}:' .. sid
  local h = redis.call('HMGET', skey, 'v', 'fv', 'stuck', 'user_id')
  local score = redis.call('ZSCORE', hot, sid)
  if not h[1] then
    redis.call('ZREM', hot, sid)
  elseif h[1] == h[2] and not h[3] and score and tonumber(score) < tonumber(cutoff) then
    local yi = bucket_prefix .. '{k.MEMORY_INDEX}:' .. sid .. ':'
    redis.call('DEL', skey, bucket_prefix .. '{k.MESSAGES}:' .. sid, bucket_prefix .. '{k.MEMORIES}:' .. sid,
      {_INDEX_KEYS})
    redis.call('ZREM', hot, sid)
    redis.call('SET', bucket_prefix .. '{k.GONE}:' .. sid, h[1], 'EX', {GONE_TTL_S})
    redis.call('HDEL', bucket_prefix .. '{k.TRIMMED}:' .. h[4], 'back:' .. sid)
    evicted = evicted + 1
  end
end
return evicted
""",
)

# Bounds the user indexes. REST: (sid, uid) pairs of sessions of this bucket that Postgres says are not
# active and were last written before the retention (``workers/expiry.trim_user_indexes``). Each that is
# not held in Redis (not in ``hot``: nothing newer than Postgres) and is still in its user's index leaves
# the index and is counted in the user's ``trimmed`` hash (``n``, and ``w`` the latest last activity
# trimmed). The other keys are built from the bucket's prefix, in the bucket's slot; running it twice
# changes nothing more. ``allow-oom``: it frees memory. Returns how many were trimmed.
TRIM_USER_INDEXES = Lua(
    keys=("hot",),
    args=("bucket_prefix",),
    allow_oom=True,
    body=f"""
local trimmed = 0
for i = REST, #ARGV, 2 do
  local sid, uid = ARGV[i], ARGV[i + 1]
  if not redis.call('ZSCORE', hot, sid) then
    local uidx = bucket_prefix .. '{k.USER_INDEX}:' .. uid
    local score = redis.call('ZSCORE', uidx, sid)
    if score then
      redis.call('ZREM', uidx, sid)
      local t = bucket_prefix .. '{k.TRIMMED}:' .. uid
      redis.call('HINCRBY', t, 'n', 1)
      local w = redis.call('HGET', t, 'w')
      if not w or tonumber(w) < tonumber(score) then redis.call('HSET', t, 'w', score) end
      trimmed = trimmed + 1
    end
  end
end
return trimmed
""",
)


# After COMMIT: acknowledges the entries and records the flushed version in one atomic step, so a
# session is never left with its rows committed, its entries acknowledged and ``fv`` behind (it could
# then never be evicted). REST: ``n`` outbox entry ids, then (sid, version, ",id1,id2,...,") triples.
# The flushed version only ever rises (batches may commit out of order). A session marked ``stuck`` by
# a failed entry is released once that very entry has been committed. ``allow-oom``: it overwrites a
# number and removes pending entries, and it is what lets a full Redis evict flushed sessions;
# refusing it on a full Redis would pin every session it covers.
MARK_FLUSHED = Lua(
    keys=("hot", "outbox"),
    args=("bucket_prefix", "group", "n"),
    allow_oom=True,
    body=f"""
local last = REST - 1 + tonumber(n)
for i = REST, last, 500 do
  redis.call('XACK', outbox, group, unpack(ARGV, i, math.min(i + 499, last)))
end
for i = last + 1, #ARGV, 3 do
  local skey = bucket_prefix .. '{k.SESSION}:' .. ARGV[i]
  local fv = redis.call('HGET', skey, 'fv')
  if fv and tonumber(fv) < tonumber(ARGV[i + 1]) then redis.call('HSET', skey, 'fv', ARGV[i + 1]) end
  local stuck = redis.call('HGET', skey, 'stuck')
  if stuck and string.find(ARGV[i + 2], ',' .. stuck .. ',', 1, true) then
    redis.call('HDEL', skey, 'stuck')
  end
end
return 1
""",
)

# Marks the session (only if it is in Redis) so the sweep keeps it there until that entry commits.
MARK_STUCK = Lua(
    keys=("session",),
    args=("entry_id",),
    allow_oom=True,
    body="""
if redis.call('EXISTS', session) == 1 then redis.call('HSET', session, 'stuck', entry_id) end
return 1
""",
)

# Creates the consumer group (and the stream) unless it exists. ``allow-oom``: a worker that starts
# while Redis is full must still be able to drain it, which is what frees memory.
ENSURE_GROUP = Lua(
    keys=("outbox",),
    args=("group",),
    allow_oom=True,
    body="""
local r = redis.pcall('XGROUP', 'CREATE', outbox, group, '0', 'MKSTREAM')
if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP', 1, true) then return r end
return 1
""",
)

# An outbox entry that kept failing moves to its bucket's dead-letter stream and is acknowledged, in one
# step (a MULTI would do on a standalone Redis; redis-py's cluster client has no transactions). The dead
# entry's fields follow the named arguments as field/value pairs.
DEAD_LETTER = Lua(
    keys=("outbox", "dead"),
    args=("group", "entry_id"),
    body="""
redis.call('XADD', dead, '*', unpack(ARGV, REST))
return redis.call('XACK', outbox, group, entry_id)
""",
)

# Reconciliation: a session whose writes are not all flushed (v > fv) although the outbox holds nothing
# that old any more has lost outbox entries (e.g. a Redis failover dropped them). Its messages and
# memories are written to the outbox again, one bounded chunk per call so that a long history never
# lands in Redis at once, then its snapshot. ``phase``: 'm' messages, 'y' memories, 's' the session;
# ``cursor``: the last seq sent in this phase; at most ``most`` entries or about ``budget`` bytes.
# All inserts are idempotent, so re-sending what Postgres already has is harmless. Message and memory
# entries carry the flushed version ``fv`` (committing them does not make the session evictable); only
# the snapshot carries ``v``, and it is written after every chunk. Returns {next phase or 'done', next
# cursor, entries written}.
RESYNC = Lua(
    keys=("session", "messages", "memories", "outbox"),
    args=("sid", "phase", "cursor", "most", "budget"),
    body=f"""
local h = redis.call('HMGET', session, 'v', 'fv', 'stuck', 'user_id', 'memory_count')
if not h[1] or h[1] == h[2] or h[3] then return {{'done', 0, 0}} end
local uid, at, limit, room = h[4], tonumber(cursor), tonumber(most), tonumber(budget)
local n, bytes = 0, 0
if phase == 'm' then
  local entries = redis.call('XRANGE', messages, '(' .. at .. '-0', '+', 'COUNT', limit)
  for _, e in ipairs(entries) do
    at = tonumber(string.match(e[1], '^(%d+)'))
    local entry = {{'k', '{Kind.message}', 'sid', sid, 'uid', uid, 'v', h[2], 'seq', at}}
    for _, x in ipairs(e[2]) do
      entry[#entry + 1] = x
      bytes = bytes + #x
    end
    redis.call('XADD', outbox, '*', unpack(entry))
    n = n + 1
    if bytes >= room then return {{'m', at, n}} end
  end
  if #entries == limit then return {{'m', at, n}} end
  return {{'y', 0, n}}
elseif phase == 'y' then
  local last = tonumber(h[5])
  while at < last and n < limit and bytes < room do
    at = at + 1
    local doc = redis.call('HGET', memories, at)
    if doc then
      redis.call('XADD', outbox, '*', 'k', '{Kind.memory}', 'sid', sid, 'uid', uid, 'v', h[2],
        'seq', at, 'doc', doc)
      n = n + 1
      bytes = bytes + #doc
    end
  end
  if at < last then return {{'y', at, n}} end
  return {{'s', 0, n}}
end
redis.call('XADD', outbox, '*', 'k', '{Kind.session}', 'sid', sid, 'uid', uid, 'v', h[1])
return {{'done', 0, n + 1}}
""",
)

# A worker's heartbeat (see ``heartbeat.py``). Also forgets heartbeats of workers gone for longer than
# ``forget_after`` seconds (each start has a new name). ``allow-oom``: it overwrites a field of the same
# size, and a full Redis is exactly when the operator needs to know whether the worker is still there.
BEAT = Lua(
    keys=("workers",),
    args=("name", "doc", "now", "forget_after"),
    allow_oom=True,
    body="""
redis.call('HSET', workers, name, doc)
local all = redis.call('HGETALL', workers)
for i = 1, #all, 2 do
  local ok, hb = pcall(cjson.decode, all[i + 1])
  if not ok or type(hb) ~= 'table' or tonumber(hb['at']) == nil
      or tonumber(hb['at']) < tonumber(now) - tonumber(forget_after) then
    redis.call('HDEL', workers, all[i])
  end
end
return 1
""",
)


# Registration and typed calls --------------------------------------------------------------------------


class Scripts:
    """Every script, registered once on one client; one typed method per script."""

    def __init__(
        self, redis: Redis | RedisCluster, coalesce: bool = False, wait: tuple[int, int] = (0, 0)
    ) -> None:
        """``coalesce``: direct calls made in the same loop turn share one pipeline (``coalesce.py``);
        ``wait``: (replicas, timeout ms) a durable write waits for (REDIS_WAIT_REPLICAS)."""
        c = self.coalescer = Coalescer(redis, *wait) if coalesce else None
        self._create_session = Script(redis, CREATE_SESSION, "create_session", c, durable=True)
        self._get_session = Script(redis, GET_SESSION, "get_session", c)
        self._update_session = Script(redis, UPDATE_SESSION, "update_session", c, durable=True)
        self._append_message = Script(redis, APPEND_MESSAGE, "append_message", c, durable=True)
        # The same writes behind an idempotency record and a rate limit (``guarded``): a request with
        # neither runs the plain script, exactly as before.
        self._guarded = {
            name: Script(redis, guarded(lua), name, c, durable=True)
            for name, lua in (("create_session", CREATE_SESSION), ("update_session", UPDATE_SESSION),
                              ("append_message", APPEND_MESSAGE), ("create_memory", CREATE_MEMORY))
        }  # fmt: skip
        self._list_messages = Script(redis, LIST_MESSAGES, "list_messages", c)
        self._create_memory = Script(redis, CREATE_MEMORY, "create_memory", c, durable=True)
        self._list_memories = Script(redis, LIST_MEMORIES, "list_memories", c)
        self._list_user_sessions = Script(redis, LIST_USER_SESSIONS, "list_user_sessions", c)
        self._rehydrate = Script(redis, REHYDRATE, "rehydrate", c)
        self._evict = Script(redis, EVICT, "evict", c)
        self._trim_user_indexes = Script(redis, TRIM_USER_INDEXES, "trim_user_indexes", c)
        self._mark_flushed = Script(redis, MARK_FLUSHED, "mark_flushed", c)
        self._mark_stuck = Script(redis, MARK_STUCK, "mark_stuck", c)
        self._ensure_group = Script(redis, ENSURE_GROUP, "ensure_group", c)
        self._dead_letter = Script(redis, DEAD_LETTER, "dead_letter", c)
        self._resync = Script(redis, RESYNC, "resync", c)
        self._beat = Script(redis, BEAT, "beat", c)

    # The API's ----------------------------------------------------------------------------------------

    def create_session(
        self,
        uk: UserKeys,
        sid: str,
        *,
        title: str,
        conversation_data: str,
        metadata: str,
        summary: str,
        now: int,
        guard: Guard | None = None,
    ) -> Awaitable[Any]:
        return self._write(
            self._create_session,
            guard,
            {"session": uk.session(sid), "user_index": uk.sessions, "active_index": uk.active,
             "stats": uk.stats, "outbox": uk.outbox, "hot": uk.hot},
            {"sid": sid, "uid": uk.user_id, "title": title, "conversation_data": conversation_data,
             "metadata": metadata, "session_summary": summary, "now": now},
        )  # fmt: skip

    def _write(
        self,
        plain: Script,
        guard: Guard | None,
        keys: dict[str, str],
        args: dict[str, Arg],
        rest: Sequence[Arg] = (),
    ) -> Awaitable[Any]:
        if guard is None:
            return plain(keys, args, rest)
        return self._guarded[plain.name]({**keys, **guard.keys()}, {**args, **guard.args()}, rest)

    def get_session(self, uk: UserKeys, sid: str) -> Awaitable[Any]:
        return self._get_session(
            {"session": uk.session(sid), "user_index": uk.sessions}, {"sid": sid, "uid": uk.user_id}
        )

    def update_session(
        self,
        uk: UserKeys,
        sid: str,
        *,
        now: int,
        status: str,
        idle_before: str,
        fields: Sequence[str],
        if_match: str = "",
        guard: Guard | None = None,
    ) -> Awaitable[Any]:
        """``if_match``: "" (no condition), "*" or the versions that may be replaced, as ",3,4,"."""
        return self._write(
            self._update_session,
            guard,
            {"session": uk.session(sid), "user_index": uk.sessions, "active_index": uk.active,
             "stats": uk.stats, "outbox": uk.outbox, "hot": uk.hot},
            {"sid": sid, "uid": uk.user_id, "now": now, "new_status": status, "idle_before": idle_before,
             "if_match": if_match},
            fields,
        )  # fmt: skip

    def append_message(
        self, uk: UserKeys, sid: str, message: Mapping[str, Arg], guard: Guard | None = None
    ) -> Awaitable[Any]:
        """``message``: the stream fields of ``record.MESSAGE_FIELDS``."""
        return self._write(
            self._append_message,
            guard,
            {"session": uk.session(sid), "messages": uk.messages(sid), "user_index": uk.sessions,
             "active_index": uk.active, "stats": uk.stats, "outbox": uk.outbox, "hot": uk.hot},
            {"sid": sid, "uid": uk.user_id, **{arg: message[f] for arg, f in _MESSAGE_ARG_OF}},
        )  # fmt: skip

    def list_messages(self, uk: UserKeys, sid: str, lo: int, hi: int) -> Awaitable[Any]:
        return self._list_messages(
            {"session": uk.session(sid), "messages": uk.messages(sid), "user_index": uk.sessions},
            {"sid": sid, "uid": uk.user_id, "lo": lo, "hi": hi},
        )

    def create_memory(
        self, uk: UserKeys, sid: str, *, now: int, memory_type: str, doc: str, guard: Guard | None = None
    ) -> Awaitable[Any]:
        return self._write(
            self._create_memory,
            guard,
            {"session": uk.session(sid), "memories": uk.memories(sid), "index_all": uk.memory_index(sid),
             "index_type": uk.memory_index(sid, memory_type), "user_index": uk.sessions,
             "active_index": uk.active, "stats": uk.stats, "outbox": uk.outbox, "hot": uk.hot},
            {"sid": sid, "uid": uk.user_id, "now": now, "memory_type": memory_type, "doc": doc},
        )  # fmt: skip

    def list_memories(
        self, uk: UserKeys, sid: str, memory_type: str, start: int, stop: int
    ) -> Awaitable[Any]:
        return self._list_memories(
            {"session": uk.session(sid), "memories": uk.memories(sid),
             "index": uk.memory_index(sid, memory_type), "user_index": uk.sessions},
            {"sid": sid, "uid": uk.user_id, "start": start, "stop": stop},
        )  # fmt: skip

    def list_user_sessions(self, uk: UserKeys, active_only: bool, start: int, stop: int) -> Awaitable[Any]:
        return self._list_user_sessions(
            {"user_index": uk.active if active_only else uk.sessions, "trimmed": uk.trimmed},
            {"bucket_prefix": uk.prefix, "start": start, "stop": stop, "every": 0 if active_only else 1},
        )

    def rehydrate(
        self,
        uk: UserKeys,
        sid: str,
        now: int,
        session: Mapping[str, str],
        memories: Sequence[tuple[int, str, str]],
    ) -> Awaitable[Any]:
        """``memories``: (seq, memory_type, doc) of every memory."""
        rest: list[Arg] = [x for kv in session.items() for x in kv]
        rest += [x for triple in memories for x in triple]
        return self._rehydrate(
            {"session": uk.session(sid), "memories": uk.memories(sid), "user_index": uk.sessions,
             "active_index": uk.active, "index_prefix": uk.memory_index(sid, ""), "hot": uk.hot,
             "gone": uk.gone(sid), "stats": uk.stats, "trimmed": uk.trimmed},
            {"sid": sid, "now": now, "n": len(session)},
            rest,
        )  # fmt: skip

    # The workers' ---------------------------------------------------------------------------------------

    def evict(self, keys: k.Keys, bucket: int, cutoff_us: int, sids: Sequence[str]) -> Awaitable[Any]:
        return self._evict(
            {"hot": keys.hot(bucket)}, {"bucket_prefix": keys.prefix_of(bucket), "cutoff": cutoff_us}, sids
        )

    def trim_user_indexes(
        self,
        keys: k.Keys,
        bucket: int,
        sessions: Sequence[tuple[str, str]],
        client: Pipeline | ClusterPipeline | None,
    ) -> Awaitable[Any]:
        """``sessions``: (sid, uid) pairs of this bucket."""
        return self._trim_user_indexes(
            {"hot": keys.hot(bucket)},
            {"bucket_prefix": keys.prefix_of(bucket)},
            [x for pair in sessions for x in pair],
            client=client,
        )

    def mark_flushed(
        self,
        keys: k.Keys,
        bucket: int,
        group: str,
        ids: Sequence[str],
        triples: Sequence[str],
        client: Pipeline | ClusterPipeline | None,
    ) -> Awaitable[Any]:
        """``triples``: (sid, version, ",id1,id2,...,") flattened."""
        return self._mark_flushed(
            {"hot": keys.hot(bucket), "outbox": keys.outbox(bucket)},
            {"bucket_prefix": keys.prefix_of(bucket), "group": group, "n": len(ids)},
            [*ids, *triples],
            client=client,
        )

    def mark_stuck(self, keys: k.Keys, bucket: int, sid: str, entry_id: str) -> Awaitable[Any]:
        return self._mark_stuck({"session": keys.session(bucket, sid)}, {"entry_id": entry_id})

    def ensure_group(
        self, keys: k.Keys, bucket: int, group: str, client: Pipeline | ClusterPipeline | None
    ) -> Awaitable[Any]:
        return self._ensure_group({"outbox": keys.outbox(bucket)}, {"group": group}, client=client)

    def dead_letter(
        self, keys: k.Keys, bucket: int, group: str, entry_id: str, fields: Mapping[str, str]
    ) -> Awaitable[Any]:
        return self._dead_letter(
            {"outbox": keys.outbox(bucket), "dead": keys.dead(bucket)},
            {"group": group, "entry_id": entry_id},
            [x for kv in fields.items() for x in kv],
        )

    def resync(
        self, keys: k.Keys, bucket: int, sid: str, phase: str, cursor: int, most: int, budget: int
    ) -> Awaitable[Any]:
        return self._resync(
            {"session": keys.session(bucket, sid), "messages": keys.messages(bucket, sid),
             "memories": keys.memories(bucket, sid), "outbox": keys.outbox(bucket)},
            {"sid": sid, "phase": phase, "cursor": cursor, "most": most, "budget": budget},
        )  # fmt: skip

    def beat(self, keys: k.Keys, name: str, doc: str, now: float, forget_after: int) -> Awaitable[Any]:
        return self._beat(
            {"workers": keys.workers}, {"name": name, "doc": doc, "now": now, "forget_after": forget_after}
        )
