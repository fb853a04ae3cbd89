"""The process-wide Redis client: bounded waits, a circuit breaker, and an honest account of failures.

Three facts decide what a failed request may tell its caller (``failure`` below):

- **Nothing was sent** (the breaker is open, no pooled connection came free in time, the connection was
  refused or timed out while connecting): Redis never saw the command, so nothing was written.
- **Sent, and no reply** (a read timed out, the connection broke mid-command): Redis may have run the
  command or not. A write's outcome is *unknown*; retrying it blindly may apply it twice.
- **Redis replied with an error** (``OOM``): the script was refused before its first write (Redis
  checks memory at a script's first write command, and a script is atomic), so nothing was written.

Which of the first two happened is tracked per request in a context variable that the guarded
connection sets when a command's send or reply fails (``outcome_unknown``), and that the error
middleware resets at the start of every request.

The breaker makes a hung or dead Redis cost milliseconds instead of a socket timeout per request:
after ``REDIS_BREAKER_FAILURES`` consecutive connection failures or timeouts it opens, and every
command fails at once (nothing sent) for ``REDIS_BREAKER_RESET`` seconds; then one command is let
through as a probe. A reply (any reply, an error reply included) closes it; a failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import ClusterDownError, OutOfMemoryError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from session_svc.ops.telemetry import POOL_WAIT_SECONDS, RECORDER
from session_svc.settings import Settings

# The client of a process: standalone, or Redis Cluster (REDIS_CLUSTER).
AnyRedis = Redis | RedisCluster

# Errors that mean "Redis is not answering", as opposed to an error reply.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
REDIS_FAILURES = (RedisConnectionError, RedisTimeoutError, OutOfMemoryError)

_outcome_unknown: ContextVar[bool] = ContextVar("redis_outcome_unknown", default=False)


def reset_outcome() -> None:
    """Start of a request: nothing has been sent without a reply yet."""
    _outcome_unknown.set(False)


def mark_outcome_unknown() -> None:
    """A command of this request may have reached Redis without a reply (learnt from a shared batch)."""
    _outcome_unknown.set(True)


def outcome_unknown() -> bool:
    """True when, in this request, a command reached (or may have reached) Redis without a reply."""
    return _outcome_unknown.get()


class CircuitOpen(RedisConnectionError):
    """Redis failed repeatedly just now; this command was not sent."""


class NotExecuted(RedisConnectionError):
    """Redis Cluster refused the command without running it (its slot moved or is migrating, the
    cluster is down, or no node serves the slot right now): nothing was written."""


class ReplicationUnconfirmed(RedisConnectionError):
    """The write ran on the primary, but ``WAIT`` saw fewer replicas confirm it than
    REDIS_WAIT_REPLICAS within REDIS_WAIT_TIMEOUT: a failover now could lose it, so it is not
    acknowledged (outcome unknown)."""

    def __init__(self, acked: int, wanted: int) -> None:
        super().__init__(f"write confirmed by {acked} of {wanted} replicas")


class Breaker:
    """Consecutive-failure circuit breaker with a single half-open probe (see the module docstring)."""

    def __init__(self, failures: int, reset_after: float, probe_timeout: float) -> None:
        self.threshold = failures
        self.reset_after = reset_after
        # A probe that never reports (cancelled before it reached the socket) must not block forever.
        self.probe_timeout = probe_timeout
        self.failures = 0
        self.opened_at: float | None = None
        self.probe_started: float | None = None

    def check(self) -> None:
        """Raise ``CircuitOpen`` unless a command may be sent now."""
        if self.opened_at is None:
            return
        now = time.monotonic()
        if now - self.opened_at < self.reset_after:
            raise CircuitOpen(f"Redis circuit open after {self.failures} consecutive failures")
        if self.probe_started is not None and now - self.probe_started < self.probe_timeout:
            raise CircuitOpen("Redis circuit half-open: a probe is in flight")
        self.probe_started = now  # this caller is the probe

    def success(self) -> None:
        self.failures = 0
        self.opened_at = self.probe_started = None

    def failure(self) -> None:
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = time.monotonic()
            self.probe_started = None


class GuardedConnection(Connection):
    """A connection that reports to its pool's breaker (if any: redis-py's cluster client makes its
    own) and marks replies lost in this request."""

    breaker: Breaker = Breaker(1 << 30, 0.0, 0.0)  # never opens; pools give each connection theirs

    async def connect(self) -> None:
        if self.is_connected:
            return
        try:
            await super().connect()  # type: ignore[no-untyped-call]
        except REDIS_DOWN:
            self.breaker.failure()
            raise

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        await self.connect()  # a failure here is "not sent"
        try:
            await super().send_packed_command(command, check_health)
        except REDIS_DOWN:
            _outcome_unknown.set(True)  # part of the command may have been written
            self.breaker.failure()
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response = await super().read_response(*args, **kwargs)
        except REDIS_DOWN:
            _outcome_unknown.set(True)
            self.breaker.failure()
            raise
        except Exception:  # an error reply: Redis answered
            self.breaker.success()
            raise
        self.breaker.success()
        return response


class GuardedPool(BlockingConnectionPool):
    """A blocking pool (bursts wait for a connection, bounded by the pool timeout) behind a breaker."""

    breaker: Breaker

    def make_connection(self) -> Connection:
        conn: Connection = super().make_connection()  # type: ignore[no-untyped-call]
        conn.breaker = self.breaker  # type: ignore[attr-defined]
        return conn

    async def get_connection(self, command_name: Any, *keys: Any, **options: Any) -> Connection:
        self.breaker.check()
        start = time.perf_counter()
        conn: Connection = await super().get_connection(  # type: ignore[no-untyped-call]
            command_name, *keys, **options
        )
        RECORDER.observe(POOL_WAIT_SECONDS, (), time.perf_counter() - start)
        try:
            # The breaker may have opened while this caller waited for a free connection.
            self.breaker.check()
        except CircuitOpen:
            await self.release(conn)
            raise
        return conn


def redis_client(settings: Settings, socket_timeout: float | None = None) -> AnyRedis:
    """The process-wide client: a ``Redis`` on a guarded pool, or, with REDIS_CLUSTER, a
    ``SafeRedisCluster``. ``socket_timeout`` overrides the API's (the worker reads big batches)."""
    timeout = settings.redis_socket_timeout if socket_timeout is None else socket_timeout
    if settings.redis_cluster:
        return cluster_client(settings, timeout)
    pool = GuardedPool.from_url(
        settings.redis_url,
        connection_class=GuardedConnection,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout,
        socket_timeout=timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        decode_responses=True,
    )
    pool.breaker = Breaker(
        settings.redis_breaker_failures,
        settings.redis_breaker_reset,
        probe_timeout=settings.redis_connect_timeout + timeout,
    )
    return Redis(connection_pool=pool)


def guarded_pool(breaker: tuple[int, float] = (3, 1.0), timeout: float = 1.0, **kwargs: Any) -> GuardedPool:
    """A pool of one node of a cluster, with its own breaker (``breaker``: REDIS_BREAKER_FAILURES and
    REDIS_BREAKER_RESET; ``timeout``: REDIS_POOL_TIMEOUT), as ``redis_client`` makes them."""
    failures, reset = breaker
    pool = GuardedPool(
        connection_class=GuardedConnection,
        timeout=timeout,  # type: ignore[arg-type]  # a float works; redis-py's hint says int
        decode_responses=True,
        **kwargs,
    )
    probe = (kwargs.get("socket_connect_timeout") or 1.0) + (kwargs.get("socket_timeout") or 1.0)
    pool.breaker = Breaker(failures, reset, probe_timeout=probe)
    return pool


class SafeRedisCluster(RedisCluster):
    """redis-py's cluster client, retrying only what cannot have run.

    Its default retries a command again after a ``ConnectionError`` or ``TimeoutError``: after a
    timeout the command may have run, and a write sent twice applies twice. Here only CLUSTERDOWN (the
    node refused the command whole) is retried; MOVED, ASK and TRYAGAIN are followed within one attempt
    (redis-py does that below the retry loop: those replies mean "not run"). Its connections mark the
    request's outcome unknown when a reply is lost, as the standalone client's do."""

    ERRORS_ALLOW_RETRY = (ClusterDownError,)  # type: ignore[assignment]
    # How the coalescer makes its pool per node (``guarded_pool``): breaker and pool timeout.
    pool_options: Mapping[str, Any] = MappingProxyType({})


def cluster_client(settings: Settings, socket_timeout: float) -> RedisCluster:
    """REDIS_URL is a seed node; REDIS_CLUSTER_NODES (``host:port,host:port``) adds more."""
    seeds = [ClusterNode(host, int(port)) for host, port in settings.cluster_seeds]
    client = SafeRedisCluster(  # type: ignore[abstract]
        startup_nodes=seeds,
        password=settings.cluster_password or None,
        username=settings.cluster_username or None,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        max_connections=settings.redis_max_connections,
        # Pipelines (reads, and the worker's idempotent bookkeeping) are sent again once after a connection
        # error, on a fresh slot map; single commands only after CLUSTERDOWN (ERRORS_ALLOW_RETRY).
        cluster_error_retry_attempts=2,
        connection_error_retry_attempts=0,  # connect once; a down node answers 503 at once
        require_full_coverage=False,  # a shard without a master does not stop the others
    )
    client.pool_options = {
        "breaker": (settings.redis_breaker_failures, settings.redis_breaker_reset),
        "timeout": settings.redis_pool_timeout,
    }
    # redis-py fixes the connection class of its nodes; ours marks lost replies (outcome unknown).
    client.nodes_manager.connection_kwargs["connection_class"] = GuardedConnection
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = GuardedConnection
    return client


@dataclass(frozen=True, slots=True)
class Memory:
    used: int
    limit: int  # maxmemory; 0 = no limit

    @property
    def ratio(self) -> float:
        return self.used / self.limit if self.limit else 0.0


async def memory(redis: AnyRedis) -> Memory:
    """Redis memory; on a cluster, that of the fullest master (each has its own maxmemory, and a
    full one refuses the writes of its slots)."""
    if isinstance(redis, RedisCluster):
        per_node = await redis.info("memory", target_nodes=RedisCluster.PRIMARIES)
        nodes = [Memory(int(i["used_memory"]), int(i.get("maxmemory", 0))) for i in per_node.values()]
        return max(nodes, key=lambda m: (m.ratio, m.used))
    info = await redis.info("memory")
    return Memory(int(info["used_memory"]), int(info.get("maxmemory", 0)))


REDIS_OOM_DETAIL = "Redis is out of memory: nothing was written; retry later"
REDIS_DOWN_DETAIL = "Session store unavailable (Redis): nothing was written; retry later"
REDIS_READ_DETAIL = "Session store unavailable (Redis); retry later"
REDIS_UNREPLICATED_DETAIL = (
    "Session store unavailable: the write reached the Redis primary but is not confirmed on its "
    "replicas (REDIS_WAIT_REPLICAS), so the outcome of this write is unknown. Check before retrying, "
    "or retry with an Idempotency-Key"
)
REDIS_UNKNOWN_DETAIL = (
    "Session store unavailable (Redis did not answer in time): the outcome of this write is unknown. "
    "Check before retrying, or retry with an Idempotency-Key"
)


def reason(exc: Exception) -> str:
    """The ``reason`` label of ``session_redis_failures_total`` for a failure."""
    if isinstance(exc, OutOfMemoryError):
        return "oom"
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    if isinstance(exc, ReplicationUnconfirmed):
        return "unreplicated"
    return "timeout" if isinstance(exc, RedisTimeoutError) else "unreachable"


def failure(exc: Exception, write: bool) -> str:
    """The 503 ``detail`` for a Redis failure of a read or write request (see the module docstring)."""
    if isinstance(exc, OutOfMemoryError):
        return REDIS_OOM_DETAIL
    if not write:
        return REDIS_READ_DETAIL
    if isinstance(exc, ReplicationUnconfirmed):
        return REDIS_UNREPLICATED_DETAIL
    return REDIS_UNKNOWN_DETAIL if outcome_unknown() else REDIS_DOWN_DETAIL
