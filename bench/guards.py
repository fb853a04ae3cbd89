"""What an Idempotency-Key and the per-user rate limit cost an append, and what one record takes in Redis.

``scripts/bench.sh guards``. Four variants of POST message on a fresh API process each (one process,
wrk -c64), interleaved round by round; medians:
- plain: no header, no rate limit (the plain script, as before these features);
- Idempotency-Key: a new key on every request (every request writes a record: the retry-safe client);
- rate limit on (RATE_LIMIT_WRITES_PER_MINUTE high enough never to refuse: the bucket is still read and
  written on every request);
- both.
Then the Redis memory of one record of a chat-sized append and of one user's token bucket (MEMORY USAGE).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import urllib.request

import redis.asyncio as aioredis

from bench.common import BASE, CONNECTIONS, POST_LUA, PY, ROOT, http, stop, wait_http, wrk
from session_svc.record.keys import Keys
from session_svc.settings import Settings

# A new key on every request, as a client that may retry would send.
KEYED_LUA = (
    POST_LUA
    + """
local n = 0
request = function()
  n = n + 1
  wrk.headers["Idempotency-Key"] = "bench-" .. n .. "-" .. math.random(1000000000)
  return wrk.format()
end
"""
)

VARIANTS: dict[str, tuple[dict[str, str], str]] = {
    "plain (no key, no limit)": ({}, POST_LUA),
    "Idempotency-Key, a new one per request": ({}, KEYED_LUA),
    "rate limit on, never reached": ({"RATE_LIMIT_WRITES_PER_MINUTE": "100000000"}, POST_LUA),
    "both": ({"RATE_LIMIT_WRITES_PER_MINUTE": "100000000"}, KEYED_LUA),
}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def guards(env: dict[str, str], rounds: int | None = None) -> None:
    """``BENCH_BASELINE_TREE``: a checkout of the code before these features (``git archive main``);
    its plain append runs as one more variant, so "no key, no limit" can be compared with before."""
    rounds = rounds or int(os.environ.get("BENCH_REPEATS", "3"))
    baseline = os.environ.get("BENCH_BASELINE_TREE")
    variants = dict(VARIANTS)
    if baseline:
        variants = {"baseline tree: plain": ({"PYTHONPATH": baseline}, POST_LUA), **variants}
    duration = os.environ.get("BENCH_ROW_DURATION", "6s")
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    cpu_us: dict[str, list[float]] = {name: [] for name in variants}
    print(
        f"\n# idempotency and rate limit: POST message, wrk -t1 -c{CONNECTIONS} -d{duration}, median of {rounds}"
    )
    for i in range(rounds):
        for name, (extra, lua) in variants.items():
            cwd = baseline if name.startswith("baseline") and baseline else ROOT
            api = subprocess.Popen([PY, "-m", "session_svc"], env={**env, **extra}, cwd=cwd)
            try:
                wait_http()
                user = f"bench-guard-{i}-{len(results[name])}-{abs(hash(name)) % 1000}"
                sid = http("POST", "/api/v1/sessions", {"user_id": user})["session_id"]
                path = f"/api/v1/sessions/{sid}/messages?user_id={user}"
                wrk(path, lua, duration="2s")  # warm-up
                cpu = _cpu_seconds(api.pid)
                rps, p50, p99 = wrk(path, lua, duration=duration)
                # CPU per request of the API process: what a variant costs, whatever else runs on the box.
                cpu_us[name].append((_cpu_seconds(api.pid) - cpu) / (rps * float(duration.rstrip("s"))) * 1e6)
                results[name].append((rps, p50, p99))
            finally:
                stop([api])
    base = sorted(r[0] for r in results["plain (no key, no limit)"])[rounds // 2]
    base_cpu = sorted(cpu_us["plain (no key, no limit)"])[rounds // 2]
    print(
        f"{'variant':45} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs plain':>9} {'CPU µs/req':>11} {'vs plain':>9}"
    )
    for name, runs in results.items():
        rps, p50, p99 = (sorted(x[j] for x in runs)[rounds // 2] for j in range(3))
        cpu = sorted(cpu_us[name])[rounds // 2]
        print(
            f"{name:45} {rps:9.0f} {p50:8.2f} {p99:8.2f} {rps / base:8.3f}x {cpu:11.0f} {cpu / base_cpu:8.3f}x"
        )
    asyncio.run(_record_bytes(env))


async def _record_bytes(env: dict[str, str]) -> None:
    settings = Settings.from_env(env)
    api = subprocess.Popen(
        [PY, "-m", "session_svc"], env={**env, "RATE_LIMIT_WRITES_PER_MINUTE": "600"}, cwd=ROOT
    )
    try:
        wait_http()
        user = "bench-record"
        sid = http("POST", "/api/v1/sessions", {"user_id": user})["session_id"]
        body = POST_LUA.split("wrk.body = '")[1].split("'\n")[0].encode()
        req = urllib.request.Request(
            f"{BASE}/api/v1/sessions/{sid}/messages?user_id={user}",
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": "7f3c9a52-1b4e-4d0a-9c67-2e8f5d1a3b90",
            },
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = resp.read()
        uk = Keys(settings.key_prefix, settings.redis_buckets).for_user(user)
        r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        key = uk.idempotency("7f3c9a52-1b4e-4d0a-9c67-2e8f5d1a3b90")
        record, usage = await r.get(key), await r.memory_usage(key)
        bucket = await r.memory_usage(uk.rate_limit)
        await r.aclose()
        print(
            f"one idempotency record (append of a {len(body)}-byte body, a UUID key, a {len(answer)}-byte "
            f"answer): {len(record or '')} bytes of value, {usage} bytes in Redis (MEMORY USAGE, key included)"
        )
        print(f"one user's token bucket: {bucket} bytes in Redis")
    finally:
        stop([api])
