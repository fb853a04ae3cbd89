"""What every benchmark shares: ports, key prefix and schema of this run, the wrk runner, the HTTP
helpers, the outbox backlog probe, a private redis-server and the cleanup of everything a run created."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from session_svc.settings import Settings

PORT = int(os.environ.get("BENCH_PORT", "8290"))
DURATION = os.environ.get("BENCH_DURATION", "8s")
CONNECTIONS = os.environ.get("BENCH_CONNECTIONS", "64")
PREFIX = f"bench{os.getpid()}"
SCHEMA = f"bench{os.getpid()}"
BASE = f"http://127.0.0.1:{PORT}"
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

POST_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"role":"user","content":"Hello, this is a benchmark message of a typical chat size.","tokens_used":12,"cost_usd":0.0001,"metadata":{"model":"gpt-4"}}'
"""


def http(
    method: str,
    path: str,
    body: dict[str, object] | None = None,
    base: str = BASE,
    headers: dict[str, str] | None = None,
) -> dict[str, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def wait_http(base: str = BASE) -> None:
    for _ in range(100):
        try:
            http("GET", "/health", base=base)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("API did not start")


def wrk(
    path: str,
    lua: str | None = None,
    connections: str = CONNECTIONS,
    duration: str = DURATION,
    base: str = BASE,
) -> tuple[float, float, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}", "--latency"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua or "")
    cmd += ["-s", f.name, base + path]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"{path}: {errors.group(1)} error responses\n{out}")

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return rps, pct("50"), pct("99")


async def backlog(r: aioredis.Redis, settings: Settings) -> tuple[int, float]:
    from session_svc.record.keys import Keys
    from session_svc.storage.outbox import backlog as outbox_backlog

    b = await outbox_backlog(r, Keys(settings.key_prefix, settings.redis_buckets))
    return b.entries, b.oldest_age_s


CREATE_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"user_id":"bench-creator","title":"t"}'
"""


def _median(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return tuple(sorted(r[i] for r in runs)[len(runs) // 2] for i in range(3))  # type: ignore[return-value]


async def drop_prefix(redis_url: str, prefix: str) -> None:
    """Every key under ``prefix:`` (this run's, never another's), unlinked in batches."""
    r = aioredis.Redis.from_url(redis_url)
    batch: list[bytes] = []
    async for key in r.scan_iter(match=f"{prefix}:*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            await r.unlink(*batch)
            batch.clear()
    if batch:
        await r.unlink(*batch)
    await r.aclose()


async def cleanup(settings: Settings) -> None:
    await drop_prefix(settings.redis_url, PREFIX)
    pg = await asyncpg.connect(settings.database_url)
    await pg.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
    await pg.close()


def stop(procs: Iterable[subprocess.Popen[bytes] | None]) -> None:
    """SIGTERM to every process still running, then wait for each (killed after 30 s)."""
    live = [p for p in procs if p is not None and p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    for p in live:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def bench_env() -> dict[str, str]:
    return {
        **os.environ,
        "KEY_PREFIX": PREFIX,
        "DB_SCHEMA": SCHEMA,
        "SERVICE_PORT": str(PORT),
        "LOG_LEVEL": "WARNING",
        "SERVICE_PROCESSES": os.environ.get("SERVICE_PROCESSES", "1"),
    }


def free_port() -> int:
    """A TCP port nothing listens on at the moment (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def private_redis(conf: str | None = None, *extra: str) -> Iterator[str]:
    """A redis-server of this run's own, on a free port of 127.0.0.1 in a temporary directory: yields its
    URL, then stops it (SIGTERM to the process started here, by its pid) and removes the directory.

    Without ``conf``: no persistence (no RDB, no AOF). With ``conf`` (e.g. ``config/redis.conf``, AOF
    everysec): that file's settings, with port, bind, dir, daemonize, logfile and pidfile overridden on the
    command line so the server stays private. Either way ``latency-tracking no`` (Redis 7 allocates a
    histogram of about 25 KiB per command name on its first call, which is not the data's memory).
    ``BENCH_REDIS_CPUS`` (e.g. ``1``) pins the server with ``taskset -c``. ``extra``: more arguments,
    last."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    port = free_port()
    args = ["redis-server"]
    if conf:
        path = Path(conf)
        if not path.is_absolute() and not path.exists():
            path = ROOT / path
        if not path.is_file():
            raise SystemExit(f"private_redis: no config file {conf}")
        args.append(str(path.resolve()))
    args += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--daemonize", "no",
             "--logfile", str(workdir / "redis.log"), "--pidfile", str(workdir / "redis.pid"),
             "--latency-tracking", "no"]  # fmt: skip
    if not conf:
        args += ["--save", "", "--appendonly", "no"]
    args += extra
    cpus = os.environ.get("BENCH_REDIS_CPUS")
    if cpus and shutil.which("taskset"):
        args = ["taskset", "-c", cpus, *args]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                log = (
                    (workdir / "redis.log").read_text(errors="replace")[-2000:]
                    if (workdir / "redis.log").exists()
                    else ""
                )
                raise SystemExit(f"private redis-server exited with {proc.returncode}\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("private redis-server did not answer PING within 10 s")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop([proc])
        shutil.rmtree(workdir, ignore_errors=True)
