"""How a script is declared, called and guarded: the machinery every script of the service shares.

A script is a ``Lua``: the names of its KEYS and ARGV, and a body. Its source starts with those names
bound to locals (``local session, messages = KEYS[1], KEYS[2]``), generated from the declaration, so the
body never says ``KEYS[3]``; arguments past the named ones (a variable number of field/value pairs, of
session ids...) start at ARGV[``REST``]. The reply vocabulary (``Reply``) and the session statuses are
bound to upper-case locals too (``OK``, ``COLD``, ``ACTIVE``...), generated from their enums, so the
Lua and the Python that decodes its replies cannot spell a status two ways. ``Script`` is one
registered script (EVALSHA, with redis-py loading it on NOSCRIPT), called with keys and arguments by
name. ``guarded`` wraps a write in its idempotency record and rate limit, in the same script.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import AsyncScript

from session_svc.ops.telemetry import RECORDER, REDIS_SECONDS
from session_svc.record.fields import SessionStatus
from session_svc.storage.coalesce import Coalescer


class Reply(StrEnum):
    """The first element of a session script's reply (then, for some, a detail)."""

    ok = "ok"
    missing = "missing"  # no such session for this user
    # The session is known to the user's index but its data has left Redis: read it from Postgres, or
    # rehydrate it before writing.
    cold = "cold"
    conflict = "conflict"  # then the session's status, or ``exists`` / ``busy``
    precondition = "precondition"  # If-Match does not hold; then the session's version
    replay = "replay"  # the Idempotency-Key's record of the first answer follows
    mismatch = "mismatch"  # the Idempotency-Key was used for another request
    limited = "limited"  # the user's rate limit; then the seconds until a write is allowed
    # Details of a conflict: the session id exists already; housekeeping met a session busy again.
    exists = "exists"
    busy = "busy"


# Bound at the top of every script: ``local OK, MISSING, ... = 'ok', 'missing', ...``.
_CONSTANTS = [(r.name.upper(), r.value) for r in Reply] + [(s.name.upper(), s.value) for s in SessionStatus]
_PREAMBLE = f"local {', '.join(n for n, _ in _CONSTANTS)} = {', '.join(repr(v) for _, v in _CONSTANTS)}"

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
        lines.append(_PREAMBLE)
        return "\n".join(lines) + "\n" + self.body


# Idempotency records and rate limits -------------------------------------------------------------------

# Length of a request fingerprint (hex digits); a record starts with it.
FINGERPRINT_LEN = 32


def guarded(lua: Lua) -> Lua:
    """``lua`` behind the checks of a write sent with an Idempotency-Key or under a rate limit, in the
    same script (so still one round trip, and atomic with the write):

    1. Idempotency: if ``idem`` holds a record, the reply is ``{REPLAY, record}`` when it starts with
       this request's fingerprint ``idem_fp``, else ``{MISMATCH}``; nothing is written, nothing
       charged. ``idem_fp`` empty: no key was sent.
    2. Rate limit (``rl_rate`` writes per minute, ``'0'`` = off): the user's token bucket ``limit``
       (size ``rl_burst``) is refilled for the time since its last write; under one token, the reply is
       ``{LIMITED, seconds until one is there}`` and nothing is written.
    3. The write itself. Only an ``OK`` reply takes a token and records ``idem_fp .. idem_made ..
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
    if string.sub(rec, 1, {FINGERPRINT_LEN}) == idem_fp then return {{REPLAY, rec}} end
    return {{MISMATCH}}
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
  if rl_tokens < 1 then return {{LIMITED, math.max(1, math.ceil((1 - rl_tokens) / rl_per_us / 1e6))}} end
end
local reply = write()
if reply[1] == OK then
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
