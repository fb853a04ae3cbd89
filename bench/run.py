"""Benchmark: HTTP throughput and latency of the hot paths, and write-through throughput and lag.

Run with ``scripts/bench.sh [SUBCOMMAND...]`` (it installs wrk if needed); with no subcommand it runs
them all. Everything is measured in this run on this machine, against ceilings measured in the same run,
so the ratios mean something on any machine. Uses its own key prefix and Postgres schema, and removes
them afterwards; never touches other data. ``docs/performance.md`` explains every table.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import asyncpg
import redis.asyncio as aioredis

from bench.auth import auth_table
from bench.capacity import capacity
from bench.chat_turn import chat_table
from bench.clients import clients_table
from bench.cluster import cluster_table
from bench.common import (
    CONNECTIONS,
    CREATE_LUA,
    DURATION,
    PORT,
    POST_LUA,
    PY,
    ROOT,
    SCHEMA,
    _median,
    backlog,
    bench_env,
    cleanup,
    http,
    stop,
    wait_http,
    wrk,
)
from bench.growth import growth, memory
from bench.guards import guards
from bench.rediscost import rediscost, take_options
from bench.scriptsteps import scriptsteps
from bench.writebehind import writebehind
from session_svc.settings import Settings


def hot_table(env: dict[str, str]) -> None:
    """Every hot route of the service beside its two ceilings (``bench/ceiling.py``), with 1 and N
    processes, 64 and 1 connections, repeated and interleaved; medians, and each row as a ratio of
    the one-round-trip ceiling measured in the same round."""
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    duration = os.environ.get("BENCH_ROW_DURATION", "5s")
    cores = os.cpu_count() or 1
    ports = {"json": PORT + 1, "append": PORT + 2, "pool": PORT + 3, "service": PORT}
    only = [w for w in os.environ.get("BENCH_ROWS", "").split(",") if w]  # e.g. BENCH_ROWS=ceiling,append
    print(
        f"\n# hot paths: wrk -t1 -d{duration}, medians of {repeats}, load generator on the same {cores} cores"
    )
    print(
        f"{'row':44} {'procs':>5} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs ceiling':>10} {'vs pool':>8} {'p99 vs':>8}"
    )
    for procs in [int(n) for n in os.environ.get("BENCH_PROCS", f"1,{cores}").split(",")]:
        penv = {**env, "SERVICE_PROCESSES": str(procs)}
        started = []
        try:
            for kind in ("json", "append", "pool"):
                cenv = {**penv, "SERVICE_PORT": str(ports[kind])}
                if kind == "pool":  # the same append, through redis-py's pool without coalescing
                    cenv["REDIS_COALESCE"] = "false"
                app = "json" if kind == "json" else "append"
                started.append(subprocess.Popen([PY, "-m", "bench.ceiling", app], env=cenv, cwd=ROOT))
            started.append(subprocess.Popen([PY, "-m", "session_svc"], env=penv, cwd=ROOT))
            bases = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
            for base in bases.values():
                wait_http(base)
            svc = bases["service"]
            sid = http("POST", "/api/v1/sessions", {"user_id": "bench"}, base=svc)["session_id"]
            for i in range(40):
                http("POST", f"/api/v1/sessions/{sid}/messages?user_id=bench",
                     {"role": "user", "content": f"warm {i}"}, base=svc)  # fmt: skip
            rows: list[tuple[str, str, str | None, str]] = [
                ("ceiling: bare aiohttp JSON", "/", None, "json"),
                ("ceiling: aiohttp + one append EVALSHA", "/", None, "append"),
                ("ceiling: the same, redis-py pool", "/", None, "pool"),
                ("append a message", f"/api/v1/sessions/{sid}/messages?user_id=bench", POST_LUA, "service"),
                ("get a session", f"/api/v1/sessions/{sid}?user_id=bench", None, "service"),
                ("page of 20 messages", f"/api/v1/sessions/{sid}/messages?user_id=bench&page_size=20",
                 None, "service"),
                ("create a session", "/api/v1/sessions", CREATE_LUA, "service"),
                ("a user's session list", "/api/v1/users/bench/sessions", None, "service"),
                ("stats", "/api/v1/sessions/stats", None, "service"),
            ]  # fmt: skip
            rows = [r for r in rows if r[0].startswith("ceiling:") or not only
                    or any(w in r[0] for w in only)]  # fmt: skip
            for conns in os.environ.get("BENCH_CONNS", "64,1").split(","):
                runs: dict[str, list[tuple[float, float, float]]] = {r[0]: [] for r in rows}
                for _ in range(repeats):
                    for name, path, lua, target in rows:
                        runs[name].append(wrk(path, lua, conns, duration, bases[target]))
                _, _, ceiling_p99 = ceiling = _median(runs["ceiling: aiohttp + one append EVALSHA"])
                pool = _median(runs["ceiling: the same, redis-py pool"])
                for name, *_ in rows:
                    rps, p50, p99 = _median(runs[name])
                    print(
                        f"{name:44} {procs:5} {conns:>5} {rps:8.0f} {p50:8.2f} {p99:8.2f} "
                        f"{rps / ceiling[0]:9.2f}x {rps / pool[0]:7.2f}x {p99 / ceiling_p99:7.2f}x"
                    )
        finally:
            stop(started)


def observability_cost(env: dict[str, str], rounds: int = 3) -> None:
    """Append throughput with metrics on (the default), off (METRICS=false) and with the JSON access
    log on (to a file), interleaved round by round on a fresh API process each; medians."""
    variants = {
        "metrics on (default)": {},
        "metrics off (METRICS=false)": {"METRICS": "false"},
        "metrics on + ACCESS_LOG=true": {"ACCESS_LOG": "true"},
    }
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    print(f"\n# cost of metrics and access logs: POST message, wrk -c{CONNECTIONS}, median of {rounds}")
    for _ in range(rounds):
        for name, extra in variants.items():
            with tempfile.TemporaryFile() as log:
                api = subprocess.Popen([PY, "-m", "session_svc"], env={**env, **extra}, cwd=ROOT, stderr=log)
                try:
                    wait_http()
                    sid = http("POST", "/api/v1/sessions", {"user_id": "bench"})["session_id"]
                    path = f"/api/v1/sessions/{sid}/messages?user_id=bench"
                    wrk(path, POST_LUA, duration="2s")  # warm-up
                    results[name].append(wrk(path, POST_LUA))
                finally:
                    stop([api])
    base = sorted(r[0] for r in results["metrics off (METRICS=false)"])[rounds // 2]
    print(f"{'variant':55} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs off':>8}")
    for name, runs in results.items():
        rps, p50, p99 = (sorted(x[i] for x in runs)[rounds // 2] for i in range(3))
        print(f"{name:55} {rps:9.0f} {p50:8.2f} {p99:8.2f} {rps / base:7.3f}x")


def writethrough(env: dict[str, str]) -> None:
    """The original quick table: one API process against /health, then the drain of the backlog."""
    settings = Settings.from_env(env)
    api = subprocess.Popen([PY, "-m", "session_svc"], env=env, cwd=ROOT)
    worker: subprocess.Popen[bytes] | None = None
    try:
        wait_http()
        sid = http("POST", "/api/v1/sessions", {"user_id": "bench", "title": "bench"})["session_id"]
        http("POST", f"/api/v1/sessions/{sid}/messages?user_id=bench", {"role": "user", "content": "warm"})
        print(
            f"# session_svc benchmark: wrk -t1 -c{CONNECTIONS} -d{DURATION}, one API process, "
            f"{os.cpu_count()} cores, load generator on the same machine"
        )
        wrk("/health")  # warm-up
        rows = []
        base = wrk("/health")
        rows.append(("GET /health (baseline: aiohttp+orjson, no Redis)", base))
        rows.append(("GET session (1 EVALSHA)", wrk(f"/api/v1/sessions/{sid}?user_id=bench")))
        rows.append(
            (
                "POST message (1 EVALSHA: append+counters+outbox)",
                wrk(f"/api/v1/sessions/{sid}/messages?user_id=bench", POST_LUA),
            )
        )
        rows.append(
            ("GET messages page of 20", wrk(f"/api/v1/sessions/{sid}/messages?user_id=bench&page_size=20"))
        )
        # One connection: latency of a single request with no queueing (what one chat turn sees).
        rows.append(
            ("GET session, 1 connection", wrk(f"/api/v1/sessions/{sid}?user_id=bench", connections="1"))
        )
        rows.append(
            (
                "POST message, 1 connection",
                wrk(f"/api/v1/sessions/{sid}/messages?user_id=bench", POST_LUA, connections="1"),
            )
        )
        print(f"{'endpoint':55} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs baseline':>12}")
        for name, (rps, p50, p99) in rows:
            print(f"{name:55} {rps:9.0f} {p50:8.2f} {p99:8.2f} {rps / base[0]:11.2f}x")

        # Write-through: drain the backlog the POST run left (no worker ran during it).
        async def drain() -> None:
            r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
            entries, lag = await backlog(r, settings)
            print(f"\noutbox backlog after the POST run: {entries} entries, oldest {lag:.1f}s")
            nonlocal worker
            t0 = time.monotonic()
            worker = subprocess.Popen(
                [PY, "-m", "workers"], env={**env, "SESSION_HOT_TTL": "86400"}, cwd=ROOT
            )
            while (await backlog(r, settings))[0] > 0:
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - t0
            print(
                f"drained {entries} entries in {elapsed:.2f}s (incl. worker start): {entries / elapsed:.0f} rows/s"
            )

            # Sustained: POST load with the worker running; sample the lag.
            lags: list[float] = []
            stop = asyncio.Event()

            async def sample() -> None:
                while not stop.is_set():
                    lags.append((await backlog(r, settings))[1])
                    await asyncio.sleep(0.25)

            task = asyncio.create_task(sample())
            rps, p50, p99 = await asyncio.to_thread(
                wrk, f"/api/v1/sessions/{sid}/messages?user_id=bench", POST_LUA
            )
            stop.set()
            await task
            lags.sort()
            print(
                f"sustained POST with worker running: {rps:.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms; "
                f"outbox lag p50 {lags[len(lags) // 2]:.2f}s max {lags[-1]:.2f}s"
            )
            t1 = time.monotonic()
            while (await backlog(r, settings))[0] > 0:
                await asyncio.sleep(0.05)
            print(f"caught up {time.monotonic() - t1:.2f}s after the load stopped")
            pg = await asyncpg.connect(settings.database_url)
            n = await pg.fetchval(f'SELECT count(*) FROM "{SCHEMA}".session_messages')
            mc = await pg.fetchval(f'SELECT message_count FROM "{SCHEMA}".sessions WHERE session_id=$1', sid)
            print(f"postgres: {n} message rows, session message_count {mc}")
            await pg.close()
            await r.aclose()

        asyncio.run(drain())
    finally:
        stop([api, worker])


BENCHMARKS: dict[str, Callable[[dict[str, str]], None]] = {
    "hot": hot_table,
    "clients": clients_table,
    "observability": observability_cost,
    "writethrough": writethrough,
    "growth": growth,
    "memory": memory,
    "writebehind": writebehind,
    "auth": auth_table,
    "guards": guards,
    "capacity": capacity,
    "cluster": cluster_table,
    "rediscost": rediscost,
    "chat": chat_table,
    "scriptsteps": scriptsteps,
}


def main() -> None:
    names = take_options(sys.argv[1:]) or list(BENCHMARKS)  # --ref, --conf: for rediscost
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown}; choose from {sorted(BENCHMARKS)}")
    env = bench_env()
    settings = Settings.from_env(env)
    subprocess.run([PY, "-m", "session_svc.migrate"], env=env, check=True, capture_output=True)
    try:
        for name in names:
            BENCHMARKS[name](env)
    finally:
        asyncio.run(cleanup(settings))


if __name__ == "__main__":
    main()
