"""Support for the write-through, cold-path and fault tests (test_writethrough, test_cold, test_fault).

- Postgres schemas made by the project's own migrations (one per test module, or per fault test).
- In-process draining of the outbox with ``workers.flush.Flusher`` until the backlog is zero.
- Reading what Postgres holds and what the API answered into the same plain shapes, so a test compares
  them with one ``==`` (money as ``Decimal``, timestamps as the API's ISO strings at microseconds).
- Private servers for fault injection: a ``redis-server`` and a PostgreSQL 15 cluster (``initdb``,
  ``pg_ctl``) on spare ports, and the real worker (``python -m workers``) as a subprocess.
- A model of acknowledged writes and the check "Postgres equals the model".

Nothing here touches the shared servers beyond the schema and key prefix a test owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import orjson
import redis as redis_sync
from redis.asyncio import Redis

from session_svc import migrate, outbox
from session_svc.keys import Keys
from session_svc.resources import Backend
from session_svc.scripts import Scripts
from session_svc.settings import Settings
from workers.flush import Flusher

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SETTINGS_ENV = {name.upper() for name in Settings.__dataclass_fields__}

T = TypeVar("T")


# Polling -----------------------------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T]], what: str, within: float = 20.0, interval: float = 0.02
) -> T:
    """Poll ``check`` until it returns something truthy; fail (AssertionError) after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what} (last: {result!r})")
        await asyncio.sleep(interval)


def wait_sync(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


# Schemas and key prefixes ------------------------------------------------------------------------------


def new_name(stem: str) -> str:
    return f"{stem}{uuid.uuid4().hex[:10]}"


def create_schema(database_url: str) -> str:
    """A fresh schema migrated to head. Synchronous: ``migrate.upgrade`` runs its own event loop."""
    schema = new_name("wt_")
    migrate.upgrade(Settings(database_url=database_url, db_schema=schema))
    return schema


def drop_schema(database_url: str, schema: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def delete_keys(redis_url: str, prefix: str) -> None:
    """SCAN MATCH prefix:* and DEL: never FLUSHDB (the server is shared)."""
    with redis_sync.Redis.from_url(redis_url) as r:
        batch = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(batch), 500):
            r.delete(*batch[i : i + 500])


async def keys_under(redis: Redis, pattern: str) -> list[str]:
    return sorted([k async for k in redis.scan_iter(match=pattern, count=1000)])


# Draining the outbox in-process ------------------------------------------------------------------------


def make_flusher(redis: Redis, pool: asyncpg.Pool, keys: Keys, schema: str, **kw: Any) -> Flusher:
    """A flusher that reclaims at once (``claim_idle_ms=0``): the test is its only consumer."""
    options: dict[str, Any] = {"batch_size": 500, "max_deliveries": 3, "claim_idle_ms": 0}
    options.update(kw)
    return Flusher(Backend(redis, keys, Scripts(redis), pool, schema), new_name("t-"), **options)


async def drain(flusher: Flusher, within: float = 15.0) -> int:
    """Read (or reclaim) and flush until the outbox backlog is 0. Returns how many entries it flushed."""
    await flusher.ensure_groups()
    flushed = 0
    deadline = time.monotonic() + within
    while True:
        entries = await flusher.read() or await flusher.reclaim()
        if entries:
            await flusher.flush(entries)
            flushed += len(entries)
        else:
            backlog = await outbox.backlog(flusher.redis, flusher.keys)
            if backlog.entries == 0:
                return flushed
            await asyncio.sleep(0.01)
        if time.monotonic() > deadline:
            raise AssertionError(f"outbox not drained after {within}s")


async def dead_letters(redis: Redis, keys: Keys) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for bucket in range(keys.buckets):
        out += [f for _id, f in await redis.xrange(keys.dead(bucket))]
    return out


async def pending_per_consumer(redis: Redis, keys: Keys) -> dict[str, int]:
    """Pending outbox entries per consumer, over every bucket."""
    out: dict[str, int] = {}
    for bucket in range(keys.buckets):
        try:
            consumers = await redis.xinfo_consumers(keys.outbox(bucket), outbox.GROUP)
        except redis_sync.ResponseError:
            continue
        for c in consumers:
            out[c["name"]] = out.get(c["name"], 0) + int(c["pending"])
    return out


# Comparable shapes -------------------------------------------------------------------------------------


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def money(value: float | int) -> Decimal:
    """What the API's JSON number means, exactly (shortest repr of the double)."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def _json(text: str) -> Any:
    return orjson.loads(text)


def api_session(body: dict[str, Any], memory_count: int, version: int | None = None) -> dict[str, Any]:
    out = {k: body[k] for k in _SESSION_KEYS}
    out["total_cost"] = money(body["total_cost"])
    out["memory_count"] = memory_count
    if version is not None:
        out["version"] = version
    return out


_SESSION_KEYS = (
    "session_id",
    "user_id",
    "title",
    "status",
    "is_active",
    "conversation_data",
    "metadata",
    "message_count",
    "total_tokens",
    "total_cost",
    "session_summary",
    "created_at",
    "updated_at",
    "last_activity",
)


def api_message(m: dict[str, Any]) -> dict[str, Any]:
    return {**m, "cost_usd": money(m["cost_usd"])}


def api_memory(m: dict[str, Any], seq: int) -> dict[str, Any]:
    return {**m, "seq": seq}


async def pg_sessions(conn: Any, schema: str, sids: Sequence[str]) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch(f'SELECT * FROM "{schema}".sessions WHERE session_id = ANY($1::text[])', sids)
    out = {}
    for r in rows:
        out[r["session_id"]] = {
            "session_id": r["session_id"],
            "user_id": r["user_id"],
            "title": r["title"],
            "status": r["status"],
            "is_active": r["is_active"],
            "conversation_data": _json(r["conversation_data"]),
            "metadata": _json(r["metadata"]),
            "message_count": r["message_count"],
            "total_tokens": r["total_tokens"],
            "total_cost": r["total_cost"],
            "session_summary": r["session_summary"],
            "created_at": iso(r["created_at"]),
            "updated_at": iso(r["updated_at"]),
            "last_activity": iso(r["last_activity"]),
            "memory_count": r["memory_count"],
            "version": r["version"],
        }
    return out


async def pg_messages(conn: Any, schema: str, sid: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f'SELECT * FROM "{schema}".session_messages WHERE session_id = $1 ORDER BY seq', sid
    )
    return [
        {
            "message_id": r["message_id"],
            "session_id": r["session_id"],
            "user_id": r["user_id"],
            "sequence": r["seq"],
            "role": r["role"],
            "content": r["content"],
            "message_type": r["message_type"],
            "metadata": _json(r["metadata"]),
            "tokens_used": r["tokens_used"],
            "cost_usd": r["cost_usd"],
            "created_at": iso(r["created_at"]),
        }
        for r in rows
    ]


async def pg_memories(conn: Any, schema: str, sid: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f'SELECT * FROM "{schema}".session_memories WHERE session_id = $1 ORDER BY seq', sid
    )
    return [
        {
            "memory_id": r["memory_id"],
            "session_id": r["session_id"],
            "user_id": r["user_id"],
            "memory_type": r["memory_type"],
            "content": r["content"],
            "metadata": _json(r["metadata"]),
            "created_at": iso(r["created_at"]),
            "seq": r["seq"],
        }
        for r in rows
    ]


async def pg_snapshot(conn: Any, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the three tables, as tuples in a stable order (to compare whole states)."""
    out = {}
    for table, order in (
        ("sessions", "session_id"),
        ("session_messages", "session_id, seq"),
        ("session_memories", "session_id, seq"),
    ):
        rows = await conn.fetch(f'SELECT * FROM "{schema}".{table} ORDER BY {order}')
        out[table] = [tuple(r.values()) for r in rows]
    return out


# The model of acknowledged writes ----------------------------------------------------------------------


@dataclass
class Model:
    """What the API acknowledged (200): sessions, and per session its messages and memories."""

    users: dict[str, str] = field(default_factory=dict)  # sid -> uid
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    memories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # non-200 answers to writes that should succeed

    def session(self, body: dict[str, Any]) -> str:
        sid = body["session_id"]
        self.users[sid] = body["user_id"]
        self.messages[sid] = []
        self.memories[sid] = []
        return sid

    @property
    def message_total(self) -> int:
        return sum(len(v) for v in self.messages.values())


async def assert_postgres_equals_model(
    client: Any, redis: Redis, keys: Keys, conn: Any, schema: str, model: Model
) -> None:
    """Postgres holds every acknowledged write exactly once, with the values the API answered.

    Sessions are compared with what the API answers now (all fields, and the Redis version), messages
    and memories with the acknowledgements themselves; sequence numbers are 1..n without gaps.
    """
    assert not model.failures, model.failures[:5]
    sids = list(model.users)
    total = await conn.fetchval(f'SELECT count(*) FROM "{schema}".sessions')
    assert total == len(sids)
    rows = await pg_sessions(conn, schema, sids)
    for sid, uid in model.users.items():
        resp = await client.get(f"/api/v1/sessions/{sid}", params={"user_id": uid})
        body = await resp.json()
        assert resp.status == 200, body
        h = await redis.hgetall(keys.for_user(uid).session(sid))
        version = int(h["v"]) if h else rows[sid]["version"]
        if h:
            assert h["fv"] == h["v"], (sid, h)
        assert rows[sid] == api_session(body, len(model.memories[sid]), version), sid
        msgs = sorted(model.messages[sid], key=lambda m: m["sequence"])
        assert [m["sequence"] for m in msgs] == list(range(1, len(msgs) + 1)), sid
        assert await pg_messages(conn, schema, sid) == [api_message(m) for m in msgs], sid
        # Memories written concurrently are numbered in the order Redis ran them: compare by id.
        stored = await pg_memories(conn, schema, sid)
        assert [m.pop("seq") for m in stored] == list(range(1, len(stored) + 1)), sid
        by_id = {m["memory_id"]: m for m in stored}
        assert by_id == {m["memory_id"]: m for m in model.memories[sid]}, sid
    n_msg = await conn.fetchval(f'SELECT count(*) FROM "{schema}".session_messages')
    n_mem = await conn.fetchval(f'SELECT count(*) FROM "{schema}".session_memories')
    assert (n_msg, n_mem) == (model.message_total, sum(len(v) for v in model.memories.values()))


# Private servers for fault injection -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A private ``redis-server`` in its own directory; ``args`` add to its command line (persistence,
    maxmemory). ``restart`` starts it again on the same port and directory (reloading its AOF)."""

    port: int
    proc: subprocess.Popen[bytes]
    dir: Path
    args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.port, decode_responses=True, socket_timeout=10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.proc = _spawn_redis(self.port, self.dir, self.args)
        if not _redis_answers(self.proc, self.port):
            raise RuntimeError(f"private redis-server did not come back on port {self.port}")

    def destroy(self) -> None:
        if self.proc.poll() is None:
            self.resume()  # a stopped process only dies of SIGKILL, but do not leave it stopped
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _spawn_redis(port: int, workdir: Path, args: Sequence[str]) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(workdir), *args]  # later options override earlier ones
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _redis_answers(proc: subprocess.Popen[bytes], port: int, within: float = 10.0) -> bool:
    """Until it answers PING (not LOADING), or it exits, or ``within`` passes."""
    deadline = time.monotonic() + within
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with redis_sync.Redis(port=port, socket_connect_timeout=0.5) as r:
                if r.ping():
                    return True
        except (redis_sync.ConnectionError, redis_sync.BusyLoadingError):
            pass
        time.sleep(0.05)
    return False


def start_redis(*args: str) -> RedisServer:
    """A private redis-server (no persistence unless ``args`` say otherwise, e.g. ``--appendonly yes``)."""
    workdir = Path(tempfile.mkdtemp(prefix="wt-redis-"))
    for _ in range(5):  # a probed free port can be taken before redis binds it
        port = free_port()
        proc = _spawn_redis(port, workdir, args)
        if _redis_answers(proc, port):
            return RedisServer(port, proc, workdir, tuple(args))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError("could not start a private redis-server")


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PgServer:
    """A private PostgreSQL 15 cluster (trust auth, fsync off) in its own directory."""

    dir: Path
    port: int = 0

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args])
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)

    def init(self) -> None:
        cmd = [str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
        cmd += ["-E", "UTF8", "--locale=C", "--no-sync"]
        subprocess.run(_as_postgres(cmd), capture_output=True, text=True, timeout=120, check=True)

    def start(self) -> None:
        for _ in range(3):  # the port may be taken between probing and binding
            self.port = self.port or free_port()
            opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            log = str(self.dir / "server.log")
            if self._ctl("-o", opts, "-l", log, "-w", "-t", "60", "start", check=False).returncode == 0:
                return
            self.port = 0
        raise RuntimeError("could not start a private postgres: " + self.log_tail())

    def stop(self, mode: str) -> None:
        self._ctl("-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        return self._ctl("status", check=False).returncode == 0

    def log_tail(self, chars: int = 3000) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            if self.running:
                with contextlib.suppress(Exception):
                    self.stop("fast")
                if self.running:
                    self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def start_postgres() -> PgServer:
    workdir = Path(tempfile.mkdtemp(prefix="wt-pg-"))
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    server = PgServer(workdir)
    try:
        server.init()
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server


# The real worker as a subprocess -----------------------------------------------------------------------


# A worker given SIGTERM finishes the batch in hand (at most 10 s, see ``workers.main.serve``), then
# stops its tasks and closes its connections; past this it is taken as hung.
WORKER_STOP_TIMEOUT_S = 20.0


@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    killed: bool = False  # by a test, on purpose: its exit status says nothing

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing is acknowledged on the way out."""
        self.killed = True
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT_S) -> float:
        """SIGTERM, the way an operator or a supervisor stops it, and the graceful path must hold: the
        worker exits by itself, with status 0, within ``timeout`` s. Returns how long it took. A worker
        that hangs is SIGKILLed; one that exited before (a crash) or exits non-zero fails too."""
        if self.proc.poll() is not None:
            raise AssertionError(
                f"worker {self.name} had already exited with status {self.proc.returncode} before "
                f"SIGTERM\n{self.tail()}"
            )
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"worker {self.name} still running {timeout:.0f}s after SIGTERM\n{self.tail()}"
            ) from None
        took = time.monotonic() - t0
        assert status == 0, f"worker {self.name} exited with status {status} on SIGTERM\n{self.tail()}"
        return took

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def stop_workers(workers: Sequence[WorkerProcess]) -> dict[str, float]:
    """Teardown: SIGTERM every worker the test did not kill on purpose, all of them even when one fails;
    then fail with what went wrong (a hang, a crash, a non-zero exit). Returns seconds taken by name."""
    problems: list[str] = []
    took: dict[str, float] = {}
    for worker in workers:
        if worker.killed:
            continue
        try:
            took[worker.name] = worker.stop()
        except AssertionError as exc:
            problems.append(str(exc))
    if problems:
        raise AssertionError("\n\n".join(problems))
    return took


def start_worker(settings: Settings, name: str, log_dir: Path, **extra_env: str) -> WorkerProcess:
    """``python -m workers`` with its settings in the environment (and nothing else of ours)."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    for f in fields(settings):  # every setting, so the worker runs exactly as configured
        value = getattr(settings, f.name)
        env[f.name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(WORKER_NAME=name, PYTHONUNBUFFERED="1")
    env.update(extra_env)
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return WorkerProcess(name, proc, log)
