"""``scripts/bench.sh cluster``: the service on a local 3-master Redis Cluster (``scripts/cluster.sh``,
started here on spare ports and stopped at the end) beside the standalone Redis.

- HTTP: append a message and get a session, rotating over 32 sessions of 32 users (so a cluster spreads
  them over its masters), wrk -t1 -c64, one API process, the variants interleaved round by round:
  standalone; cluster with the coalescer (default); cluster through redis-py's cluster client
  (``REDIS_COALESCE=false``); cluster with ``REDIS_WAIT_REPLICAS=1``; standalone with it is not shown
  (no replica).
- What the bucket count costs the reads that touch every bucket (stats, outbox backlog, the metrics'
  service-wide figures), in-process, median of ``BENCH_READS`` calls, at 16, 64, 256 and 1024 buckets,
  on the cluster and on the standalone Redis; and how evenly the buckets' slots spread over 3 masters.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import replace

from redis.crc import key_slot

from bench.common import PY, ROOT, drop_prefix, http, stop, wait_http, wrk
from session_svc.domain import store, totals
from session_svc.record.keys import Keys, UserKeys, bucket_of
from session_svc.settings import Settings
from session_svc.storage import outbox
from session_svc.storage.outbox import GROUP
from session_svc.storage.resources import Backend, open_backend

SESSIONS = 32
ROUNDS = int(os.environ.get("BENCH_REPEATS", "3"))
ROW = os.environ.get("BENCH_ROW_DURATION", "5s")
READS = int(os.environ.get("BENCH_READS", "50"))
BUCKET_COUNTS = (16, 64, 256, 1024)

_BODY = (
    '{"role":"user","content":"Hello, this is a benchmark message of a typical chat size.",'
    '"tokens_used":12,"cost_usd":0.0001}'
)


def _rotating(method: str, paths: list[str], body: str | None = None) -> str:
    """A wrk script sending ``method`` to each of ``paths`` in turn."""
    listed = ", ".join(f'"{p}"' for p in paths)
    lines = [f'wrk.method = "{method}"', 'wrk.headers["Content-Type"] = "application/json"']
    if body:
        lines.append(f"wrk.body = '{body}'")
    lines += [f"local paths = {{{listed}}}", "local i = 0",
              "request = function() i = i + 1; return wrk.format(nil, paths[(i % #paths) + 1]) end"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _free_block(n: int = 6) -> int:
    for base in range(int(os.environ.get("BENCH_CLUSTER_PORT", "7500")), 30_000, 10):
        ports = [base + i for i in range(n)] + [base + i + 10_000 for i in range(n)]
        try:
            with ExitStack() as stack:
                for p in ports:
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise SystemExit("no free ports for a local cluster")


def _cluster(action: str, base: int) -> None:
    env = {**os.environ, "CLUSTER_PORT": str(base)}
    subprocess.run([str(ROOT / "scripts" / "cluster.sh"), action, *(["--purge"] if action == "down" else [])],
                   env=env, check=True, capture_output=True)  # fmt: skip


def cluster_table(env: dict[str, str]) -> None:
    base = _free_block()
    _cluster("up", base)
    cluster_env = {**env, "REDIS_CLUSTER": "true", "REDIS_URL": f"redis://127.0.0.1:{base}/0",
                   "ARQ_REDIS_URL": env.get("REDIS_URL", "redis://127.0.0.1:6379/0")}  # fmt: skip
    try:
        asyncio.run(_wait_cost(Settings.from_env(cluster_env)))
        _http_rows(env, cluster_env)
        asyncio.run(_bucket_costs(Settings.from_env(env), Settings.from_env(cluster_env)))
    finally:
        _cluster("down", base)


def _http_rows(env: dict[str, str], cluster_env: dict[str, str]) -> None:
    variants = {
        "standalone Redis": env,
        "cluster, coalescer (default)": cluster_env,
        "cluster, redis-py cluster client (REDIS_COALESCE=false)": {**cluster_env, "REDIS_COALESCE": "false"},
        "cluster, coalescer + REDIS_WAIT_REPLICAS=1": {**cluster_env, "REDIS_WAIT_REPLICAS": "1"},
    }
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    print(f"\n# Redis Cluster (3 masters + 3 replicas, local): wrk -t1 -c64 -d{ROW}, 1 API process, "
          f"{SESSIONS} sessions in turn, medians of {ROUNDS}")  # fmt: skip
    for _ in range(ROUNDS):
        for name, venv in variants.items():
            api = subprocess.Popen(
                [PY, "-m", "session_svc"], env={**venv, "SERVICE_PROCESSES": "1"}, cwd=ROOT
            )
            try:
                wait_http()
                users = [f"bench-{i}" for i in range(SESSIONS)]
                sids = [str(http("POST", "/api/v1/sessions", {"user_id": u})["session_id"]) for u in users]
                posts = [
                    f"/api/v1/sessions/{s}/messages?user_id={u}" for s, u in zip(sids, users, strict=True)
                ]
                gets = [f"/api/v1/sessions/{s}?user_id={u}" for s, u in zip(sids, users, strict=True)]
                wrk("/", _rotating("POST", posts, _BODY), duration="1s")  # warm-up
                results.setdefault((name, "append"), []).append(
                    wrk("/", _rotating("POST", posts, _BODY), duration=ROW)
                )
                results.setdefault((name, "get"), []).append(wrk("/", _rotating("GET", gets), duration=ROW))
            finally:
                stop([api])
    print(f"{'variant':58} {'route':7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs standalone':>14}")
    for route in ("append", "get"):
        ref = statistics.median(r[0] for r in results[("standalone Redis", route)])
        for name in variants:
            runs = results[(name, route)]
            rps, p50, p99 = (statistics.median(r[i] for r in runs) for i in range(3))
            print(f"{name:58} {route:7} {rps:8.0f} {p50:8.2f} {p99:8.2f} {rps / ref:13.2f}x")


async def _wait_cost(cluster: Settings, callers: int = 64, seconds: float = 3.0) -> None:
    """The append script alone, through the coalescer, from ``callers`` concurrent tasks in this process
    for ``seconds``, with and without WAIT 1, interleaved; medians over the rounds. Without HTTP, the
    difference is what WAIT itself costs."""
    variants = {"no WAIT": 0, "REDIS_WAIT_REPLICAS=1": 1}
    runs: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    message = {"id": "m", "role": "user", "content": "Hello, a benchmark message.", "type": "chat",
               "tokens": "12", "cost": "100", "meta": "{}", "ts": "0"}  # fmt: skip
    for r in range(ROUNDS):
        for name, n in variants.items():
            s = replace(
                cluster, key_prefix=f"{cluster.key_prefix}w{r}{n}", redis_wait_replicas=n, database_url=""
            )
            async with open_backend(s, coalesce=True) as b:
                users = [f"u{i}" for i in range(32)]
                sids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(32)]
                now = time.time_ns() // 1000
                for u, sid in zip(users, sids, strict=True):
                    await b.scripts.create_session(b.keys.for_user(u), sid, title="t", conversation_data="{}",
                                                   metadata="{}", summary="", now=now)  # fmt: skip
                latencies: list[float] = []
                stop_at = time.monotonic() + seconds

                await asyncio.gather(*(
                    _append_until(b, b.keys.for_user(users[i % 32]), sids[i % 32], message, stop_at, latencies)
                    for i in range(callers)
                ))  # fmt: skip
                latencies.sort()
                runs[name].append((len(latencies) / seconds, latencies[len(latencies) // 2],
                                   latencies[int(len(latencies) * 0.99)]))  # fmt: skip
    print(f"\n# what WAIT costs: the append script through the coalescer, {callers} concurrent callers in one "
          f"process, {seconds:g} s, no HTTP, medians of {ROUNDS}")  # fmt: skip
    print(f"{'variant':24} {'calls/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, rs in runs.items():
        rps, p50, p99 = (statistics.median(x[i] for x in rs) for i in range(3))
        print(f"{name:24} {rps:8.0f} {p50:8.2f} {p99:8.2f}")


async def _append_until(
    b: Backend, uk: UserKeys, sid: str, message: dict[str, str], stop_at: float, latencies: list[float]
) -> None:
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        await b.scripts.append_message(uk, sid, message)
        latencies.append((time.perf_counter() - t0) * 1000)


async def _bucket_costs(standalone: Settings, cluster: Settings) -> None:
    print(f"\n# reads that touch every bucket: median ms of {READS} calls, in-process (one empty-ish "
          f"session per bucket, a consumer group on every outbox)")  # fmt: skip
    print(f"{'redis':11} {'buckets':>7} {'stats':>8} {'backlog':>8} {'metrics':>8} {'slots per master':>18}")
    for settings, label in ((standalone, "standalone"), (cluster, "cluster")):
        for n in BUCKET_COUNTS:
            s = replace(settings, key_prefix=f"{settings.key_prefix}b{n}", redis_buckets=n, database_url="")
            try:
                print(f"{label:11} {n:7} " + await _costs(s))
            finally:
                if label == "standalone":
                    await drop_prefix(s.redis_url, s.key_prefix)


async def _costs(s: Settings) -> str:
    keys = Keys(s.key_prefix, s.redis_buckets)
    async with open_backend(s, coalesce=True) as b:
        users: dict[int, str] = {}
        i = 0
        while len(users) < keys.buckets:
            users.setdefault(bucket_of(f"u{i}", keys.buckets), f"u{i}")
            i += 1
        now = time.time_ns() // 1000
        await asyncio.gather(*(
            b.scripts.create_session(keys.for_user(u), f"00000000-0000-0000-0000-{bucket:012d}", title="t",
                                     conversation_data="{}", metadata="{}", summary="", now=now)
            for bucket, u in users.items()
        ))  # fmt: skip
        await asyncio.gather(*(b.scripts.ensure_group(keys, n, GROUP, None) for n in range(keys.buckets)))

        async def timed(call: object) -> float:
            out = []
            for _ in range(READS):
                t0 = time.perf_counter()
                await call()  # type: ignore[operator]
                out.append((time.perf_counter() - t0) * 1000)
            return statistics.median(out)

        st = await timed(lambda: store.stats(b))
        bl = await timed(lambda: outbox.backlog(b.redis, keys))
        mt = await timed(lambda: totals._redis_figures(b, 10.0))
    spread = ""
    if s.redis_cluster:
        per = Counter(min(2, key_slot(keys.tag(n).split("{")[1].rstrip("}").encode()) // 5462)
                      for n in range(keys.buckets))  # fmt: skip
        spread = "/".join(str(per[m]) for m in range(3))
    return f"{st:8.2f} {bl:8.2f} {mt:8.2f} {spread:>18}"
