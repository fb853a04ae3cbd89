"""What the service costs Redis, per write, measured as an operator would: from Redis's own counters.

``scripts/bench.sh rediscost [--ref GITREF] [--conf config/redis.conf]`` (or ``BENCH_REF``,
``BENCH_REDIS_CONF``). A private redis-server (``common.private_redis``: no persistence, or the given
config file with its AOF), one API process (``python -m session_svc``) pointed at it and at a Postgres
schema of its own, no worker at first. Over HTTP, ``BENCH_COST_CLIENTS`` (16) requests in flight:

1. create ``SESSIONS`` (50) sessions; ``CONFIG RESETSTAT``; append ``BENCH_COST_APPENDS`` (20,000)
   messages of 1 KiB, round-robin over the sessions; read ``INFO commandstats`` (EVALSHA's
   usec_per_call, and every command's calls), ``INFO cpu`` (the server's user + system CPU, as a delta)
   and ``INFO memory`` (``used_memory`` less ``mem_clients_normal``, as a delta from before the appends);
2. start one worker (``python -m workers``), wait until Postgres holds every message and the outbox
   streams are drained and trimmed, read ``INFO memory`` again: the bytes per message once flushed;
3. stop the worker; then, each in its own RESETSTAT window, ``BENCH_COST_CALLS`` (2,000) creates of a
   session, creates of a memory (``POST .../memory``, 1 KiB) and updates of a session's title (``PUT``);
4. stop the API; the bare baseline: ``BENCH_COST_APPENDS`` EVALSHAs of a script doing one ``HSET`` of a
   field and one ``XADD`` of a 1 KiB field, from this process, the same number in flight.

Everything is driven over HTTP, SQL and Redis commands, never through the service's modules, so that
``--ref`` can run the API and worker of another commit (a temporary ``git worktree`` of that ref on
``PYTHONPATH``, this venv's python) and old and new code can be compared on the same machine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from bench.common import PY, ROOT, free_port, private_redis, stop

SESSIONS = 50
CLIENTS = int(os.environ.get("BENCH_COST_CLIENTS", "16"))
APPENDS = int(os.environ.get("BENCH_COST_APPENDS", "20000"))
CALLS = int(os.environ.get("BENCH_COST_CALLS", "2000"))
CHUNKS = int(os.environ.get("BENCH_COST_SLICES", "5"))
CONTENT = ("The quick brown fox jumps over the lazy dog. " * 24)[:1024]  # 1 KiB of ASCII
DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
MESSAGES_TABLE = "session_messages"
JSON = {"Content-Type": "application/json"}
# The benchmark's own commands, left out of the per-request counts.
OWN = {"info", "config|resetstat", "ping", "script|load"}

BARE_LUA = "redis.call('HSET', KEYS[1], 'f', ARGV[1]) return redis.call('XADD', KEYS[2], '*', 'v', ARGV[2])"

Request = tuple[str, str, dict[str, object]]


def take_options(argv: list[str]) -> list[str]:
    """``--ref GITREF`` and ``--conf FILE`` (also ``--ref=...``) into ``BENCH_REF`` and
    ``BENCH_REDIS_CONF``; returns the other arguments (the benchmark names)."""
    names: list[str] = []
    options = {"--ref": "BENCH_REF", "--conf": "BENCH_REDIS_CONF"}
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in options:
            if not eq:
                value = next(it, "")
            if not value:
                raise SystemExit(f"{name} needs a value")
            os.environ[options[name]] = value
        else:
            names.append(arg)
    return names


@contextmanager
def code_tree(ref: str | None) -> Iterator[tuple[Path, str]]:
    """The tree to run the service from: this working tree, or a temporary detached worktree of ``ref``
    (removed afterwards). Yields the path and a label naming the commit."""
    if not ref:
        head = _git(ROOT, "rev-parse", "--short", "HEAD")
        dirty = (
            " + uncommitted changes" if _git(ROOT, "status", "--porcelain", "--untracked-files=no") else ""
        )
        yield ROOT, f"working tree (HEAD {head}{dirty})"
        return
    tmp = Path(tempfile.mkdtemp(prefix="rediscost-tree-"))
    tree = tmp / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), ref], check=True
    )
    try:
        yield tree, f"{ref} ({_git(tree, 'rev-parse', '--short', 'HEAD')}, a temporary worktree)"
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def _git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@dataclass
class Window:
    """What Redis counted over one kind of request (summed over the slices of ``window``)."""

    name: str
    requests: int
    wall_s: float
    stats: dict[str, dict[str, float]]
    mem_delta: int  # used_memory less client buffers, after less before
    mem0: int  # the same before the window
    slices: list[tuple[float, float]]  # per slice: (EVALSHA usec per call, server CPU µs per request)
    after_flush: float | None = None  # bytes per request once flushed (appends only)
    extra: list[str] = field(default_factory=list)

    @property
    def evalsha_per_req(self) -> float:
        return self.stats.get("evalsha", {}).get("calls", 0) / self.requests

    @property
    def usec_per_evalsha(self) -> float:
        return statistics.median(u for u, _ in self.slices)

    @property
    def usec_range(self) -> str:
        us = sorted(u for u, _ in self.slices)
        return f"{us[0]:.0f}-{us[-1]:.0f}"

    @property
    def cpu_us_per_req(self) -> float:
        return statistics.median(c for _, c in self.slices)

    @property
    def commands_per_req(self) -> float:
        """Every command Redis ran for these requests, inside scripts or not, EVALSHA itself excluded."""
        return (
            sum(s["calls"] for c, s in self.stats.items() if c not in OWN and c != "evalsha") / self.requests
        )


async def _cpu(r: aioredis.Redis) -> float:
    cpu = await r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def _memory(r: aioredis.Redis) -> int:
    """``used_memory`` less the client buffers (``mem_clients_normal``): what the data holds."""
    m = await r.info("memory")
    return int(m["used_memory"]) - int(m.get("mem_clients_normal", 0))


async def _commandstats(r: aioredis.Redis) -> dict[str, dict[str, float]]:
    raw = await r.info("commandstats")
    return {k.removeprefix("cmdstat_"): {f: float(v) for f, v in s.items()} for k, s in raw.items()}


async def window(
    r: aioredis.Redis, name: str, requests: int, run: Callable[[range], Awaitable[None]]
) -> Window:
    """``requests`` requests in ``CHUNKS`` slices, each its own RESETSTAT window: the commands and the
    memory are summed over the slices, the per-call figures are the median slice's (robust to a moment
    of noise from other processes on the cores)."""
    mem0 = await _memory(r)
    wall = 0.0
    stats: dict[str, dict[str, float]] = {}
    slices: list[tuple[float, float]] = []  # (EVALSHA usec per call, server CPU µs per request)
    bounds = [requests * k // CHUNKS for k in range(CHUNKS + 1)]
    for lo, hi in itertools.pairwise(bounds):
        await r.config_resetstat()
        cpu0 = await _cpu(r)
        t0 = time.perf_counter()
        await run(range(lo, hi))
        wall += time.perf_counter() - t0
        cpu = await _cpu(r) - cpu0
        part = await _commandstats(r)
        for c, st in part.items():
            total = stats.setdefault(c, {"calls": 0.0, "usec": 0.0})
            total["calls"] += st["calls"]
            total["usec"] += st["usec"]
        ev = part.get("evalsha", {"calls": 0.0, "usec": 0.0})
        slices.append((ev["usec"] / ev["calls"] if ev["calls"] else float("nan"), cpu * 1e6 / (hi - lo)))
    return Window(name, requests, wall, stats, await _memory(r) - mem0, mem0, slices)


async def drive(base: str, indices: range, make: Callable[[int], Request]) -> None:
    """``make(i)`` for each index, over HTTP, ``CLIENTS`` in flight; any answer other than 2xx ends the benchmark."""
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as s:
        todo = iter(indices)

        async def client() -> None:
            for i in todo:
                method, path, body = make(i)
                async with s.request(method, base + path, data=json.dumps(body), headers=JSON) as resp:
                    text = await resp.read()
                    if resp.status >= 300:
                        raise SystemExit(f"{method} {path}: {resp.status} {text[:300]!r}")

        await asyncio.gather(*(client() for _ in range(CLIENTS)))


async def _wait_http(base: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            if proc.poll() is not None:
                raise SystemExit(f"the API exited with {proc.returncode}")
            try:
                async with s.get(base + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("the API did not answer /health within 30 s")


async def _outbox_streams(r: aioredis.Redis) -> list[str]:
    """Every stream with a consumer group: the outbox (found by what it is, not by its key names)."""
    found = []
    async for key in r.scan_iter(count=1000, _type="STREAM"):
        if await r.xinfo_groups(key):
            found.append(key)
    return found


async def _drained(r: aioredis.Redis, streams: list[str]) -> tuple[bool, int]:
    """(every group has read to the end and has nothing pending, total entries left in the streams)."""
    done, left = True, 0
    for key in streams:
        info = await r.xinfo_stream(key)
        left += int(info["length"])
        for g in await r.xinfo_groups(key):
            if int(g["pending"]) or g["last-delivered-id"] != info["last-generated-id"]:
                done = False
    return done, left


async def flush(
    r: aioredis.Redis, pg: asyncpg.Connection, schema: str, expect: int
) -> tuple[float, float, int]:
    """Waits for Postgres to hold ``expect`` messages, then for the outbox to be drained and trimmed (the
    worker trims below the oldest unacknowledged entry in its maintenance round, every 5 s, by whole
    stream nodes). Returns (seconds to the last row, seconds to trimmed, entries left)."""
    t0 = time.monotonic()
    while True:
        n = await pg.fetchval(f'SELECT count(*) FROM "{schema}".{MESSAGES_TABLE}')
        if n >= expect:
            break
        if time.monotonic() - t0 > 300:
            raise SystemExit(f"Postgres holds {n} of {expect} messages after 300 s")
        await asyncio.sleep(0.1)
    rows_s = time.monotonic() - t0
    streams = await _outbox_streams(r)
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        done, left = await _drained(r, streams)
        # Trimmed: few entries left (at most a node per stream), and the same on two looks 1 s apart.
        if done and left <= 100 * max(1, len(streams)) and left == last:
            break
        last = left if done else None
        await asyncio.sleep(1.0)
    return rows_s, time.monotonic() - t0, last or 0


def rediscost(env: dict[str, str]) -> None:
    """``scripts/bench.sh rediscost``: the environment of ``bench.run`` (REDIS_URL and the shared
    schema unused: a private Redis and a schema of its own)."""
    asyncio.run(main(env))


async def main(env: dict[str, str]) -> None:
    ref = env.get("BENCH_REF") or None
    conf = env.get("BENCH_REDIS_CONF") or None
    schema = f"rediscost{os.getpid()}"
    database_url = env.get("DATABASE_URL") or DATABASE_URL
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with code_tree(ref) as (tree, label), private_redis(conf) as redis_url:
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        version = (await r.info("server"))["redis_version"]
        svc = {k: v for k, v in env.items() if k not in ("REDIS_CLUSTER_NODES", "PROMETHEUS_MULTIPROC_DIR")}
        svc |= {
            "REDIS_URL": redis_url,
            "ARQ_REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "DB_SCHEMA": schema,
            "KEY_PREFIX": "rediscost",
            "SERVICE_PORT": str(port),
            "SERVICE_PROCESSES": "1",
            "SESSION_HOT_TTL": "86400",  # flushed sessions stay hot: the memory is the hot tier's
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH", "")) if p),
        }
        print(
            f"\n# Redis cost per write: {label}; private Redis {version}, "
            f"{'config ' + conf if conf else 'no persistence'}; one API process, {CLIENTS} requests in flight"
        )
        api = worker = None
        pg = await asyncpg.connect(database_url)
        try:
            migrate = subprocess.run(
                [PY, "-m", "session_svc.migrate"], env=svc, cwd=tree, capture_output=True, text=True
            )
            if migrate.returncode:
                raise SystemExit(f"migration failed:\n{migrate.stderr[-2000:]}")
            where = subprocess.run(
                [PY, "-c", "import session_svc, workers; print(session_svc.__file__, workers.__file__)"],
                env=svc, cwd=tree, capture_output=True, text=True, check=True,
            ).stdout.split()  # fmt: skip
            if not all(Path(w).resolve().is_relative_to(tree.resolve()) for w in where):
                raise SystemExit(f"the service would run from {where}, not from {tree}")
            api = subprocess.Popen([PY, "-m", "session_svc"], env=svc, cwd=tree)
            await _wait_http(base, api)
            sids: list[str] = []

            async def create_sessions() -> None:
                async with aiohttp.ClientSession() as s:
                    for i in range(SESSIONS):
                        body = {
                            "user_id": f"cost-user-{i}",
                            "title": f"cost {i}",
                            "metadata": {"bench": True},
                        }
                        async with s.post(base + "/api/v1/sessions", json=body) as resp:
                            resp.raise_for_status()
                            sids.append((await resp.json())["session_id"])

            await create_sessions()
            owner = {sid: f"cost-user-{i}" for i, sid in enumerate(sids)}

            def append(i: int) -> Request:
                sid = sids[i % SESSIONS]
                body = {"role": "user", "content": CONTENT, "tokens_used": 256, "cost_usd": 0.0001,
                        "metadata": {"model": "gpt-4"}}  # fmt: skip
                return "POST", f"/api/v1/sessions/{sid}/messages?user_id={owner[sid]}", body

            windows: list[Window] = []
            appends = await window(r, "append a 1 KiB message", APPENDS, lambda ix: drive(base, ix, append))
            windows.append(appends)

            worker = subprocess.Popen([PY, "-m", "workers"], env=svc, cwd=tree)
            rows_s, trimmed_s, left = await flush(r, pg, schema, APPENDS)
            # Bytes per message once flushed: from the memory before the appends, as the window's delta.
            appends.after_flush = (await _memory(r) - appends.mem0) / APPENDS
            appends.extra.append(
                f"flush: {APPENDS:,} rows in Postgres {rows_s:.1f} s after the worker started, outbox "
                f"drained and trimmed after {trimmed_s:.1f} s ({left} entries left)"
            )
            stop([worker])
            worker = None

            def create(i: int) -> Request:
                return (
                    "POST",
                    "/api/v1/sessions",
                    {"user_id": f"cost-user-{i % SESSIONS}", "title": f"more {i}"},
                )

            def memory(i: int) -> Request:
                sid = sids[i % SESSIONS]
                return "POST", f"/api/v1/sessions/{sid}/memory?user_id={owner[sid]}", {
                    "memory_type": "preference", "content": CONTENT}  # fmt: skip

            def update(i: int) -> Request:
                sid = sids[i % SESSIONS]
                return "PUT", f"/api/v1/sessions/{sid}?user_id={owner[sid]}", {"title": f"renamed {i}"}

            for name, make in (("create a session", create), ("create a 1 KiB memory", memory),
                               ("update a session's title", update)):  # fmt: skip
                windows.append(await window(r, name, CALLS, lambda ix, make=make: drive(base, ix, make)))
            stop([api])
            api = None

            bare = await baseline(redis_url)
        finally:
            stop([api, worker])
            await pg.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await pg.close()
            await r.aclose()
    report(windows, bare)


async def baseline(redis_url: str) -> Window:
    """The bare script: one HSET of a field and one XADD of a 1 KiB field, by EVALSHA, ``CLIENTS`` in
    flight from this process."""
    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=CLIENTS, decode_responses=True)
    r = aioredis.Redis(connection_pool=pool)
    sha = await r.script_load(BARE_LUA)
    value = CONTENT

    async def run(indices: range) -> None:
        todo = iter(indices)

        async def client() -> None:
            for i in todo:
                await r.evalsha(sha, 2, f"bare:h:{i % SESSIONS}", f"bare:x:{i % SESSIONS}", str(i), value)

        await asyncio.gather(*(client() for _ in range(CLIENTS)))

    try:
        return await window(r, "bare EVALSHA of HSET + XADD 1 KiB", APPENDS, run)
    finally:
        await r.aclose()
        await pool.disconnect()


def report(windows: list[Window], bare: Window) -> None:
    print(
        "| write | requests | EVALSHA/req | EVALSHA µs/call (slices) | vs bare | Redis CPU µs/req | vs bare "
        "| commands/req | B/req before flush | B/req after flush | req/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in [*windows, bare]:
        after = f"{w.after_flush:,.0f}" if w.after_flush is not None else ""
        print(
            f"| {w.name} | {w.requests:,} | {w.evalsha_per_req:.2f} | {w.usec_per_evalsha:.1f} ({w.usec_range}) "
            f"| {w.usec_per_evalsha / bare.usec_per_evalsha:.2f}x | {w.cpu_us_per_req:.1f} "
            f"| {w.cpu_us_per_req / bare.cpu_us_per_req:.2f}x | {w.commands_per_req:.1f} "
            f"| {w.mem_delta / w.requests:,.0f} | {after} | {w.requests / w.wall_s:,.0f} |"
        )
    for w in [*windows, bare]:
        for line in w.extra:
            print(line)
    print(
        f"(per-call figures: the median of {CHUNKS} slices, each its own RESETSTAT window; "
        "commands and bytes: over all of them)"
    )
    print("\ncommands per request, by command (calls / requests, and Redis's usec_per_call):")
    for w in [*windows, bare]:
        parts = sorted(
            ((c, s["calls"] / w.requests, s["usec"] / s["calls"]) for c, s in w.stats.items()
             if c not in OWN and s["calls"]),
            key=lambda x: -x[1],
        )  # fmt: skip
        print(f"- {w.name}: " + ", ".join(f"{c} {n:.2f} ({u:.1f} µs)" for c, n, u in parts))


if __name__ == "__main__":
    names = take_options(sys.argv[1:])
    if names:
        raise SystemExit(f"unexpected arguments {names}")
    rediscost(dict(os.environ))
