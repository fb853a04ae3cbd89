"""Redis client bake-off for the API (``scripts/bench.sh clients``; issue 10).

Each variant is a bare aiohttp handler (served like ``bench/ceiling.py``: uvloop, SO_REUSEPORT, N
processes) doing exactly one call of the service's real append script: ``Scripts.append_message``,
same Lua source, same keys and arguments, answering a small JSON document. Only the transport under
``session_svc.storage.scripts.Script`` changes:

- ``redis-py pool``: ``redis_client`` + ``Scripts(redis, coalesce=False)`` (one pooled connection
  and one round trip per call);
- ``redis-py coalescing``: ``Scripts(redis, coalesce=True)``, the service's default (``coalesce.py``);
- ``valkey-glide``: async ``GlideClient`` (standalone), ``invoke_script`` (EVALSHA, SCRIPT LOAD and
  again on NOSCRIPT, in its Rust core), one multiplexed connection;
- ``coredis``: async ``coredis.Redis``, its ``Script`` object (EVALSHA, SCRIPT LOAD and again on
  NOSCRIPT), connections multiplexed by its pool.

glide and coredis take the place of the coalescer: ``Script`` hands a call to ``_coalescer.call(sha,
source, keys, args)``, so an object with that method is a transport, and ``Script`` builds the key and
argument lists exactly as in the service. The same swap (``session_svc.storage.scripts.Coalescer`` replaced by a
glide transport, bench only) runs the real service's append route on glide beside the service as it is.

``capabilities`` then tries each client against private redis-server instances (a spare port, stopped
after): a bounded wait when Redis is paused (CLIENT PAUSE) or stopped, NOSCRIPT recovery after SCRIPT
FLUSH, and on a private 3-node Redis Cluster whether scripts run, singly and pipelined across nodes.

glide and coredis are the optional extra ``bench`` (``pip install -e '.[bench]'``, which
``scripts/bench.sh`` does); a variant whose client is missing is skipped with the reason.

``python -m bench.clients serve VARIANT`` (a harness server), ``service-glide`` (the service on glide),
``probe`` (the capability table alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import orjson
from aiohttp import web
from redis import exceptions as rex

from bench.ceiling import serve_app
from bench.common import POST_LUA, PY, ROOT, _median, bench_env, http, stop, wait_http, wrk
from session_svc.record.keys import Keys
from session_svc.record.shapes import now_us
from session_svc.settings import Settings
from session_svc.storage import redis_client as rc
from session_svc.storage.redis_client import redis_client
from session_svc.storage.scripts import Script, Scripts

USER = "clients"
VARIANTS = {
    "redispy": "redis-py pool",
    "coalesce": "redis-py coalescing",
    "glide": "valkey-glide GlideClient",
    "coredis": "coredis Redis",
}
MODULES = {"glide": "glide", "coredis": "coredis"}
Arg = str | int | float


def skipped(variant: str) -> str | None:
    """Why ``variant`` cannot run here (its client is not installed), or None."""
    module = MODULES.get(variant)
    if module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} cannot be imported ({exc}); scripts/bench.sh installs the extra 'bench'"
    return None


def version(variant: str) -> str:
    from importlib.metadata import version as dist_version

    dist = {"redispy": "redis", "coalesce": "redis", "glide": "valkey-glide", "coredis": "coredis"}[variant]
    return dist_version(dist)


def _address(settings: Settings) -> tuple[str, int, int]:
    u = urlparse(settings.redis_url)
    return u.hostname or "127.0.0.1", u.port or 6379, int((u.path or "/0").lstrip("/") or 0)


def _text(value: Any) -> Any:
    """glide answers bytes; the service reads str (redis-py's ``decode_responses=True``)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value


# Transports: what ``Script`` calls instead of the coalescer ------------------------------------------------


class _Transport:
    """A client's script objects, made once per script."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._scripts: dict[str, Any] = {}

    def script(self, sha: str, source: str) -> Any:
        script = self._scripts.get(sha)
        if script is None:
            script = self._scripts[sha] = self.make(source)
        return script

    def make(self, source: str) -> Any:
        raise NotImplementedError


class GlideTransport(_Transport):
    """``invoke_script`` per call; glide errors mapped to the redis-py ones the service answers 503 for
    (a timeout or a lost connection: the outcome is unknown, as redis_client says)."""

    def make(self, source: str) -> Any:
        import glide

        return glide.Script(source)

    async def call(self, sha: str, source: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        import glide

        script = self.script(sha, source)
        try:
            reply = await self.client.invoke_script(
                script, keys=list(keys), args=[a if isinstance(a, str) else str(a) for a in args]
            )
        except glide.TimeoutError as exc:
            rc.mark_outcome_unknown()
            raise rex.TimeoutError(str(exc)) from exc
        except (glide.ConnectionError, glide.ClosingError) as exc:
            rc.mark_outcome_unknown()
            raise rex.ConnectionError(str(exc)) from exc
        except glide.RequestError as exc:
            if str(exc).startswith("OOM"):
                raise rex.OutOfMemoryError(str(exc)) from exc
            raise rex.ResponseError(str(exc)) from exc
        return _text(reply)


class CoredisTransport(_Transport):
    def make(self, source: str) -> Any:
        return self.client.register_script(source)

    async def call(self, sha: str, source: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        from coredis import exceptions as cex

        script = self.script(sha, source)
        try:
            return await script(list(keys), list(args))
        except TimeoutError as exc:
            rc.mark_outcome_unknown()
            raise rex.TimeoutError(str(exc)) from exc
        except cex.ConnectionError as exc:
            rc.mark_outcome_unknown()
            raise rex.ConnectionError(str(exc)) from exc


async def open_glide(settings: Settings) -> tuple[GlideTransport, Callable[[], Awaitable[None]]]:
    import glide

    host, port, db = _address(settings)
    config = glide.GlideClientConfiguration(
        [glide.NodeAddress(host, port)],
        database_id=db,
        request_timeout=int(settings.redis_socket_timeout * 1000),
        advanced_config=glide.AdvancedGlideClientConfiguration(
            connection_timeout=int(settings.redis_connect_timeout * 1000)
        ),
    )
    client = await glide.GlideClient.create(config)
    return GlideTransport(client), client.close


async def open_coredis(
    settings: Settings, retry: bool = False
) -> tuple[CoredisTransport, Callable[[], Awaitable[None]]]:
    """coredis 6 clients must be entered (``async with``); a task holds it open until closed.
    ``retry``: keep coredis's default retry policy (2 retries on ConnectionError/TimeoutError), which
    resends a write whose reply was lost; off by default, as the service never resends a write."""
    import coredis
    from coredis.retry import NoRetryPolicy

    host, port, db = _address(settings)
    options: dict[str, Any] = {} if retry else {"retry_policy": NoRetryPolicy()}
    client = coredis.Redis(
        host,
        port,
        db,
        decode_responses=True,
        stream_timeout=settings.redis_socket_timeout,
        connect_timeout=settings.redis_connect_timeout,
        pool_timeout=settings.redis_pool_timeout,
        max_connections=settings.redis_max_connections,
        **options,
    )
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def hold() -> None:
        try:
            async with client:
                ready.set_result(None)
                await stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    task = asyncio.create_task(hold())
    await ready

    async def close() -> None:
        stop.set()
        with contextlib.suppress(Exception):
            await task

    return CoredisTransport(client), close


def swap_transport(scripts: Scripts, transport: Any) -> None:
    """Every script of ``scripts`` calls ``transport`` instead of the coalescer (bench only)."""
    for script in vars(scripts).values():
        if isinstance(script, Script):
            script._coalescer = transport


async def open_scripts(
    variant: str, settings: Settings, coredis_retry: bool = False
) -> tuple[Scripts, Callable[[], Awaitable[None]]]:
    redis = redis_client(settings)  # glide/coredis: only ``Script`` needs it; it never connects
    if variant in ("redispy", "coalesce"):
        return Scripts(redis, coalesce=variant == "coalesce"), redis.aclose
    opening = open_glide(settings) if variant == "glide" else open_coredis(settings, coredis_retry)
    transport, close = await opening
    scripts = Scripts(redis, coalesce=True)
    swap_transport(scripts, transport)
    return scripts, close


# The harness server ------------------------------------------------------------------------------------------


def message() -> dict[str, Arg]:
    return {"id": str(uuid.uuid4()), "role": "user", "content": "ceiling", "type": "chat",
            "tokens": "12", "cost": "100", "meta": "{}", "ts": str(now_us())}  # fmt: skip


def append_app(variant: str, settings: Settings) -> web.Application:
    """``bench/ceiling.py``'s append ceiling, on ``variant``'s transport."""
    app = web.Application()
    state: dict[str, Any] = {}

    async def start(app: web.Application) -> None:
        state["scripts"], state["close"] = await open_scripts(variant, settings)
        state["uk"] = Keys(settings.key_prefix, settings.redis_buckets).for_user(USER)
        state["sid"] = f"clients-{variant}-{os.getpid()}"
        reply = await state["scripts"].create_session(
            state["uk"],
            state["sid"],
            title="",
            conversation_data="{}",
            metadata="{}",
            summary="",
            now=now_us(),
        )
        assert reply[0] in ("ok", "conflict"), reply

    async def stop(app: web.Application) -> None:
        await state["close"]()

    async def handle(_: web.Request) -> web.Response:
        reply = await state["scripts"].append_message(state["uk"], state["sid"], message())
        return web.Response(body=orjson.dumps({"sequence": int(reply[1])}), content_type="application/json")

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def serve(variant: str, settings: Settings) -> None:
    serve_app(append_app(variant, settings), settings.service_port)


def service_glide() -> None:
    """The service itself (one API process), its scripts on glide: ``Scripts`` builds its coalescer
    as ``Coalescer(redis)``; that name now makes a glide transport, opened on the first call."""
    import session_svc.storage.scripts
    from session_svc.__main__ import main as service_main

    settings = Settings.from_env()

    class LazyGlide:
        def __init__(self, _redis: Any) -> None:
            self._open: asyncio.Task[tuple[GlideTransport, Any]] | None = None

        async def call(self, *call: Any) -> Any:
            if self._open is None:
                self._open = asyncio.ensure_future(open_glide(settings))
            transport, _ = await asyncio.shield(self._open)
            return await transport.call(*call)

    session_svc.storage.scripts.Coalescer = LazyGlide  # type: ignore[misc,assignment]
    service_main()


def processes(cmd: list[str], env: dict[str, str], n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` single processes of ``cmd`` sharing the port (SO_REUSEPORT), metrics summed over them as
    the supervisor does it (PROMETHEUS_MULTIPROC_DIR) when there are several."""
    env = {**env, "SERVICE_PROCESSES": "1"}
    if n > 1:
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-clients-metrics-")
        _metrics_dirs.append(env["PROMETHEUS_MULTIPROC_DIR"])
    return [subprocess.Popen(cmd, env=env, cwd=ROOT) for _ in range(n)]


_metrics_dirs: list[str] = []  # removed by stop_all


def stop_all(started: list[subprocess.Popen[bytes]]) -> None:
    stop(started)
    while _metrics_dirs:
        shutil.rmtree(_metrics_dirs.pop(), ignore_errors=True)


# The benchmark -------------------------------------------------------------------------------------------------


Runs = dict[str, list[tuple[float, float, float]]]


def _rounds(targets: dict[str, tuple[str, str | None, str]], conns: str, repeats: int, duration: str) -> Runs:
    """Round-robin over ``targets`` (name: path, wrk script, base URL), ``repeats`` rounds."""
    runs: Runs = {name: [] for name in targets}
    for _ in range(repeats):
        for name, (path, lua, base) in targets.items():
            runs[name].append(wrk(path, lua, conns, duration, base))
    return runs


def _print_rows(runs: Runs, procs: int, conns: str) -> None:
    """Medians; the ratio is to the first row (the baseline) of the same processes and connections."""
    base = _median(next(iter(runs.values())))[0]
    for name, r in runs.items():
        rps, p50, p99 = _median(r)
        print(f"{name:34} {procs:5} {conns:>5} {rps:8.0f} {p50:8.2f} {p99:8.2f} {rps / base:7.2f}x")


def clients_table(env: dict[str, str]) -> None:
    from bench.common import PORT

    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    duration = os.environ.get("BENCH_ROW_DURATION", "5s")
    cores = os.cpu_count() or 1
    ready = {}
    for variant, name in VARIANTS.items():
        why = skipped(variant)
        if why:
            print(f"# skipped {name}: {why}")
        else:
            ready[variant] = f"{name} {version(variant)}"
    ports = {v: PORT + 10 + i for i, v in enumerate(VARIANTS)}
    print(
        f"\n# Redis clients: one append EVALSHA per request, wrk -t1 -d{duration}, medians of {repeats} "
        f"interleaved rounds, load generator on the same {cores} cores"
    )
    head = f"{'variant':34} {'procs':>5} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>8}"
    print(head)
    for procs in sorted({1, cores}):
        started: list[subprocess.Popen[bytes]] = []
        try:
            for v in ready:
                venv = {**env, "SERVICE_PORT": str(ports[v])}
                started += processes([PY, "-m", "bench.clients", "serve", v], venv, procs)
            targets = {ready[v]: ("/", None, f"http://127.0.0.1:{ports[v]}") for v in ready}
            for _, _, base in targets.values():
                wait_http(base)
                wrk("/", None, "64", "1s", base)  # warm-up: connections, script loaded, JIT-free but caches
            for conns in ("64", "1"):
                runs = _rounds(targets, conns, repeats, duration)
                _print_rows(runs, procs, conns)
        finally:
            stop_all(started)
    if "glide" in ready:
        service_table(env, repeats, duration, cores)
    capabilities(env)


def service_table(env: dict[str, str], repeats: int, duration: str, cores: int) -> None:
    """Stretch: the real service's append route (POST /api/v1/sessions/{id}/messages), as it is
    (redis-py coalescing) and with its scripts on glide (``service_glide``)."""
    from bench.common import PORT

    services = {
        "service, redis-py coalescing": ([PY, "-m", "session_svc"], PORT + 20),
        "service, glide transport": ([PY, "-m", "bench.clients", "service-glide"], PORT + 21),
    }
    print(f"\n# the service's append route (POST message), wrk -t1 -d{duration}, medians of {repeats}")
    print(f"{'variant':34} {'procs':>5} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>8}")
    for procs in sorted({1, cores}):
        started: list[subprocess.Popen[bytes]] = []
        try:
            targets = {}
            for name, (cmd, port) in services.items():
                started += processes(cmd, {**env, "SERVICE_PORT": str(port)}, procs)
                base = f"http://127.0.0.1:{port}"
                wait_http(base)
                sid = http("POST", "/api/v1/sessions", {"user_id": "bench"}, base=base)["session_id"]
                path = f"/api/v1/sessions/{sid}/messages?user_id=bench"
                targets[name] = (path, POST_LUA, base)
                wrk(path, POST_LUA, "64", "1s", base)  # warm-up
            for conns in ("64", "1"):
                runs = _rounds(targets, conns, repeats, duration)
                _print_rows(runs, procs, conns)
        finally:
            stop_all(started)


# Capabilities: bounded waits, NOSCRIPT, cluster (private redis-server instances) ------------------------------


def _free_port() -> int:
    """A free port below 55536: a cluster node also binds its bus on port + 10000."""
    for _ in range(100):
        port = random.randrange(20000, 55536)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@contextlib.contextmanager
def private_redis(*extra: str, port: int | None = None) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = port or _free_port()
    work = tempfile.mkdtemp(prefix="bench-clients-redis-")
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", work, *extra],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            time.sleep(0.05)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def _name(exc: BaseException) -> str:
    module = type(exc).__module__.split(".")[0]
    return type(exc).__name__ if module == "builtins" else f"{module}.{type(exc).__name__}"


async def _attempt(call: Callable[[], Awaitable[Any]]) -> tuple[str, float]:
    """(outcome, seconds): ``ok`` or the exception's qualified class name."""
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(call(), 10)
        outcome = "ok"
    except Exception as exc:
        outcome = _name(exc)
        if exc.__cause__ is not None:  # a transport's error mapped to redis-py's: show the client's own
            outcome += f" ({_name(exc.__cause__)})"
    return outcome, time.perf_counter() - t0


PROBE_TIMEOUT = 0.5
PAUSE_MS = 2000


def _quiet_glide() -> None:
    if skipped("glide") is None:
        import glide

        glide.Logger.set_logger_config(glide.LogLevel.ERROR)  # its timeout warnings are expected here


async def probe_client(variant: str, retry: bool = False) -> dict[str, str]:
    """One client against its own redis-server: a call while Redis is paused (CLIENT PAUSE ALL for
    2 s) and how often that write landed after, a call after SCRIPT FLUSH, a call with Redis stopped,
    and the time until calls succeed again once it is back (a new, empty server: NOSCRIPT again)."""
    import redis.asyncio as aioredis

    found: dict[str, str] = {}
    with private_redis() as (port, server):
        settings = Settings(
            redis_url=f"redis://127.0.0.1:{port}/0",
            key_prefix="probe",
            redis_socket_timeout=PROBE_TIMEOUT,
            redis_connect_timeout=PROBE_TIMEOUT,
            redis_pool_timeout=PROBE_TIMEOUT,
        )
        admin = aioredis.Redis(port=port, decode_responses=True)
        scripts, close = await open_scripts(variant, settings, coredis_retry=retry)
        uk = Keys("probe", 16).for_user(USER)
        sid = "probe"
        await scripts.create_session(
            uk, sid, title="", conversation_data="{}", metadata="{}", summary="", now=now_us()
        )
        session = uk.session(sid)

        async def append() -> Any:
            return await scripts.append_message(uk, sid, message())

        assert (await _attempt(append))[0] == "ok"
        await admin.script_flush()
        outcome, _ = await _attempt(append)
        found["noscript"] = "recovered" if outcome == "ok" else outcome

        before = int(await admin.hget(session, "message_count"))
        await admin.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
        outcome, took = await _attempt(append)
        found["paused"] = f"{outcome} after {took:.2f}s"
        await asyncio.sleep(PAUSE_MS / 1000 + 0.3 - took)
        landed = int(await admin.hget(session, "message_count")) - before
        found["paused_landed"] = f"{landed}x"
        found["after_pause"] = (await _attempt(append))[0]

        await admin.aclose()
        server.kill()
        server.wait()
        outcome, took = await _attempt(append)
        found["stopped"] = f"{outcome} after {took:.2f}s"
        with private_redis(port=port):
            t0 = time.perf_counter()
            outcome = "never"
            while time.perf_counter() - t0 < 10:
                outcome, _ = await _attempt(append)
                if outcome == "ok":
                    break
                await asyncio.sleep(0.05)
            found["restarted"] = (
                f"ok after {time.perf_counter() - t0:.2f}s" if outcome == "ok" else f"{outcome} for 10s"
            )
        await close()
    return found


# -- cluster ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def private_cluster(nodes: int = 3) -> Iterator[list[int]]:
    ports = [_free_port() for _ in range(nodes)]
    with contextlib.ExitStack() as stack:
        for p in ports:
            stack.enter_context(
                private_redis("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf", port=p)
            )
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
            check=True, capture_output=True,
        )  # fmt: skip
        for _ in range(100):
            out = subprocess.run(
                ["redis-cli", "-p", str(ports[0]), "cluster", "info"], capture_output=True, text=True
            ).stdout
            if "cluster_state:ok" in out:
                break
            time.sleep(0.1)
        yield ports


async def probe_cluster() -> dict[str, dict[str, str]]:
    """On a 3-node cluster: the append script for 8 users (8 buckets, spread over the nodes), one call
    each concurrently; the same calls pipelined in one batch; and both again after SCRIPT FLUSH on every
    node (NOSCRIPT)."""
    from redis.asyncio.cluster import RedisCluster

    found: dict[str, dict[str, str]] = {}
    with private_cluster() as ports:
        admin = RedisCluster(host="127.0.0.1", port=ports[0], decode_responses=True)
        await admin.initialize()
        keys = Keys("probe", 16)
        users = [f"user{i}" for i in range(40)]
        by_bucket: dict[str, Any] = {}
        for u in users:
            by_bucket.setdefault(keys.for_user(u).tag, keys.for_user(u))
        uks = list(by_bucket.values())[:8]
        nodes = {admin.get_node_from_key(uk.session("s")).name for uk in uks}
        found["_"] = {"spread": f"{len(uks)} buckets on {len(nodes)} nodes"}
        source = append_source()

        async def flush() -> None:
            await admin.execute_command("SCRIPT", "FLUSH", target_nodes=RedisCluster.PRIMARIES)

        async def paused(run: Callable[[], Awaitable[Any]]) -> str:
            """``run`` (8 appends) with every node paused: the outcome, and how many appends landed."""
            import redis.asyncio as aioredis

            async def count() -> int:
                return sum([int(await admin.hget(uk.session("s"), "message_count") or 0) for uk in uks])

            before = await count()
            pausers = [aioredis.Redis(port=p) for p in ports]
            for c in pausers:
                await c.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
            outcome, took = await _attempt(run)
            await asyncio.sleep(PAUSE_MS / 1000 + 0.5 - took)
            landed = await count() - before
            for c in pausers:
                await c.aclose()
            return f"{outcome} {took:.2f}s, {landed}/{len(uks)}"

        async def setup(scripts: Scripts) -> None:
            for uk in uks:
                await scripts.create_session(
                    uk, "s", title="", conversation_data="{}", metadata="{}", summary="", now=now_us()
                )

        def calls(scripts: Scripts) -> Callable[[], Awaitable[Any]]:
            async def run() -> Any:
                replies = await asyncio.gather(*(scripts.append_message(uk, "s", message()) for uk in uks))
                assert all(r[0] == "ok" for r in replies), replies

            return run

        # redis-py: single calls (Script -> EVALSHA routed by key) and the coalescer's pipeline.
        r = RedisCluster(host="127.0.0.1", port=ports[0], decode_responses=True, socket_timeout=PROBE_TIMEOUT)
        await r.initialize()
        row: dict[str, str] = {}
        await setup(Scripts(r, coalesce=False))  # type: ignore[arg-type]
        row["single"] = (await _attempt(calls(Scripts(r, coalesce=False))))[0]  # type: ignore[arg-type]
        await flush()
        row["single_noscript"] = (await _attempt(calls(Scripts(r, coalesce=False))))[0]  # type: ignore[arg-type]
        row["pipelined"] = (await _attempt(calls(Scripts(r, coalesce=True))))[0]  # type: ignore[arg-type]
        await flush()
        row["pipelined_noscript"] = (await _attempt(calls(Scripts(r, coalesce=True))))[0]  # type: ignore[arg-type]

        async def evalsha_method() -> Any:
            async with r.pipeline() as pipe:
                pipe.evalsha(source[1], 1, "x")
                return await pipe.execute()

        row["pipeline.evalsha()"] = (await _attempt(evalsha_method))[0]
        row["paused"] = await paused(calls(Scripts(r, coalesce=True)))  # type: ignore[arg-type]
        found["redis-py"] = row
        await r.aclose()
        await admin.execute_command("FLUSHALL", target_nodes=RedisCluster.PRIMARIES)

        if skipped("glide") is None:
            found["valkey-glide"] = await _glide_cluster(ports[0], uks, flush, setup, calls, paused)
            await admin.execute_command("FLUSHALL", target_nodes=RedisCluster.PRIMARIES)
        if skipped("coredis") is None:
            found["coredis"] = await _coredis_cluster(ports[0], uks, flush, setup, calls, paused, source)
        await admin.aclose()
    return found


def append_source() -> tuple[str, str]:
    from hashlib import sha1

    from session_svc.storage.scripts.api import APPEND_MESSAGE

    return APPEND_MESSAGE.source, sha1(APPEND_MESSAGE.source.encode()).hexdigest()


async def _append_cmd(uk: Any) -> list[str]:
    """EVALSHA of the append script with its keys and arguments, as ``Scripts.append_message`` builds them."""
    seen: list[list[str]] = []

    class Capture:
        async def call(self, sha: str, source: str, keys: Sequence[str], args: Sequence[Arg]) -> None:
            seen.append(["EVALSHA", sha, str(len(keys)), *keys, *(str(a) for a in args)])

    scripts = Scripts(redis_client(Settings()), coalesce=True)
    swap_transport(scripts, Capture())
    await scripts.append_message(uk, "s", message())
    return seen[0]


async def _glide_cluster(
    port: int, uks: list[Any], flush: Any, setup: Any, calls: Any, paused: Any
) -> dict[str, str]:
    import glide

    client = await glide.GlideClusterClient.create(
        glide.GlideClusterClientConfiguration(
            [glide.NodeAddress("127.0.0.1", port)], request_timeout=int(PROBE_TIMEOUT * 1000)
        )
    )
    scripts = Scripts(redis_client(Settings()), coalesce=True)
    swap_transport(scripts, GlideTransport(client))
    row: dict[str, str] = {}
    await setup(scripts)
    row["single"] = (await _attempt(calls(scripts)))[0]
    await flush()
    row["single_noscript"] = (await _attempt(calls(scripts)))[0]

    async def batch() -> Any:
        b = glide.ClusterBatch(is_atomic=False)
        for uk in uks:
            b.custom_command(await _append_cmd(uk))
        replies = await client.exec(b, raise_on_error=True)
        assert replies and all(_text(x)[0] == "ok" for x in replies), replies

    row["pipelined"] = (await _attempt(batch))[0]
    await flush()
    row["pipelined_noscript"] = (await _attempt(batch))[0]
    row["paused"] = await paused(calls(scripts))
    await client.close()
    return row


async def _coredis_cluster(
    port: int, uks: list[Any], flush: Any, setup: Any, calls: Any, paused: Any, source: tuple[str, str]
) -> dict[str, str]:
    import coredis
    from coredis.retry import NoRetryPolicy

    client = coredis.RedisCluster(
        "127.0.0.1", port, decode_responses=True, retry_policy=NoRetryPolicy(), stream_timeout=PROBE_TIMEOUT
    )
    row: dict[str, str] = {}
    async with client:
        scripts = Scripts(redis_client(Settings()), coalesce=True)
        transport = CoredisTransport(client)
        swap_transport(scripts, transport)
        await setup(scripts)
        row["single"] = (await _attempt(calls(scripts)))[0]
        await flush()
        row["single_noscript"] = (await _attempt(calls(scripts)))[0]
        script = client.register_script(source[0])

        async def batch() -> Any:
            async with client.pipeline(transaction=False) as pipe:
                results = []
                for uk in uks:
                    cmd = await _append_cmd(uk)
                    n = int(cmd[2])
                    results.append(script(cmd[3 : 3 + n], cmd[3 + n :], client=pipe))
            replies = [await x for x in results]
            assert all(x[0] == "ok" for x in replies), replies

        row["pipelined"] = (await _attempt(batch))[0]
        await flush()
        row["pipelined_noscript"] = (await _attempt(batch))[0]
        row["paused"] = await paused(calls(scripts))
    return row


def capabilities(env: dict[str, str] | None = None) -> None:
    async def run() -> None:
        _quiet_glide()
        print(
            f"\n# capabilities: private redis-server per client, timeouts {PROBE_TIMEOUT}s, "
            f"CLIENT PAUSE ALL {PAUSE_MS} ms, SCRIPT FLUSH, kill and restart on the same port"
        )
        probes = [(v, False) for v in VARIANTS] + [("coredis", True)]
        for variant, retry in probes:
            if skipped(variant):
                continue
            f = await probe_client(variant, retry)
            name = VARIANTS[variant] + (" (its default retries)" if retry else "")
            print(f"{name}:\n  " + "\n  ".join(f"{k}: {v}" for k, v in f.items()))
        found = await probe_cluster()
        print(
            f"\n# Redis Cluster, 3 private nodes: the append script for {found.pop('_')['spread']}: 8 concurrent "
            "calls (single), one non-transactional pipeline (pipelined), each again after SCRIPT FLUSH on every "
            f"node (+noscript); paused: the service's path with every node paused {PAUSE_MS} ms (landed/sent)"
        )
        for client, row in found.items():
            print(f"{client}:\n  " + "\n  ".join(f"{k}: {v}" for k, v in row.items()))

    asyncio.run(run())


def main() -> None:
    what = sys.argv[1]
    if what == "serve":
        serve(sys.argv[2], Settings.from_env())
    elif what == "service-glide":
        service_glide()
    elif what == "probe":
        capabilities()
    elif what == "table":
        clients_table(bench_env())
    else:
        raise SystemExit("usage: python -m bench.clients serve VARIANT | service-glide | probe")


if __name__ == "__main__":
    main()
