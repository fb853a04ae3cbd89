"""The API's scripts: one per operation on a session, its messages and memories, and their typed calls.

Conventions (every script here):
- All KEYS are in one hash slot (the user's bucket, see ``record/keys.py``).
- The first element of the reply is a ``Reply`` (``call.py``): ``OK``; ``MISSING``; ``COLD``;
  ``CONFLICT`` followed by the current status; ...
- Every write bumps the session's version ``v`` and appends one entry to the bucket's outbox stream in
  the same script, so an acknowledged write is always on its way to Postgres. The worker records the
  highest version it committed in ``fv``; the expiry sweep deletes a session only when ``v == fv``.
- Timestamps are integer microseconds since the epoch, passed in by the caller.
- Every write also scores the session in its bucket's ``hot`` set, which is how the expiry sweep finds
  idle sessions without scanning.
- On a full Redis (``maxmemory``), a write script is refused whole at its first write command (Redis
  checks memory there, and a script is atomic): nothing is written.

Field names, entry kinds and memory types come from ``record/fields.py``, key suffixes from
``record/keys.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from session_svc.record import keys as k
from session_svc.record.fields import (
    LIST_FIELDS,
    MEMORY_ALL,
    MEMORY_STAT,
    MESSAGE_FIELDS,
    READ_ONLY,
    ROLE_STAT,
    TRANSITIONS,
    Kind,
    lua_strings,
    new_session_record,
)
from session_svc.record.keys import UserKeys
from session_svc.storage.coalesce import Coalescer
from session_svc.storage.scripts.call import Arg, Guard, Lua, Script, guarded

# Shared Lua: ownership and the user's indexes -----------------------------------------------------------

_OWNER = """
-- The ownership check and the fields a script needs, in one HMGET: the values of ``...`` (h[2], h[3],
-- ...), or nil and the reply that ends the script.
local function owned(skey, uidx, sid, uid, ...)
  local h = redis.call('HMGET', skey, 'user_id', ...)
  if not h[1] then
    if redis.call('ZSCORE', uidx, sid) then return nil, COLD end
    return nil, MISSING
  end
  if h[1] ~= uid then return nil, MISSING end
  return h
end
-- The ownership check alone: nil, or the reply that ends the script.
local function owner_state(skey, uidx, sid, uid)
  local _, stop = owned(skey, uidx, sid, uid)
  return stop
end
-- The user's indexes are scored by the exact time of the last activity (they order listings).
local function touch(uidx, aidx, status, now, sid)
  redis.call('ZADD', uidx, now, sid)
  if status == ACTIVE then redis.call('ZADD', aidx, now, sid) end
end
-- The bucket's hot set is the sweep's clock, which counts in minutes: it moves by whole seconds, so a
-- write in the same second as the session's previous write (``prev``, its ``updated_at``) leaves it.
-- The sweep checks ``updated_at`` as well, so the lag never lets a session go early.
local function hot_touch(hot, now, prev, sid)
  if not prev or math.floor(tonumber(prev) / 1e6) ~= math.floor(tonumber(now) / 1e6) then
    redis.call('ZADD', hot, now, sid)
  end
end
"""

# The allowed status changes as a Lua table: {active = {completed = true, ...}, ...}.
_MOVES = (
    "{"
    + ", ".join(f"{a} = {{{', '.join(f'{b} = true' for b in to)}}}" for a, to in TRANSITIONS.items())
    + "}"
)

# The message's stream fields, each from the argument ``msg_<field>``; generated from record.py.
_MESSAGE_ARGS = tuple(f"msg_{f}" for f in MESSAGE_FIELDS)
_MESSAGE_PAIRS = ", ".join(f"'{f}', msg_{f}" for f in MESSAGE_FIELDS)
_MESSAGE_ARG_OF = tuple(zip(_MESSAGE_ARGS, MESSAGE_FIELDS, strict=True))


# The API's scripts ---------------------------------------------------------------------------------------

# REST: the new session's hash as field/value pairs (``fields.new_session_record``: every field, at
# version 1), so the record is declared in one place.
CREATE_SESSION = Lua(
    keys=("session", "user_index", "active_index", "stats", "outbox", "hot"),
    args=("sid", "uid", "now"),
    body=f"""
if redis.call('EXISTS', session) == 1 then return {{CONFLICT, EXISTS}} end
local oid = redis.call('XADD', outbox, '*', 'k', '{Kind.session}', 'sid', sid, 'uid', uid, 'v', 1)
redis.call('HSET', session, 'oid', oid, unpack(ARGV, REST))
redis.call('ZADD', user_index, now, sid)
redis.call('ZADD', active_index, now, sid)
redis.call('HINCRBY', stats, 'sessions', 1)
redis.call('HINCRBY', stats, ACTIVE, 1)
redis.call('ZADD', hot, now, sid)
return {{OK}}
""",
)

GET_SESSION = Lua(
    keys=("session", "user_index"),
    args=("sid", "uid"),
    body=_OWNER
    + """
local state = owner_state(session, user_index, sid, uid)
if state then return {state} end
return {OK, redis.call('HGETALL', session)}
""",
)

# The guide's state machine (``fields.TRANSITIONS``). Asking for the current status is allowed; a
# request that changes nothing writes nothing (so ending twice is a no-op).
# ``idle_before`` (housekeeping): change the session only if its last activity is older than that.
# ``if_match`` (If-Match): "" or "*" (any session), else the versions it may have, as ",3,4,"; any other
# version is ``{PRECONDITION, v}`` and nothing changes. REST: field/value pairs to set.
UPDATE_SESSION = Lua(
    keys=("session", "user_index", "active_index", "stats", "outbox", "hot"),
    args=("sid", "uid", "now", "new_status", "idle_before", "if_match"),
    body=_OWNER
    + f"""
local h, stop = owned(session, user_index, sid, uid, 'status', 'v', 'last_activity', 'updated_at')
if not h then return {{stop}} end
local cur, v = h[2], h[3]
if if_match ~= '' and if_match ~= '*' then
  if not string.find(if_match, ',' .. v .. ',', 1, true) then return {{PRECONDITION, v}} end
end
local moves = {_MOVES}
if idle_before ~= '' and tonumber(h[4]) >= tonumber(idle_before) then
  return {{CONFLICT, BUSY}}
end
if new_status ~= '' and new_status ~= cur then
  if not (moves[cur] and moves[cur][new_status]) then return {{CONFLICT, cur}} end
elseif #ARGV < REST then
  return {{OK, redis.call('HGETALL', session)}}
end
if new_status ~= '' and new_status ~= cur then
  redis.call('HSET', session, 'status', new_status)
  if cur == ACTIVE then redis.call('ZREM', active_index, sid) end
  redis.call('HINCRBY', stats, cur, -1)
  redis.call('HINCRBY', stats, new_status, 1)
end
v = tonumber(v) + 1
local oid = redis.call('XADD', outbox, '*', 'k', '{Kind.session}', 'sid', sid, 'uid', uid, 'v', v)
redis.call('HSET', session, 'updated_at', now, 'v', v, 'oid', oid, unpack(ARGV, REST))
hot_touch(hot, now, h[5], sid)
return {{OK, redis.call('HGETALL', session)}}
""",
)

# Counters and the sequence number change in the same step as the append; the message's stream id is
# <seq>-0, so a page of messages is one XRANGE. ``msg_ts`` is the time of the write. The outbox entry
# points at the message (``seq``) rather than copying it: the flusher reads it from the stream. The
# sequence, the version and the session's token and cost totals are read with the ownership check and
# written back by one HSET: exact while below 2^53 (a Lua number is a double), HINCRBY past it.
APPEND_MESSAGE = Lua(
    keys=("session", "messages", "user_index", "active_index", "stats", "outbox", "hot"),
    args=("sid", "uid", *_MESSAGE_ARGS),
    body=_OWNER
    + f"""
local h, stop = owned(session, user_index, sid, uid, 'status', 'message_count', 'v', 'updated_at',
  'total_tokens', 'cost_micros')
if not h then return {{stop}} end
if h[2] ~= ACTIVE then return {{CONFLICT, h[2]}} end
local seq, v = tonumber(h[3]) + 1, tonumber(h[4]) + 1
local tokens, cost = tonumber(h[6]) + tonumber(msg_tokens), tonumber(h[7]) + tonumber(msg_cost)
redis.call('XADD', messages, seq .. '-0', {_MESSAGE_PAIRS})
local oid = redis.call('XADD', outbox, '*', 'k', '{Kind.message}', 'sid', sid, 'uid', uid, 'v', v, 'seq', seq)
if tokens < 2^53 and cost < 2^53 then
  redis.call('HSET', session, 'message_count', seq, 'v', v, 'updated_at', msg_ts, 'last_activity', msg_ts,
    'oid', oid, 'total_tokens', tokens, 'cost_micros', cost)
else  -- past 2^53 a Lua number (a double) is no longer exact: Redis' 64-bit integers take over
  redis.call('HSET', session, 'message_count', seq, 'v', v, 'updated_at', msg_ts, 'last_activity', msg_ts,
    'oid', oid)
  redis.call('HINCRBY', session, 'total_tokens', msg_tokens)
  redis.call('HINCRBY', session, 'cost_micros', msg_cost)
end
touch(user_index, active_index, ACTIVE, msg_ts, sid)
redis.call('HINCRBY', stats, 'messages', 1)
redis.call('HINCRBY', stats, '{ROLE_STAT}' .. msg_role, 1)
redis.call('HINCRBY', stats, 'tokens', msg_tokens)
redis.call('HINCRBY', stats, 'cost_micros', msg_cost)
hot_touch(hot, msg_ts, h[5], sid)
return {{OK, seq}}
""",
)

# Messages below ``mfirst`` are only in Postgres (the session was rehydrated after leaving Redis).
LIST_MESSAGES = Lua(
    keys=("session", "messages", "user_index"),
    args=("sid", "uid", "lo", "hi"),
    body=_OWNER
    + """
local state = owner_state(session, user_index, sid, uid)
if state then return {state} end
local h = redis.call('HMGET', session, 'message_count', 'mfirst')
local from = math.max(tonumber(lo), tonumber(h[2]))
local page = {}
-- The entries as XRANGE gives them ({id, {field, value, ...}}): reshaping them here cost Redis more
-- than the smaller reply saved.
if from <= tonumber(hi) then page = redis.call('XRANGE', messages, from .. '-0', hi .. '-0') end
return {OK, h[1], h[2], page}
""",
)

# Read-only sessions (``fields.READ_ONLY``) take no memories; a completed one still does.
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
local h, stop = owned(session, user_index, sid, uid, 'status', 'memory_count', 'v', 'updated_at')
if not h then return {{stop}} end
local status = h[2]
if {" or ".join(f"status == {s.name.upper()}" for s in READ_ONLY)} then return {{CONFLICT, status}} end
local seq, v = tonumber(h[3]) + 1, tonumber(h[4]) + 1
redis.call('HSET', memories, seq, doc)
redis.call('ZADD', index_all, seq, seq)
redis.call('ZADD', index_type, seq, seq)
local oid = redis.call('XADD', outbox, '*', 'k', '{Kind.memory}', 'sid', sid, 'uid', uid, 'v', v, 'seq', seq)
redis.call('HSET', session, 'memory_count', seq, 'v', v, 'updated_at', now, 'last_activity', now, 'oid', oid)
touch(user_index, active_index, status, now, sid)
redis.call('HINCRBY', stats, 'memories', 1)
redis.call('HINCRBY', stats, '{MEMORY_STAT}' .. memory_type, 1)
hot_touch(hot, now, h[5], sid)
return {{OK, seq}}
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
return {OK, total, seqs, docs}
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
if h['status'] == ACTIVE then redis.call('ZADD', active_index, 'NX', h['last_activity'], sid) end
redis.call('ZADD', hot, now, sid)
redis.call('DEL', gone)
redis.call('HINCRBY', stats, 'rehydrations', 1)
return 1
""",
)


class ApiScripts:
    """The API's scripts, registered once on one client; one typed method per script."""

    def _register_api(self, redis: Redis | RedisCluster, c: Coalescer | None) -> None:
        self._create_session = Script(redis, CREATE_SESSION, "create_session", c, durable=True)
        self._get_session = Script(redis, GET_SESSION, "get_session", c)
        self._update_session = Script(redis, UPDATE_SESSION, "update_session", c, durable=True)
        self._append_message = Script(redis, APPEND_MESSAGE, "append_message", c, durable=True)
        # The same writes behind an idempotency record and a rate limit (``guarded``): a request with
        # neither runs the plain script.
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
        """The new hash is ``fields.new_session_record`` of these values (every field, at version 1)."""
        record = new_session_record(sid, uk.user_id, title, conversation_data, metadata, summary, now)
        return self._write(
            self._create_session,
            guard,
            {"session": uk.session(sid), "user_index": uk.sessions, "active_index": uk.active,
             "stats": uk.stats, "outbox": uk.outbox, "hot": uk.hot},
            {"sid": sid, "uid": uk.user_id, "now": now},
            [x for kv in record.items() for x in kv],
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
