"""The Lua scripts that make each write one atomic server-side step (and each hot read one round trip).

Conventions shared by every session-scoped script:
- KEYS are all in one hash slot (the user's bucket, see ``keys.py``); ``ARGV[1]`` is the session id and
  ``ARGV[2]`` the requesting user id.
- The first element of the reply is a status: ``ok``; ``missing`` (no such session for this user);
  ``cold`` (the session is known to the user's index but its data has left Redis: read it from
  Postgres, or rehydrate it before writing); ``conflict`` followed by the current status.
- Every write bumps the session's version ``v`` and appends one entry to the bucket's outbox stream, in
  the same script, so an acknowledged write is always on its way to Postgres. The worker records the
  highest version it committed in ``fv``; the expiry sweep deletes a session only when ``v == fv``.
- Timestamps are integer microseconds since the epoch, passed in by the caller.
- Every write also scores the session in its bucket's ``hot`` set (always the last KEY), which is how
  the expiry sweep finds idle sessions without scanning.
"""

from __future__ import annotations

# Resolves ownership: the session hash is KEYS[1], the user's index KEYS[uidx].
_PROLOGUE = """
local function owner_state(skey, ukey, sid, uid)
  local owner = redis.call('HGET', skey, 'user_id')
  if not owner then
    if redis.call('ZSCORE', ukey, sid) then return 'cold' end
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

# KEYS: session, user index, user active index, bucket stats, outbox, hot set
# ARGV: sid, uid, title, conversation_data, metadata, session_summary, now
CREATE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'conflict', 'exists'} end
redis.call('HSET', KEYS[1], 'session_id', ARGV[1], 'user_id', ARGV[2], 'title', ARGV[3],
  'status', 'active', 'conversation_data', ARGV[4], 'metadata', ARGV[5], 'session_summary', ARGV[6],
  'message_count', 0, 'total_tokens', 0, 'cost_micros', 0, 'memory_count', 0,
  'created_at', ARGV[7], 'updated_at', ARGV[7], 'last_activity', ARGV[7], 'v', 1, 'fv', 0, 'mfirst', 1)
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'sessions', 1)
redis.call('HINCRBY', KEYS[4], 'active', 1)
redis.call('XADD', KEYS[5], '*', 'k', 's', 'sid', ARGV[1], 'uid', ARGV[2], 'v', 1)
redis.call('ZADD', KEYS[6], ARGV[7], ARGV[1])
return {'ok'}
"""

# KEYS: session, user index
# ARGV: sid, uid
GET_SESSION = (
    _PROLOGUE
    + """
local state = owner_state(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
if state then return {state} end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: session, user index, user active index, bucket stats, outbox, hot set
# ARGV: sid, uid, now, new status or '', idle-before or '', then field/value pairs to set
# The guide's state machine: active -> completed -> archived, active -> ended. Asking for the current
# status is allowed; a request that changes nothing writes nothing (so ending twice is a no-op).
# idle-before (housekeeping): change the session only if its last activity is older than that.
UPDATE_SESSION = (
    _PROLOGUE
    + """
local state = owner_state(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
if state then return {state} end
local cur = redis.call('HGET', KEYS[1], 'status')
local new = ARGV[4]
local moves = {active = {completed = true, ended = true}, completed = {archived = true}}
if ARGV[5] ~= '' and tonumber(redis.call('HGET', KEYS[1], 'last_activity')) >= tonumber(ARGV[5]) then
  return {'conflict', 'busy'}
end
if new ~= '' and new ~= cur then
  if not (moves[cur] and moves[cur][new]) then return {'conflict', cur} end
elseif #ARGV == 5 then
  return {'ok', redis.call('HGETALL', KEYS[1])}
end
if new ~= '' and new ~= cur then
  redis.call('HSET', KEYS[1], 'status', new)
  if cur == 'active' then
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('HINCRBY', KEYS[4], 'active', -1)
  end
end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
local v = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('XADD', KEYS[5], '*', 'k', 's', 'sid', ARGV[1], 'uid', ARGV[2], 'v', v)
redis.call('ZADD', KEYS[6], ARGV[3], ARGV[1])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: session, messages, user index, user active index, bucket stats, outbox, hot set
# ARGV: sid, uid, now, message_id, role, content, message_type, tokens, cost_micros, metadata
# Counters and the sequence number change in the same step as the append; the message's stream id is
# <seq>-0, so a page of messages is one XRANGE.
APPEND_MESSAGE = (
    _PROLOGUE
    + """
local state = owner_state(KEYS[1], KEYS[3], ARGV[1], ARGV[2])
if state then return {state} end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'active' then return {'conflict', status} end
local seq = redis.call('HINCRBY', KEYS[1], 'message_count', 1)
redis.call('HINCRBY', KEYS[1], 'total_tokens', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'cost_micros', ARGV[9])
local v = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3], 'last_activity', ARGV[3])
redis.call('XADD', KEYS[2], seq .. '-0', 'id', ARGV[4], 'role', ARGV[5], 'content', ARGV[6],
  'type', ARGV[7], 'tokens', ARGV[8], 'cost', ARGV[9], 'meta', ARGV[10], 'ts', ARGV[3])
touch(KEYS[3], KEYS[4], status, ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[5], 'messages', 1)
redis.call('HINCRBY', KEYS[5], 'tokens', ARGV[8])
redis.call('HINCRBY', KEYS[5], 'cost_micros', ARGV[9])
redis.call('XADD', KEYS[6], '*', 'k', 'm', 'sid', ARGV[1], 'uid', ARGV[2], 'v', v, 'seq', seq,
  'id', ARGV[4], 'role', ARGV[5], 'content', ARGV[6], 'type', ARGV[7], 'tokens', ARGV[8],
  'cost', ARGV[9], 'meta', ARGV[10], 'ts', ARGV[3])
redis.call('ZADD', KEYS[7], ARGV[3], ARGV[1])
return {'ok', seq}
"""
)

# KEYS: session, messages, user index
# ARGV: sid, uid, first seq, last seq
# Messages below ``mfirst`` are only in Postgres (the session was rehydrated after leaving Redis).
LIST_MESSAGES = (
    _PROLOGUE
    + """
local state = owner_state(KEYS[1], KEYS[3], ARGV[1], ARGV[2])
if state then return {state} end
local h = redis.call('HMGET', KEYS[1], 'message_count', 'mfirst')
local lo = math.max(tonumber(ARGV[3]), tonumber(h[2]))
local hi = tonumber(ARGV[4])
local entries = {}
if lo <= hi then entries = redis.call('XRANGE', KEYS[2], lo .. '-0', hi .. '-0') end
return {'ok', h[1], h[2], entries}
"""
)

# KEYS: session, memories, memory index (all types), memory index (this type), user index,
#       user active index, outbox, hot set
# ARGV: sid, uid, now, memory_type, memory JSON document
# Archived and ended sessions are read-only; a completed one still takes memories (e.g. its summary).
CREATE_MEMORY = (
    _PROLOGUE
    + """
local state = owner_state(KEYS[1], KEYS[5], ARGV[1], ARGV[2])
if state then return {state} end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'archived' or status == 'ended' then return {'conflict', status} end
local seq = redis.call('HINCRBY', KEYS[1], 'memory_count', 1)
local v = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3], 'last_activity', ARGV[3])
redis.call('HSET', KEYS[2], seq, ARGV[5])
redis.call('ZADD', KEYS[3], seq, seq)
redis.call('ZADD', KEYS[4], seq, seq)
touch(KEYS[5], KEYS[6], status, ARGV[3], ARGV[1])
redis.call('XADD', KEYS[7], '*', 'k', 'y', 'sid', ARGV[1], 'uid', ARGV[2], 'v', v, 'seq', seq,
  'doc', ARGV[5])
redis.call('ZADD', KEYS[8], ARGV[3], ARGV[1])
return {'ok', seq}
"""
)

# KEYS: session, memories, memory index to read, user index
# ARGV: sid, uid, start, stop (ranks, newest first)
LIST_MEMORIES = (
    _PROLOGUE
    + """
local state = owner_state(KEYS[1], KEYS[4], ARGV[1], ARGV[2])
if state then return {state} end
local total = redis.call('ZCARD', KEYS[3])
local seqs = redis.call('ZREVRANGE', KEYS[3], ARGV[3], ARGV[4])
local docs = {}
if #seqs > 0 then docs = redis.call('HMGET', KEYS[2], unpack(seqs)) end
return {'ok', total, seqs, docs}
"""
)

LIST_FIELDS = (
    "user_id",
    "title",
    "status",
    "message_count",
    "total_tokens",
    "cost_micros",
    "created_at",
    "updated_at",
    "last_activity",
)

# KEYS: the user's index (all or active-only)
# ARGV: session key prefix of the user's bucket, start, stop (ranks, newest activity first)
# The session keys are built here rather than passed in because the page is only known here; they share
# the index's hash tag, so the script still touches a single slot.
LIST_USER_SESSIONS = """
local total = redis.call('ZCARD', KEYS[1])
local sids = redis.call('ZREVRANGE', KEYS[1], ARGV[2], ARGV[3])
local rows = {}
for i, sid in ipairs(sids) do
  rows[i] = redis.call('HMGET', ARGV[1] .. sid, FIELDS)
end
return {total, sids, rows}
""".replace("FIELDS", ", ".join(f"'{f}'" for f in LIST_FIELDS))

# KEYS: session, memories, user index, user active index, memory index key prefix (``...:yi:<sid>:``),
#       hot set, the session's eviction marker (``g:<sid>``)
# ARGV: sid, now, n, then n field/value pairs of the session hash, then (seq, memory_type, doc) triples
# Brings a cold session back from Postgres. If another request already did, it changes nothing. If the
# row read from Postgres is older than the version the session had when it was last evicted (the read
# raced another rehydrate-write-flush-evict cycle), it refuses (-1): the caller reads Postgres again.
# The session counts as written now for the sweep, so it is not evicted again before the write lands.
REHYDRATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[3])
local h = {}
for i = 4, 3 + 2 * n, 2 do h[ARGV[i]] = ARGV[i + 1] end
local gone = redis.call('GET', KEYS[7])
if gone and tonumber(gone) > tonumber(h['v']) then return -1 end
for i = 4, 3 + 2 * n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 4 + 2 * n, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  redis.call('ZADD', KEYS[5] .. '*', ARGV[i], ARGV[i])
  redis.call('ZADD', KEYS[5] .. ARGV[i + 1], ARGV[i], ARGV[i])
end
redis.call('ZADD', KEYS[3], 'NX', h['last_activity'], ARGV[1])
if h['status'] == 'active' then redis.call('ZADD', KEYS[4], 'NX', h['last_activity'], ARGV[1]) end
redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
redis.call('DEL', KEYS[7])
return 1
"""

# KEYS: hot set of one bucket
# ARGV: session key prefix of the bucket (``P:{bNN}:``), idle cutoff (microseconds), sids...
# Evicts the given sessions that are idle (hot-set score, i.e. last write or rehydration, before the
# cutoff) and fully flushed (v == fv), unless an outbox entry of theirs failed (``stuck``: kept until an
# operator has looked at the dead letter). A write that raced the sweep has bumped v and the score and
# wins: the session stays. Never a blind DEL, never a TTL on unflushed data. The user's indexes keep
# the session id (that is how a cold session is still listed and found), and a marker ``g:<sid>`` keeps
# the version it left with, so a stale copy read before the eviction can never be brought back. The
# marker only has to outlive a request that read Postgres before the eviction: it expires after a day.
# ``allow-oom``: eviction is how a full Redis gets its memory back.
EVICT = """#!lua flags=allow-oom
local evicted = 0
for i = 3, #ARGV do
  local sid = ARGV[i]
  local skey = ARGV[1] .. 's:' .. sid
  local h = redis.call('HMGET', skey, 'v', 'fv', 'stuck')
  local score = redis.call('ZSCORE', KEYS[1], sid)
  if not h[1] then
    redis.call('ZREM', KEYS[1], sid)
  elseif h[1] == h[2] and not h[3] and score and tonumber(score) < tonumber(ARGV[2]) then
    local yi = ARGV[1] .. 'yi:' .. sid .. ':'
    redis.call('DEL', skey, ARGV[1] .. 'm:' .. sid, ARGV[1] .. 'y:' .. sid, yi .. '*', yi .. 'preference',
      yi .. 'conversation', yi .. 'entity', yi .. 'summary', yi .. 'custom')
    redis.call('ZREM', KEYS[1], sid)
    redis.call('SET', ARGV[1] .. 'g:' .. sid, h[1], 'EX', 86400)
    evicted = evicted + 1
  end
end
return evicted
"""

# KEYS: hot set of one bucket, outbox of that bucket
# ARGV: session key prefix of the bucket, consumer group, n, n outbox entry ids, then
#       (sid, version, ",id1,id2,...,") triples just committed
# After COMMIT: records the flushed version and acknowledges the entries in one atomic step, so a
# session is never left with its rows committed, its entries acknowledged and ``fv`` behind (it could
# then never be evicted). The flushed version only ever rises (batches may commit out of order). A
# session marked ``stuck`` by a failed entry is released once that very entry has been committed.
# ``allow-oom``: it overwrites a number and removes pending entries, and it is what lets a full Redis
# evict flushed sessions; refusing it on a full Redis would pin every session it covers.
MARK_FLUSHED = """#!lua flags=allow-oom
local n = tonumber(ARGV[3])
for i = 4, 3 + n, 500 do
  redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, i, math.min(i + 499, 3 + n)))
end
for i = 4 + n, #ARGV, 3 do
  local skey = ARGV[1] .. 's:' .. ARGV[i]
  local fv = redis.call('HGET', skey, 'fv')
  if fv and tonumber(fv) < tonumber(ARGV[i + 1]) then redis.call('HSET', skey, 'fv', ARGV[i + 1]) end
  local stuck = redis.call('HGET', skey, 'stuck')
  if stuck and string.find(ARGV[i + 2], ',' .. stuck .. ',', 1, true) then
    redis.call('HDEL', skey, 'stuck')
  end
end
return 1
"""

# KEYS: outbox of one bucket
# ARGV: consumer group
# Creates the group (and the stream) unless it exists. ``allow-oom``: a worker that starts while Redis
# is full must still be able to drain it, which is what frees memory.
ENSURE_GROUP = """#!lua flags=allow-oom
local r = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP', 1, true) then return r end
return 1
"""

# KEYS: session
# ARGV: outbox entry id that failed
# Marks the session (only if it is in Redis) so the sweep keeps it there until that entry commits.
MARK_STUCK = """#!lua flags=allow-oom
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'stuck', ARGV[1]) end
return 1
"""

# KEYS: session, messages, memories, outbox
# ARGV: sid, phase ('m' messages, 'y' memories, 's' the session itself), cursor (last seq sent in this
#       phase), most entries, most bytes of payload
# Reconciliation: a session whose writes are not all flushed (v > fv) although the outbox holds nothing
# that old any more has lost outbox entries (e.g. a Redis failover dropped them). Its messages and
# memories are written to the outbox again, one bounded chunk per call so that a long history never
# lands in Redis at once, then its snapshot. All inserts are idempotent, so re-sending what Postgres
# already has is harmless. Message and memory entries carry the flushed version ``fv`` (committing them
# does not make the session evictable); only the last entry, the snapshot, carries ``v``, and it is
# written after every chunk. Returns {next phase or 'done', next cursor, entries written}.
RESYNC = """
local h = redis.call('HMGET', KEYS[1], 'v', 'fv', 'stuck', 'user_id', 'memory_count')
if not h[1] or h[1] == h[2] or h[3] then return {'done', 0, 0} end
local sid, uid, phase, cursor = ARGV[1], h[4], ARGV[2], tonumber(ARGV[3])
local most, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local n, bytes = 0, 0
if phase == 'm' then
  local entries = redis.call('XRANGE', KEYS[2], '(' .. cursor .. '-0', '+', 'COUNT', most)
  for _, e in ipairs(entries) do
    cursor = tonumber(string.match(e[1], '^(%d+)'))
    local entry = {'k', 'm', 'sid', sid, 'uid', uid, 'v', h[2], 'seq', cursor}
    for _, x in ipairs(e[2]) do
      entry[#entry + 1] = x
      bytes = bytes + #x
    end
    redis.call('XADD', KEYS[4], '*', unpack(entry))
    n = n + 1
    if bytes >= budget then return {'m', cursor, n} end
  end
  if #entries == most then return {'m', cursor, n} end
  return {'y', 0, n}
elseif phase == 'y' then
  local last = tonumber(h[5])
  while cursor < last and n < most and bytes < budget do
    cursor = cursor + 1
    local doc = redis.call('HGET', KEYS[3], cursor)
    if doc then
      redis.call('XADD', KEYS[4], '*', 'k', 'y', 'sid', sid, 'uid', uid, 'v', h[2], 'seq', cursor,
        'doc', doc)
      n = n + 1
      bytes = bytes + #doc
    end
  end
  if cursor < last then return {'y', cursor, n} end
  return {'s', 0, n}
end
redis.call('XADD', KEYS[4], '*', 'k', 's', 'sid', sid, 'uid', uid, 'v', h[1])
return {'done', 0, n + 1}
"""
