"""Private servers for fault tests: a ``redis-server`` and a PostgreSQL cluster on spare ports, each in
its own directory (both can be paused with SIGSTOP), and the real worker (``python -m workers``) and API
(``python -m session_svc``) as subprocesses.

Nothing here touches the shared servers. PostgreSQL's binaries are looked up as ``scripts/services.sh``
does (the newest ``/usr/lib/postgresql/*/bin``, else ``initdb`` on the PATH).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import redis as redis_sync

from session_svc.settings import Settings
from tests.support import ROOT, service_env


@functools.cache
def pg_bin() -> Path:
    """The directory of the newest PostgreSQL server binaries (Debian keeps them off the PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb) found; scripts/services.sh installs them")
    return Path(initdb).parent


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


def bytes_waiting(port: int) -> int:
    """Bytes the kernel holds, unread, for the sockets a server on ``port`` accepted (``/proc/net/tcp``'s
    rx_queue): with the server stopped (SIGSTOP), a request that reached it and waits shows here."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] != "0A":  # 0A: LISTEN (its backlog)
                total += int(f[4].split(":")[1], 16)
    return total


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
        cmd = _as_postgres([str(pg_bin() / "pg_ctl"), "-D", str(self.data), *args])
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)

    def init(self) -> None:
        cmd = [str(pg_bin() / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
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

    def _pids(self) -> list[int]:
        """The postmaster and every process it started (backends, checkpointer, ...)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        return [postmaster, *map(int, children)]

    def pause(self) -> None:
        """SIGSTOP the whole cluster: connections stay open, nothing answers (a hung server)."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def log_tail(self, chars: int = 3000) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.resume()  # a stopped cluster would not stop
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


# A worker given SIGTERM finishes the batch in hand (SHUTDOWN_TIMEOUT, 10 s), releases what it could not
# finish, then stops its tasks and closes its connections (``workers.main._stop``: a few seconds more at
# most); past this it is taken as hung.
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
    env = service_env()
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


# The API (``python -m session_svc``) as a subprocess ----------------------------------------------------


@dataclass
class ApiProcess:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"the API exited with status {self.proc.returncode}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the API did not answer /health within {timeout:.0f}s\n{self.tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Teardown: SIGTERM, then SIGKILL if it has not exited 20 s later (a test asserts the graceful
        path itself where that is the point)."""
        stop_process(self.proc)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM a process we started, then SIGKILL if it has not exited ``timeout`` s later."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def running_api(settings: dict[str, str], log_dir: Path, name: str = "api") -> Iterator[ApiProcess]:
    """``start_api``, answering ``/health``; stopped (``ApiProcess.stop``) on the way out."""
    api = start_api(settings, log_dir, name)
    try:
        api.wait_healthy()
        yield api
    finally:
        api.stop()


def start_api(settings: dict[str, str], log_dir: Path, name: str = "api") -> ApiProcess:
    """``python -m session_svc`` with ``settings`` (``support.api_settings(...)`` plus extras) as its
    environment, and nothing else of ours; its output goes to ``log_dir/<name>.log``."""
    env = service_env(**settings, PYTHONUNBUFFERED="1")
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "session_svc"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return ApiProcess(int(settings["SERVICE_PORT"]), proc, log)


# Redis Cluster (scripts/cluster.sh) -------------------------------------------------------------------

CLUSTER_NODES = 6  # 3 masters, 3 replicas


def free_port_block(n: int = CLUSTER_NODES, bus_offset: int = 10_000) -> int:
    """A first port such that it and the next ``n - 1``, and each plus ``bus_offset`` (Redis Cluster's
    bus ports), are free right now."""
    import random

    for _ in range(200):
        base = random.randrange(20_000, 55_000 - bus_offset - n)
        ports = [base + i for i in range(n)] + [base + i + bus_offset for i in range(n)]
        try:
            with contextlib.ExitStack() as stack:
                for p in ports:
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports for a local Redis Cluster")


@dataclass
class LocalCluster:
    """A cluster started by ``scripts/cluster.sh up`` on spare ports, its data in a temporary
    directory; ``down`` stops it (only the pids the script recorded) and deletes that directory."""

    base: int
    var_dir: Path
    node_timeout_ms: int = 2000

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.base}/0"

    @property
    def ports(self) -> list[int]:
        return [self.base + i for i in range(CLUSTER_NODES)]

    def script(self, *args: str) -> str:
        env = {**os.environ, "CLUSTER_PORT": str(self.base), "SESSION_SVC_VAR_DIR": str(self.var_dir),
               "CLUSTER_NODE_TIMEOUT": str(self.node_timeout_ms)}  # fmt: skip
        done = subprocess.run(
            [str(ROOT / "scripts" / "cluster.sh"), *args],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"cluster.sh {' '.join(args)} failed: {done.stderr}{done.stdout}")
        return done.stdout

    def pid(self, port: int) -> int:
        return int((self.var_dir / f"cluster-{self.base}" / str(port) / "redis.pid").read_text())

    def node(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(port=port, decode_responses=True, socket_timeout=2)

    def role(self, port: int) -> str:
        try:
            with self.node(port) as r:
                return str(r.execute_command("ROLE")[0])
        except redis_sync.RedisError:
            return "down"

    def masters(self) -> list[int]:
        return [p for p in self.ports if self.role(p) == "master"]

    def master_of(self, key: str) -> int:
        """The port of the master that serves ``key``'s slot now."""
        with self.node(self.masters()[0]) as r:
            slot = int(r.execute_command("CLUSTER KEYSLOT", key))
            for start, end, master, *_replicas in r.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise RuntimeError(f"no master serves {key!r}")

    def delete_prefix(self, prefix: str) -> None:
        for port in self.masters():
            with self.node(port) as r:
                for key in r.scan_iter(match=f"{prefix}:*", count=1000):
                    r.delete(key)

    def down(self) -> None:
        self.script("down", "--purge")
        shutil.rmtree(self.var_dir, ignore_errors=True)


def start_cluster(node_timeout_ms: int = 2000) -> LocalCluster:
    var_dir = Path(tempfile.mkdtemp(prefix="wt-cluster-"))
    for _ in range(3):  # a port taken between the check and the start: try another block
        cluster = LocalCluster(free_port_block(), var_dir, node_timeout_ms)
        try:
            cluster.script("up")
            return cluster
        except RuntimeError:
            with contextlib.suppress(RuntimeError):
                cluster.script("down", "--purge")
    shutil.rmtree(var_dir, ignore_errors=True)
    raise RuntimeError("could not start a local Redis Cluster")
