"""The worker process: the outbox drain, the heartbeat, memory relief and arq's cron jobs, supervised.

Nothing Redis or Postgres does ends this process; only SIGTERM/SIGINT do. Each part is a task that
survives its dependencies going away and coming back:

- the drain (``Flusher.run``) retries with backoff and resumes with its own pending entries;
- the heartbeat says every WORKER_HEARTBEAT_INTERVAL what the worker can and cannot do right now;
- memory relief evicts flushed sessions, least recently written first, while Redis is above
  REDIS_MEMORY_HIGH_WATER of its maxmemory;
- arq runs the cron jobs (sweep, reconciliation, housekeeping). arq's own loop exits on any Redis error
  (a restart, a full Redis refusing its bookkeeping), so it is restarted here with backoff, and each
  job skips its round instead of failing when Redis or Postgres is unavailable.

arq gives us cron scheduling that several workers share (a cron tick is one job id, so it runs once).
The drain is not an arq job per write (an enqueue costs several XADDs); it is one loop reading the
outbox streams. arq's queue lives on ``ARQ_REDIS_URL`` (it does not run on Redis Cluster), which
defaults to ``REDIS_URL``; with REDIS_CLUSTER it must be set (to a standalone Redis), or the worker
refuses to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arq import cron
from arq.connections import ArqRedis
from arq.typing import WorkerCoroutine
from arq.worker import Worker
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, start_http_server
from redis.asyncio import ConnectionPool
from redis.exceptions import OutOfMemoryError

from session_svc import __version__
from session_svc.domain import totals
from session_svc.ops import telemetry
from session_svc.settings import Settings, every_schedule
from session_svc.storage import heartbeat, outbox
from session_svc.storage.resources import Backend, open_backend
from workers import expiry
from workers.flush import UNAVAILABLE, Flusher

log = logging.getLogger("workers")

Ctx = dict[str, Any]

# Seconds a stopping worker spends handing its pending entries over, then waits for its cancelled
# tasks; arq's Redis timeouts; memory relief period.
RELEASE_TIMEOUT_S = CANCEL_GRACE_S = 2.0
ARQ_SOCKET_TIMEOUT_S, ARQ_CONNECT_TIMEOUT_S = 5, 1
RELIEF_EVERY_S = 1.0
# arq cancels a cron job running longer than this.
JOB_TIMEOUT_S = 300

ARQ_RESTARTS = Counter("session_worker_arq_restarts_total", "Times the arq loop was restarted after an error")
DRAIN_PAUSED = Gauge(
    "session_worker_drain_paused", "1 while the outbox drain backs off (Redis/Postgres error)"
)
LAST_FLUSH = Gauge("session_worker_last_flush_timestamp_seconds", "When a batch last committed (epoch)")
HEARTBEAT_OK = Gauge("session_worker_heartbeat_ok", "1 when the last heartbeat reached Redis")
SWEEPS = Counter("session_sweeps_total", "Expiry sweeps run by this worker")
EVICTIONS = Counter(
    "session_evictions_total",
    "Sessions evicted from Redis (all their writes in Postgres), by reason: idle, memory",
    ["reason"],
)
RESENT = Counter("session_reconcile_resent_total", "Sessions re-sent to the outbox by reconciliation")
# Service-wide figures: every worker reports the same (aggregate with max).
BACKLOG = Gauge("session_outbox_backlog_entries", "Outbox entries not yet committed to PostgreSQL")
OLDEST = Gauge(
    "session_outbox_oldest_age_seconds", "Age of the oldest outbox entry not yet in PostgreSQL (0: none)"
)
DEAD_LETTERS = Gauge("session_outbox_dead_letters", "Entries in the dead-letter streams")
REDIS_UP = Gauge("session_redis_up", "1 when Redis answered the worker's last reading")
PG_UP = Gauge("session_postgres_up", "1 when PostgreSQL answered the worker's last SELECT 1")
BUILD = Gauge("session_build_info", "The running version", ["version"])
for _reason in ("idle", "memory"):
    EVICTIONS.labels(_reason)


def consumer_name(settings: Settings) -> str:
    # A stable name (WORKER_NAME) lets a restarted worker pick up its own pending entries at once;
    # otherwise they are reclaimed by XAUTOCLAIM after FLUSH_CLAIM_IDLE_MS.
    return settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"


# Cron jobs ---------------------------------------------------------------------------------------------


SKIPPABLE: tuple[type[BaseException], ...] = (*UNAVAILABLE, OutOfMemoryError)


def _skips_round(job: Callable[[Ctx], Awaitable[int]]) -> WorkerCoroutine:
    """A job that meets an unavailable or full Redis (or Postgres) skips this round; the next runs."""

    @functools.wraps(job)
    async def run(ctx: Ctx, *_args: Any, **_kwargs: Any) -> int:
        try:
            return await job(ctx)
        except SKIPPABLE as exc:
            log.warning("%s skipped this round: %r", job.__name__, exc)
            return 0

    return run


@_skips_round
async def sweep_job(ctx: Ctx) -> int:
    s: Settings = ctx["settings"]
    evicted = await expiry.sweep(ctx["backend"], s.session_hot_ttl)
    if s.user_index_retention_days > 0:
        await expiry.trim_user_indexes(ctx["backend"], s.user_index_retention_days * 86_400)
    SWEEPS.inc()
    EVICTIONS.labels("idle").inc(evicted)
    return evicted


@_skips_round
async def reconcile_job(ctx: Ctx) -> int:
    s: Settings = ctx["settings"]
    resent = await expiry.reconcile(
        ctx["backend"], s.reconcile_stale_after_seconds, s.redis_memory_high_water
    )
    RESENT.inc(resent)
    return resent


@_skips_round
async def housekeeping_job(ctx: Ctx) -> int:
    s: Settings = ctx["settings"]
    return await expiry.housekeeping(
        ctx["backend"], s.end_idle_after_days, s.archive_completed_after_days, s.redis_memory_high_water
    )


def cron_jobs(settings: Settings) -> list[Any]:
    sweep_min, sweep_sec = every_schedule(settings.sweep_every_seconds)
    rec_min, rec_sec = every_schedule(settings.reconcile_every_seconds)
    # Reconciliation runs 15 s after the sweep's ticks (when its period allows), never at the same time.
    rec_sec = {(s + 15) % 60 for s in rec_sec} if rec_min is not None else rec_sec
    # A cron tick is one arq job id, ``<name>:<time>``, so that the workers of one deployment run it once.
    # The name carries the key prefix: deployments (or test runs) sharing an arq Redis keep their own ticks.
    prefix = f"cron:{settings.key_prefix}:"
    return [
        cron(sweep_job, name=prefix + "sweep", minute=sweep_min, second=sweep_sec, run_at_startup=True,
             timeout=JOB_TIMEOUT_S),
        cron(reconcile_job, name=prefix + "reconcile", minute=rec_min, second=rec_sec,
             timeout=JOB_TIMEOUT_S),
        cron(housekeeping_job, name=prefix + "housekeeping", minute={7}, second={0},
             timeout=2 * JOB_TIMEOUT_S),
    ]  # fmt: skip


# The supervised parts ------------------------------------------------------------------------------------


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake at once on stop."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Arq:
    """arq's worker loop, started again with backoff whenever it dies (see the module docstring)."""

    # arq polls every 0.5 s: a loop alive this long after a (re)start is taken as working again.
    HEALTHY_AFTER = 2.0
    BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 5.0

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.error = ""

    async def run(self, stop: asyncio.Event) -> None:
        backoff = self.BACKOFF_MIN_S
        while not stop.is_set():
            failure = await self._once(stop)
            if failure is None:
                return
            ARQ_RESTARTS.inc()
            if not self.error:
                backoff = self.BACKOFF_MIN_S  # it had been working again: this is a new incident
            self.error = f"cron scheduler restarting: {failure!r}"[:300]
            log.warning("arq loop stopped (%r); restarting in %.1fs", failure, backoff)
            await _pause(stop, backoff)
            backoff = min(self.BACKOFF_MAX_S, backoff * 2)

    async def _once(self, stop: asyncio.Event) -> BaseException | None:
        """Run arq until it fails (returns the error) or ``stop`` is set (returns None)."""
        s = self.settings
        pool = ConnectionPool.from_url(
            s.arq_url, socket_timeout=ARQ_SOCKET_TIMEOUT_S, socket_connect_timeout=ARQ_CONNECT_TIMEOUT_S
        )
        arq_redis = ArqRedis(pool)
        worker = Worker(
            functions=[],
            cron_jobs=cron_jobs(s),
            redis_pool=arq_redis,
            queue_name=f"{s.key_prefix}:arq:queue",
            ctx={"settings": s, "backend": self.backend},
            handle_signals=False,
        )
        main = asyncio.create_task(worker.main(), name="arq")
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({main, stopping}, timeout=self.HEALTHY_AFTER)
            if not done:  # a few polls went through: it works again
                self.error = ""
                await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if main.done() and not main.cancelled() and main.exception() is not None:
                return main.exception()
            if not main.done():  # stopping: the cron jobs are idempotent, a cancelled one reruns
                return None
            return RuntimeError("arq loop ended")
        finally:
            stopping.cancel()
            for task in [*worker.tasks.values(), main]:
                task.cancel()
            await asyncio.gather(main, *worker.tasks.values(), return_exceptions=True)
            with contextlib.suppress(Exception):
                await arq_redis.aclose(close_connection_pool=True)


async def _heartbeat(
    backend: Backend, name: str, flusher: Flusher, arq: Arq, interval: float, stop: asyncio.Event
) -> None:
    failing = False
    while not stop.is_set():
        DRAIN_PAUSED.set(1 if flusher.last_error else 0)
        LAST_FLUSH.set(flusher.last_commit)
        HEARTBEAT_OK.set(0 if failing else 1)
        errors = [e for e in (flusher.last_error, arq.error) if e]
        hb = heartbeat.Heartbeat(
            name,
            time.time(),
            os.getpid(),
            flusher.last_commit,
            "degraded" if errors else "ok",
            "; ".join(errors),
        )
        try:
            await heartbeat.beat(backend.scripts, backend.keys, hb)
            failing = False
        except Exception as exc:
            if not failing:  # once per outage, not every interval
                log.warning("heartbeat not recorded: %r", exc)
            failing = True
        await _pause(stop, interval)


async def _relieve_memory(backend: Backend, high_water: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            EVICTIONS.labels("memory").inc(await expiry.relieve_memory(backend, high_water))
        except Exception as exc:
            log.debug("memory relief skipped: %r", exc)
        await _pause(stop, RELIEF_EVERY_S)


async def _observe(backend: Backend, interval: float, stop: asyncio.Event) -> None:
    """The worker's gauges of the outbox, Redis and Postgres, every ``interval``; and this process's
    per-call figures (``telemetry``) published every second."""
    BUILD.labels(__version__).set(1)
    next_reading = 0.0
    while not stop.is_set():
        telemetry.RECORDER.publish()
        if time.monotonic() >= next_reading:
            next_reading = time.monotonic() + interval
            try:
                backlog = await outbox.backlog(backend.redis, backend.keys)
                BACKLOG.set(backlog.entries)
                OLDEST.set(backlog.oldest_age_s)
                DEAD_LETTERS.set(backlog.dead_letters)
                REDIS_UP.set(1)
            except Exception as exc:
                log.debug("outbox reading failed: %r", exc)
                REDIS_UP.set(0)
            PG_UP.set(int(await totals.postgres_up(backend)))
        await _pause(stop, 1.0)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the worker until ``stop`` is set (by SIGTERM/SIGINT when it is not given)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    if not settings.database_url:
        raise RuntimeError("DATABASE_URL is required by the worker")
    if settings.redis_cluster and not settings.arq_redis_url:
        raise RuntimeError(
            "REDIS_CLUSTER=true needs ARQ_REDIS_URL: arq (the worker's cron scheduler) cannot run on "
            "Redis Cluster; point it at a standalone Redis"
        )
    # On a cluster the worker's script calls go through the coalescer too: the per-bucket calls it makes
    # at once (consumer groups, flushed marks) become one pipeline per master, on a bounded pool
    # (redis-py's cluster client has none: beyond REDIS_MAX_CONNECTIONS per node it fails at once).
    backend_ctx = open_backend(
        settings, socket_timeout=settings.worker_redis_socket_timeout, coalesce=settings.redis_cluster
    )
    async with backend_ctx as backend:
        await _run(settings, backend, stop)


async def _run(settings: Settings, backend: Backend, stop: asyncio.Event) -> None:
    name = consumer_name(settings)
    flusher = Flusher(
        backend, name, batch_size=settings.flush_batch_size, max_deliveries=settings.flush_max_deliveries,
        claim_idle_ms=settings.flush_claim_idle_ms,
    )  # fmt: skip
    arq = Arq(settings, backend)
    if settings.worker_metrics_port:
        # The worker's own metrics (the default registry) and its Redis/Postgres call timings.
        exported = CollectorRegistry()
        exported.register(REGISTRY)  # a registry is a collector too
        exported.register(telemetry.REGISTRY)
        start_http_server(settings.worker_metrics_port, registry=exported)
    log.info("worker %s draining %d outbox buckets", name, backend.keys.buckets)
    drain = asyncio.create_task(flusher.run(stop), name="outbox-drain")
    others = [
        asyncio.create_task(arq.run(stop), name="arq"),
        asyncio.create_task(
            _heartbeat(backend, name, flusher, arq, settings.worker_heartbeat_interval, stop),
            name="heartbeat",
        ),
        asyncio.create_task(_relieve_memory(backend, settings.redis_memory_high_water, stop), name="memory"),
        asyncio.create_task(_observe(backend, settings.worker_heartbeat_interval, stop), name="metrics"),
    ]
    try:
        await stop.wait()
    finally:
        stop.set()
        log.info("worker %s stopping", name)
        await _stop(flusher, drain, others, settings.shutdown_timeout)


async def _stop(
    flusher: Flusher, drain: asyncio.Task[None], others: list[asyncio.Task[None]], window: float
) -> None:
    """The drain reads nothing more once ``stop`` is set. Let the batch in hand commit and be
    acknowledged within ``window`` s; then hand whatever is still pending over to the other workers
    (first: if the process is killed while its tasks unwind, the entries are released already), and
    cancel the tasks."""
    try:
        await asyncio.wait_for(asyncio.shield(drain), timeout=window)
    except TimeoutError:
        log.warning("the batch in hand did not finish within %gs (SHUTDOWN_TIMEOUT); releasing it", window)
    try:
        # Should the batch still commit meanwhile, its entries are acknowledged as usual; should another
        # worker take them first, it writes them again, idempotently.
        released = await asyncio.wait_for(flusher.release(), RELEASE_TIMEOUT_S)
    except Exception as exc:  # Redis unreachable: the entries are reclaimed after FLUSH_CLAIM_IDLE_MS
        log.warning("pending outbox entries not released (%r); reclaimed after FLUSH_CLAIM_IDLE_MS", exc)
    else:
        if released:
            log.info("released %d pending outbox entries to the other workers", released)
    tasks = [drain, *others]
    for task in tasks:
        task.cancel()
    # A statement waiting on a hung Postgres does not end at once when cancelled (asyncpg then sends a
    # CancelRequest and waits up to the command timeout): go on; closing the pool ends it.
    done, stuck = await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)
    await asyncio.gather(*done, return_exceptions=True)
    if stuck:
        names = ", ".join(sorted(t.get_name() for t in stuck))
        log.warning(
            "%s still running %gs after being cancelled; closing its connections", names, CANCEL_GRACE_S
        )
