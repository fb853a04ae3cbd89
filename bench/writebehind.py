"""Write-behind under load, and flush throughput from a cold backlog (``scripts/bench.sh writebehind``).

1. Under load: the API on every core (SERVICE_PROCESSES = cores) and one worker. The maximum append rate
   is measured first (wrk -t1 -c64, appends spread over WB_SESSIONS sessions), then appends are sent at
   WB_LOAD (80%) of it for WB_SECONDS, paced by wrk's ``delay()`` hook on a clock (``paced_lua``: a
   constant-rate schedule, as wrk2 does; no calibration needed, the achieved rate is reported). The
   outbox lag (age of the oldest entry not yet committed to Postgres) is sampled every SAMPLE_S;
   after the load, the time the outbox takes to drain to zero. Then Postgres is checked
   against the acknowledgements: every message wrk saw a 200 for is a row, the only other rows are
   requests still in flight when wrk stopped, and each session's counters and rows agree with Redis.
2. From a cold backlog: with no worker running, the one-process append rate is measured (wrk, as
   above), then the outbox is filled to WB_BACKLOG entries by calling the service's append script
   directly (thousands per pipeline, over WB_BACKLOG_SESSIONS sessions in every bucket). Then 1 worker
   (and, in the next round, 2 workers) drain it; the rate is the slope between 10% and 90% drained, so
   the workers' start-up is left out.

Knobs (environment): WB_SECONDS, WB_SESSIONS, WB_LOAD, WB_MAX_DURATION, WB_BACKLOG, WB_BACKLOG_SESSIONS,
WB_WORKERS (e.g. "1,2"), WB_PARTS (e.g. "load,cold").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import asyncpg
import redis.asyncio as aioredis

from bench.common import BASE, POST_LUA, PY, ROOT, SCHEMA, backlog, http, stop, wait_http, wrk
from session_svc.record.keys import Keys
from session_svc.record.shapes import now_us
from session_svc.settings import Settings
from session_svc.storage.scripts import Scripts

SECONDS = int(os.environ.get("WB_SECONDS", "60"))
SESSIONS = int(os.environ.get("WB_SESSIONS", "64"))
LOAD = float(os.environ.get("WB_LOAD", "0.8"))
MAX_DURATION = os.environ.get("WB_MAX_DURATION", "10s")
BACKLOG = int(os.environ.get("WB_BACKLOG", "200000"))
BACKLOG_SESSIONS = int(os.environ.get("WB_BACKLOG_SESSIONS", "1000"))
WORKERS = [int(n) for n in os.environ.get("WB_WORKERS", "1,2").split(",")]
PARTS = os.environ.get("WB_PARTS", "load,cold").split(",")
CONNS = 64
SAMPLE_S = 0.2
PIPELINE = 2000  # append scripts per pipeline when building the cold backlog

# The body of POST_LUA (bench/common.py), sent to a session picked at random per request.
BODY = re.search(r"wrk.body = '(.*)'", POST_LUA).group(1)  # type: ignore[union-attr]


def _lua_paths(sids: Sequence[tuple[str, str]]) -> str:
    paths = ", ".join(f'"/api/v1/sessions/{sid}/messages?user_id={uid}"' for sid, uid in sids)
    return f"""
local paths = {{{paths}}}
local body = '{BODY}'
local headers = {{["Content-Type"] = "application/json"}}
request = function()
  return wrk.format("POST", paths[math.random(#paths)], headers, body)
end
"""


def spread_lua(sids: Sequence[tuple[str, str]]) -> str:
    """Appends as fast as wrk gets answers, each to a session picked at random."""
    return _lua_paths(sids)


def paced_lua(sids: Sequence[tuple[str, str]], rate: float) -> str:
    """The same at a constant ``rate`` (open loop, as wrk2 does): request k is due at t0 + k/rate on
    a monotonic clock (LuaJIT's ffi, clock_gettime), and ``delay()`` holds each connection until the
    next due time. A request that cannot leave on time (every connection busy) leaves at once, so the
    schedule catches up; how late the latest one was is reported. The message id of every 200 is
    written to the file named after ``--``; the counts of sent, answered and failed requests are printed."""
    return (
        _lua_paths(sids)
        + f"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} wb_timespec;
int clock_gettime(int clk_id, wb_timespec *tp);
]]
local ts = ffi.new("wb_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval = {1000 / rate:.6f}
local due
-- globals: done() reads them with thread:get
sent, acked, failed, late_max, late_10 = 0, 0, 0, 0, 0
local out
local threads = {{}}
setup = function(thread) table.insert(threads, thread) end
init = function(args)
  math.randomseed(os.time())
  if args[1] then out = io.open(args[1], "w"); out:setvbuf("line") end
end
local build = request
request = function() sent = sent + 1; return build() end
delay = function()
  local now = now_ms()
  due = due or now
  local wait = due - now
  due = due + interval
  if wait > 0 then return math.ceil(wait) end
  if -wait > late_max then late_max = -wait end
  if -wait > 10 then late_10 = late_10 + 1 end
  return 0
end
response = function(status, headers, body)
  if status == 200 then
    acked = acked + 1
    if out then out:write(string.match(body, '"message_id":%s*"([^"]+)"') or "?", "\\n") end
  else
    failed = failed + 1
  end
end
done = function(summary, latency, requests)
  for _, t in ipairs(threads) do
    io.write(string.format("wb sent %d acked %d failed %d late_max %.1f late_10 %d\\n",
      t:get("sent"), t:get("acked"), t:get("failed"), t:get("late_max"), t:get("late_10")))
  end
end
"""
    )


@dataclass
class Paced:
    rps: float
    p50: float
    p99: float
    sent: int
    acked: int
    failed: int
    late_max_ms: float  # the latest a request left after its due time
    late_10: int  # requests that left more than 10 ms late
    ids: list[str]


def run_paced(sids: Sequence[tuple[str, str]], rate: float, seconds: int) -> Paced:
    with (
        tempfile.NamedTemporaryFile("w", suffix=".lua") as script,
        tempfile.NamedTemporaryFile("r", suffix=".ids") as ids,
    ):
        script.write(paced_lua(sids, rate))
        script.flush()
        cmd = ["wrk", "-t1", f"-c{CONNS}", f"-d{seconds}s", "--latency", "-s", script.name, BASE + "/",
               "--", ids.name]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        acked_ids = [line for line in ids.read().splitlines() if line]
    m = re.search(r"wb sent (\d+) acked (\d+) failed (\d+) late_max ([\d.]+) late_10 (\d+)", out)
    assert m, out
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        q = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert q, out
        value, unit = float(q.group(1)), q.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return Paced(
        rps, pct("50"), pct("99"), int(m[1]), int(m[2]), int(m[3]), float(m[4]), int(m[5]), acked_ids
    )


# Processes and probes ----------------------------------------------------------------------------------


def start(args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PY, "-m", *args], env=env, cwd=ROOT)


def make_sessions(n: int, tag: str) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        uid = f"wb-{tag}-{i}"
        sid = http("POST", "/api/v1/sessions", {"user_id": uid, "title": "writebehind"})["session_id"]
        out.append((str(sid), uid))
    return out


async def wait_drained(r: aioredis.Redis, settings: Settings, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while (await backlog(r, settings))[0] > 0:
        if time.monotonic() - t0 > timeout:
            raise SystemExit("the outbox did not drain")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def pctl(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else 0.0


# 1. Under load ----------------------------------------------------------------------------------------


def under_load(env: dict[str, str], settings: Settings) -> dict[str, object]:
    cores = os.cpu_count() or 1
    wenv = {**env, "SESSION_HOT_TTL": "86400"}
    api = start(["session_svc"], {**env, "SERVICE_PROCESSES": str(cores)})
    worker = start(["workers"], wenv)
    try:
        wait_http()
        warm = make_sessions(SESSIONS, "warm")
        wrk("/", spread_lua(warm), str(CONNS), "2s")  # warm-up
        max_rps, max_p50, max_p99 = wrk("/", spread_lua(warm), str(CONNS), MAX_DURATION)
        target = LOAD * max_rps
        print(f"max append rate {max_rps:.0f}/s (p50 {max_p50:.1f} ms, p99 {max_p99:.1f} ms); "
              f"paced at {target:.0f}/s")  # fmt: skip
        # The measured run goes to fresh sessions, so that their rows are exactly this run's.
        sids = make_sessions(SESSIONS, "load")
        return asyncio.run(_measured_run(settings, sids, target, {
            "processes": cores, "max_rps": max_rps, "max_p50": max_p50, "max_p99": max_p99,
            "target": target,
        }))  # fmt: skip
    finally:
        stop([api, worker])


async def _measured_run(
    settings: Settings, sids: list[tuple[str, str]], rate: float, result: dict[str, object]
) -> dict[str, object]:
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    await wait_drained(r, settings)  # what the maximum-rate run left
    lags: list[float] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            lags.append((await backlog(r, settings))[1])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), SAMPLE_S)

    task = asyncio.create_task(sample())
    run = await asyncio.to_thread(run_paced, sids, rate, SECONDS)
    t_end = time.monotonic()
    done.set()
    await task
    await wait_drained(r, settings)
    drain_after = time.monotonic() - t_end  # from the moment wrk stopped
    # Postgres against the acknowledgements.
    pg = await asyncpg.connect(settings.database_url)
    s = f'"{SCHEMA}"'
    sid_list = [sid for sid, _ in sids]
    rows = await pg.fetch(
        f"SELECT message_id FROM {s}.session_messages WHERE session_id = any($1::text[])", sid_list
    )
    in_pg = {row["message_id"] for row in rows}
    acked = set(run.ids)
    per_session = await pg.fetch(
        f"""SELECT s.session_id, s.message_count, count(m.seq) AS n, coalesce(max(m.seq), 0) AS top
            FROM {s}.sessions s LEFT JOIN {s}.session_messages m USING (session_id)
            WHERE s.session_id = any($1::text[]) GROUP BY s.session_id, s.message_count""",
        sid_list,
    )
    await pg.close()
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    async with r.pipeline(transaction=False) as pipe:
        for sid, uid in sids:
            pipe.hget(keys.for_user(uid).session(sid), "message_count")
        redis_counts = dict(zip(sid_list, [int(c) for c in await pipe.execute()], strict=True))
    await r.aclose()
    mismatched = [
        row["session_id"]
        for row in per_session
        if not row["message_count"] == row["n"] == row["top"] == redis_counts[row["session_id"]]
    ]
    result.update({
        "rps": run.rps, "p50": run.p50, "p99": run.p99, "sent": run.sent, "acked": run.acked,
        "failed": run.failed, "acked_ids": len(acked), "rows": len(in_pg),
        "missing": len(acked - in_pg), "extra": len(in_pg - acked),
        "late_max_ms": run.late_max_ms, "late_10": run.late_10, "in_flight": run.sent - run.acked - run.failed, "sessions_in_pg": len(per_session),
        "mismatched": len(mismatched), "samples": len(lags), "lag_p50": pctl(lags, 50),
        "lag_p99": pctl(lags, 99), "lag_max": max(lags, default=0.0), "drain_after_s": drain_after,
    })  # fmt: skip
    ok = (
        result["missing"] == 0
        and run.failed == 0
        and len(acked) == run.acked
        and 0 <= len(in_pg - acked) <= run.sent - run.acked - run.failed
        and not mismatched
        and len(per_session) == len(sids)
    )
    result["consistent"] = ok
    print(
        f"under load: {run.rps:.0f} appends/s for {SECONDS}s ({run.rps / float(result['max_rps']):.0%} of max), "  # type: ignore[arg-type]
        f"p50 {run.p50:.1f} ms p99 {run.p99:.1f} ms, {run.late_10} sent >10 ms late (latest "
        f"{run.late_max_ms:.0f} ms); outbox lag over {len(lags)} samples: "
        f"p50 {pctl(lags, 50):.3f}s p99 {pctl(lags, 99):.3f}s max {max(lags, default=0):.3f}s; "
        f"drained {drain_after:.2f}s after the load stopped\n"
        f"postgres: {len(in_pg)} rows for {run.acked} acknowledged (sent {run.sent}, non-2xx {run.failed}, "
        f"in flight at stop {run.sent - run.acked - run.failed}); acknowledged but missing "
        f"{len(acked - in_pg)}; rows not acknowledged {len(in_pg - acked)}; sessions whose counters/rows "
        f"disagree {len(mismatched)} of {len(per_session)}: {'OK' if ok else 'MISMATCH'}"
    )
    return result


# 2. From a cold backlog ---------------------------------------------------------------------------------


def one_process_rate(env: dict[str, str]) -> tuple[float, float, float]:
    """Appends/s of one API process, no worker running, same wrk load as under_load's maximum."""
    api = start(["session_svc"], {**env, "SERVICE_PROCESSES": "1"})
    try:
        wait_http()
        sids = make_sessions(SESSIONS, "one")
        wrk("/", spread_lua(sids), str(CONNS), "2s")  # warm-up
        return wrk("/", spread_lua(sids), str(CONNS), MAX_DURATION)
    finally:
        stop([api])


async def fill_backlog(settings: Settings, sessions: list[tuple[str, str]], total: int) -> tuple[int, float]:
    """Tops the outbox up to ``total`` entries with the service's append script, called directly
    (coalesced: each ``gather`` of PIPELINE calls is one pipeline). Returns (entries added, seconds)."""
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    scripts = Scripts(r, coalesce=True)
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    have = (await backlog(r, settings))[0]
    need = max(0, total - have)
    t0 = time.monotonic()
    i = 0
    while i < need:
        n = min(PIPELINE, need - i)
        calls = []
        for j in range(i, i + n):
            sid, uid = sessions[j % len(sessions)]
            message = {"id": str(uuid.uuid4()), "role": "user", "type": "chat", "tokens": "12",
                       "cost": "100", "meta": '{"model":"gpt-4"}', "ts": str(now_us()),
                       "content": f"Hello, this is backlog message {j} of a typical chat size."}  # fmt: skip
            calls.append(scripts.append_message(keys.for_user(uid), sid, message))
        replies = await asyncio.gather(*calls)
        assert all(rep[0] == "ok" for rep in replies), replies[:3]
        i += n
    elapsed = time.monotonic() - t0
    await r.aclose()
    return need, elapsed


async def create_cold_sessions(settings: Settings, n: int) -> list[tuple[str, str]]:
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    scripts = Scripts(r, coalesce=True)
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    sessions = [(str(uuid.uuid4()), f"wb-cold-{i}") for i in range(n)]
    now = now_us()
    replies = await asyncio.gather(*(
        scripts.create_session(keys.for_user(uid), sid, title="cold", conversation_data="{}",
                               metadata="{}", summary="", now=now)
        for sid, uid in sessions
    ))  # fmt: skip
    assert all(rep[0] == "ok" for rep in replies), replies[:3]
    buckets = {keys.for_user(uid).tag for _, uid in sessions}
    assert len(buckets) == settings.redis_buckets, "not every bucket has a session"
    await r.aclose()
    return sessions


async def drain(env: dict[str, str], settings: Settings, workers: int) -> dict[str, float]:
    """Start ``workers`` workers on the backlog in place; sample it every 0.1 s until it is empty."""
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    pg = await asyncpg.connect(settings.database_url)
    rows_before = await pg.fetchval(f'SELECT count(*) FROM "{SCHEMA}".session_messages')
    entries = (await backlog(r, settings))[0]
    wenv = {**env, "SESSION_HOT_TTL": "86400"}
    t0 = time.monotonic()
    procs = [start(["workers"], wenv) for _ in range(workers)]
    samples: list[tuple[float, int]] = []
    try:
        while True:
            n = (await backlog(r, settings))[0]
            samples.append((time.monotonic() - t0, n))
            if n == 0:
                break
            if time.monotonic() - t0 > 900:
                raise SystemExit("the backlog did not drain")
            await asyncio.sleep(0.1)
    finally:
        stop(procs)
    rows_after = await pg.fetchval(f'SELECT count(*) FROM "{SCHEMA}".session_messages')
    expected = await _redis_message_total(r, settings)  # every message ever appended in this run
    await pg.close()
    await r.aclose()

    def first(pred: float) -> float:
        return next(t for t, n in samples if n <= pred)

    t_drop, t90, t10, t_zero = first(entries - 1), first(0.9 * entries), first(0.1 * entries), samples[-1][0]
    # The longest time the backlog did not go down once draining had started (a checkpoint, a stall).
    progress = [t for (_, before), (t, n) in pairwise(samples) if n < before]
    stall = max((b - a for a, b in pairwise(progress)), default=0.0)
    return {
        "workers": workers, "entries": entries, "start_s": t_drop, "total_s": t_zero,
        "rate_10_90": 0.8 * entries / (t10 - t90), "rate_from_drop": entries / (t_zero - t_drop),
        "rate_incl_start": entries / t_zero, "stall_s": stall, "rows_added": rows_after - rows_before, "rows": rows_after,
        "expected_rows": expected,
    }  # fmt: skip


async def _redis_message_total(r: aioredis.Redis, settings: Settings) -> int:
    """Messages appended under this run's prefix, from the buckets' exact counters."""
    keys = Keys(settings.key_prefix, settings.redis_buckets)
    async with r.pipeline(transaction=False) as pipe:
        for bucket in range(settings.redis_buckets):
            pipe.hget(keys.stats(bucket), "messages")
        return sum(int(n or 0) for n in await pipe.execute())


def cold_backlog(env: dict[str, str], settings: Settings) -> dict[str, object]:
    one_rps, one_p50, one_p99 = one_process_rate(env)
    print(f"one API process, no worker: {one_rps:.0f} appends/s (p50 {one_p50:.1f} ms, p99 {one_p99:.1f} ms)")
    sessions = asyncio.run(create_cold_sessions(settings, BACKLOG_SESSIONS))
    rounds = []
    for workers in WORKERS:
        added, secs = asyncio.run(fill_backlog(settings, sessions, BACKLOG))
        d = asyncio.run(drain(env, settings, workers))
        d["filled"], d["fill_s"] = added, secs
        d["ratio"] = d["rate_10_90"] / one_rps
        rounds.append(d)
        print(
            f"{workers} worker(s): {d['entries']:.0f} entries (filled {added} in {secs:.1f}s, "
            f"{added / secs:.0f}/s); first drop {d['start_s']:.2f}s after start; 10%-90% slope "
            f"{d['rate_10_90']:.0f} rows/s ({d['ratio']:.1f}x one API process); from first drop "
            f"{d['rate_from_drop']:.0f}/s; incl. start {d['rate_incl_start']:.0f}/s; longest stall "
            f"{d['stall_s']:.1f}s; "
            f"+{d['rows_added']:.0f} rows; postgres {d['rows']:.0f} message rows, Redis counted "
            f"{d['expected_rows']:.0f} appends: {'OK' if d['rows'] == d['expected_rows'] else 'MISMATCH'}"
        )
    if len(rounds) > 1:
        print(
            f"{rounds[-1]['workers']:.0f} workers vs 1: {rounds[-1]['rate_10_90'] / rounds[0]['rate_10_90']:.2f}x"
        )
    return {"one_rps": one_rps, "one_p50": one_p50, "one_p99": one_p99, "rounds": rounds}


def writebehind(env: dict[str, str]) -> None:
    settings = Settings.from_env(env)
    print(
        f"\n# write-behind: {os.cpu_count()} cores, load generator on the same cores, {time.strftime('%Y-%m-%d')}"
    )
    if "load" in PARTS:
        under_load(env, settings)
    if "cold" in PARTS:
        cold_backlog(env, settings)
