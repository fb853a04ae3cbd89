"""The workers' scripts: eviction, index trimming, flush bookkeeping, dead letters, resync, heartbeats.

Most are declared ``allow-oom``: they free memory, or must land after a committed flush, so a full
Redis (``maxmemory``) must not refuse them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster

from session_svc.record import keys as k
from session_svc.record.fields import MEMORY_ALL, Kind, MemoryType
from session_svc.storage.coalesce import Coalescer
from session_svc.storage.outbox import GROUP
from session_svc.storage.scripts.call import Lua, Script

# How long the eviction marker ``g:<sid>`` outlives an eviction: longer than any request in flight.
GONE_TTL_S = 86_400

# Every memory index key of a session, from its prefix ``P:{bNN}:yi:<sid>:``.
_INDEX_KEYS = ", ".join(f"yi .. '{t}'" for t in (MEMORY_ALL, *MemoryType))

# REST: session ids. Evicts those that are idle (hot-set score, i.e. last write or rehydration, and
# last write ``updated_at`` before ``cutoff``) and fully flushed: v == fv, and every outbox entry of the
# session acknowledged, i.e. the group has delivered past its newest entry ``oid`` and nothing at or
# below ``oid`` is still pending (message and memory entries point at content that only the session's
# keys hold, and batches of several workers may commit out of order, so v == fv alone does not say it).
# A session without ``oid`` (rehydrated, or written by release 1.0 whose entries carried their content)
# has nothing in the outbox that needs its keys. Never evicted: a session one of whose outbox entries
# failed (``stuck``: kept until an operator has looked at the dead letter). A write that raced the sweep
# has bumped v and wins: the session stays. Never a blind DEL, never a TTL on unflushed data. The user's
# indexes keep the session id (that is how a cold session is still listed and found), and a marker
# ``g:<sid>`` keeps the version it left with, so a stale copy read before the eviction can never be
# brought back. The marker only has to outlive a request that read Postgres before the eviction: it
# expires after a day. A ``back`` mark in the user's ``trimmed`` hash (see LIST_USER_SESSIONS) goes
# with the session: its row in Postgres is current now. ``allow-oom``: eviction is how a full Redis gets
# its memory back.
EVICT = Lua(
    keys=("hot", "outbox"),
    args=("bucket_prefix", "cutoff", "group"),
    allow_oom=True,
    body=f"""
local function id_of(s)
  local ms, n = string.match(s, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(n)
end
local function below(a, b)  -- stream id a < b
  local am, an = id_of(a)
  local bm, bn = id_of(b)
  return am < bm or (am == bm and an < bn)
end
-- What the group has delivered, and the oldest entry it has not acknowledged yet.
local delivered, oldest = nil, nil
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', outbox)
if ok then
  for _, g in ipairs(groups) do
    local f = {{}}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == group then
      delivered = f['last-delivered-id']
      if tonumber(f['pending']) > 0 then oldest = redis.call('XPENDING', outbox, group)[2] end
    end
  end
end
local function acknowledged(oid)
  if not oid then return true end
  if not delivered or below(delivered, oid) then return false end
  return not oldest or below(oid, oldest)
end
local evicted = 0
for i = REST, #ARGV do
  local sid = ARGV[i]
  local skey = bucket_prefix .. '{k.SESSION}:' .. sid
  local h = redis.call('HMGET', skey, 'v', 'fv', 'stuck', 'user_id', 'updated_at', 'oid')
  local score = redis.call('ZSCORE', hot, sid)
  if not h[1] then
    redis.call('ZREM', hot, sid)
  elseif h[1] == h[2] and not h[3] and score and tonumber(score) < tonumber(cutoff)
      and tonumber(h[5]) < tonumber(cutoff) and acknowledged(h[6]) then
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
# that old any more has lost outbox entries (e.g. a Redis failover dropped them). Entries pointing at its
# messages and memories are written to the outbox again, one bounded chunk per call, then its snapshot.
# ``phase``: 'm' messages, 'y' memories, 's' the session; ``cursor``: the last seq sent in this phase; at
# most ``most`` entries per call (each a pointer of about 64 bytes: the content stays where it is). All
# inserts are idempotent, so re-sending what
# Postgres already has is harmless. Message and memory entries carry the flushed version ``fv``
# (committing them does not make the session evictable); only the snapshot carries ``v``, and it is
# written after every chunk. Each call records its newest entry in ``oid``, so the sweep waits for them.
# Returns {next phase or 'done', next cursor, entries written}.
RESYNC = Lua(
    keys=("session", "messages", "memories", "outbox"),
    args=("sid", "phase", "cursor", "most"),
    body=f"""
local h = redis.call('HMGET', session, 'v', 'fv', 'stuck', 'user_id', 'memory_count')
if not h[1] or h[1] == h[2] or h[3] then return {{'done', 0, 0}} end
local uid, at, limit = h[4], tonumber(cursor), tonumber(most)
local n, oid = 0, nil
local function entry(kind, seq)
  oid = redis.call('XADD', outbox, '*', 'k', kind, 'sid', sid, 'uid', uid, 'v', h[2], 'seq', seq)
  n = n + 1
end
local function result(p, c)
  if oid then redis.call('HSET', session, 'oid', oid) end
  return {{p, c, n}}
end
if phase == 'm' then
  local entries = redis.call('XRANGE', messages, '(' .. at .. '-0', '+', 'COUNT', limit)
  for _, e in ipairs(entries) do
    at = tonumber(string.match(e[1], '^(%d+)'))
    entry('{Kind.message}', at)
  end
  if #entries == limit then return result('m', at) end
  return result('y', 0)
elseif phase == 'y' then
  local last = tonumber(h[5])
  while at < last and n < limit do
    at = at + 1
    if redis.call('HEXISTS', memories, at) == 1 then entry('{Kind.memory}', at) end
  end
  if at < last then return result('y', at) end
  return result('s', 0)
end
oid = redis.call('XADD', outbox, '*', 'k', '{Kind.session}', 'sid', sid, 'uid', uid, 'v', h[1])
n = n + 1
return result('done', 0)
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


class WorkerScripts:
    """The workers' scripts, registered once on one client; one typed method per script."""

    def _register_worker(self, redis: Redis | RedisCluster, c: Coalescer | None) -> None:
        self._evict = Script(redis, EVICT, "evict", c)
        self._trim_user_indexes = Script(redis, TRIM_USER_INDEXES, "trim_user_indexes", c)
        self._mark_flushed = Script(redis, MARK_FLUSHED, "mark_flushed", c)
        self._mark_stuck = Script(redis, MARK_STUCK, "mark_stuck", c)
        self._ensure_group = Script(redis, ENSURE_GROUP, "ensure_group", c)
        self._dead_letter = Script(redis, DEAD_LETTER, "dead_letter", c)
        self._resync = Script(redis, RESYNC, "resync", c)
        self._beat = Script(redis, BEAT, "beat", c)

    def evict(self, keys: k.Keys, bucket: int, cutoff_us: int, sids: Sequence[str]) -> Awaitable[Any]:
        return self._evict(
            {"hot": keys.hot(bucket), "outbox": keys.outbox(bucket)},
            {"bucket_prefix": keys.prefix_of(bucket), "cutoff": cutoff_us, "group": GROUP},
            sids,
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
        self, keys: k.Keys, bucket: int, sid: str, phase: str, cursor: int, most: int
    ) -> Awaitable[Any]:
        return self._resync(
            {"session": keys.session(bucket, sid), "messages": keys.messages(bucket, sid),
             "memories": keys.memories(bucket, sid), "outbox": keys.outbox(bucket)},
            {"sid": sid, "phase": phase, "cursor": cursor, "most": most},
        )  # fmt: skip

    def beat(self, keys: k.Keys, name: str, doc: str, now: float, forget_after: int) -> Awaitable[Any]:
        return self._beat(
            {"workers": keys.workers}, {"name": name, "doc": doc, "now": now, "forget_after": forget_after}
        )
