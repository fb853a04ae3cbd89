"""Per-process figures (requests, Redis and Postgres calls): cheap on the hot path, right across processes.

A request adds to plain Python counters here: a dict lookup, a bisect and a few additions. Observing
prometheus_client's histogram and counter directly on every request costs several times that, most in
its multiprocess mode, a visible share of a hot request (docs/performance.md). ``publish()`` moves what
accumulated into prometheus_client's metrics; the API and the worker call it once a second and before
every scrape.

With ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client keeps those metrics in per-process files that
the ``/metrics`` of any one process sums (its multiprocess mode), so N API processes sharing a port
report the whole host whichever of them answers the scrape; the others' figures are then at most a
second old. Without it, each process reports itself from ``REGISTRY``, this module's own registry (not
prometheus-client's default one, which holds whatever else the process imported).

Service-wide business figures are not here: they are read from Redis at scrape time (``totals.py``).
"""

from __future__ import annotations

import os
from bisect import bisect_left

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)

# Latency buckets for a service that answers in about a millisecond.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

# No ``*_created`` series: they double the series count and no dashboard or alert of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "session_http_requests_total",
    "HTTP requests answered, by route template, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "session_http_request_duration_seconds",
    "Time from the request's routing to its answer, by route template and method",
    ["route", "method"],
    buckets=BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "session_http_requests_in_flight",
    "Requests being handled now, scrapes excluded (sampled once a second and at the scrape)",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
REDIS_SECONDS = Histogram(
    "session_redis_call_duration_seconds",
    "Time of one Lua script call, waiting for a pooled connection included, by script",
    ["script"],
    buckets=BUCKETS,
    registry=REGISTRY,
)
POOL_WAIT_SECONDS = Histogram(
    "session_redis_pool_wait_seconds",
    "Time waiting for a free pooled Redis connection",
    buckets=BUCKETS,
    registry=REGISTRY,
)
REDIS_FAILURES = Counter(
    "session_redis_failures_total",
    "Requests answered 503 because of Redis, by reason "
    "(unreachable, timeout, oom, circuit_open, unreplicated)",
    ["reason"],
    registry=REGISTRY,
)
PG_SECONDS = Histogram(
    "session_postgres_query_duration_seconds",
    "Time of one read from PostgreSQL (sessions that left Redis), by query",
    ["query"],
    buckets=BUCKETS,
    registry=REGISTRY,
)
PG_FAILURES = Counter(
    "session_postgres_failures_total",
    "Requests answered 503 because PostgreSQL was unavailable",
    registry=REGISTRY,
)
SHED = Counter(
    "session_http_requests_shed_total",
    "Requests answered 503 at once because MAX_INFLIGHT requests were in progress",
    registry=REGISTRY,
)
CONNECTIONS_CLOSED = Counter(
    "session_http_connections_closed_total",
    "Connections the server closed on a client, by reason (header_timeout, body_timeout, over_capacity)",
    ["reason"],
    registry=REGISTRY,
)


for _reason in ("unreachable", "timeout", "oom", "circuit_open", "unreplicated"):
    REDIS_FAILURES.labels(_reason)  # exported as 0 from the start, so rate() sees the first failure
for _reason in ("header_timeout", "body_timeout", "over_capacity"):
    CONNECTIONS_CLOSED.labels(_reason)


class _Pending:
    """Observations of one histogram child not yet published: per-bucket counts (the last is +Inf)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0


class Recorder:
    """What this process observed since the last ``publish()``."""

    def __init__(self) -> None:
        self.enabled = True
        self.in_flight = 0
        self.scrapes = 0  # of the requests in flight, how many are /metrics
        self._counts: dict[tuple[Counter, tuple[str, ...]], int] = {}
        self._hists: dict[tuple[Histogram, tuple[str, ...]], _Pending] = {}
        self._requests: dict[tuple[str, str, int], _Pending] = {}

    def disable(self) -> None:
        """METRICS=false: record nothing (to measure what recording costs)."""
        self.enabled = False

    def count(self, counter: Counter, labels: tuple[str, ...], n: int = 1) -> None:
        if not self.enabled:
            return
        key = (counter, labels)
        self._counts[key] = self._counts.get(key, 0) + n

    def observe(self, hist: Histogram, labels: tuple[str, ...], seconds: float) -> None:
        if not self.enabled:
            return
        key = (hist, labels)
        p = self._hists.get(key)
        if p is None:
            p = self._hists[key] = _Pending()
        # Prometheus buckets are "less than or equal": the first bound >= seconds.
        p.counts[bisect_left(BUCKETS, seconds)] += 1
        p.total += seconds

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request: a single dict lookup on the hot path (counter and histogram are split
        at publication)."""
        key = (route, method, status)
        p = self._requests.get(key)
        if p is None:
            p = self._requests[key] = _Pending()
        p.counts[bisect_left(BUCKETS, seconds)] += 1
        p.total += seconds

    def publish(self) -> None:
        """Add what accumulated to prometheus_client's metrics (in this process's files when
        multiprocess), and start again from zero."""
        counts, self._counts = self._counts, {}
        hists, self._hists = self._hists, {}
        requests, self._requests = self._requests, {}
        for (route, method, status), p in requests.items():
            counts[(REQUESTS, (route, method, str(status)))] = sum(p.counts)
            merged = hists.setdefault((REQUEST_SECONDS, (route, method)), _Pending())
            merged.counts = [a + b for a, b in zip(merged.counts, p.counts, strict=True)]
            merged.total += p.total
        for (counter, labels), n in counts.items():
            (counter.labels(*labels) if labels else counter).inc(n)
        for (hist, labels), p in hists.items():
            child = hist.labels(*labels) if labels else hist
            # prometheus_client keeps one value per bucket (not cumulative) and the sum; adding to
            # them is what ``observe`` does, once per observation.
            for value, n in zip(child._buckets, p.counts, strict=True):
                if n:
                    value.inc(n)
            child._sum.inc(p.total)
        IN_FLIGHT.set(self.in_flight - self.scrapes)  # a scrape is not traffic


RECORDER = Recorder()


def process_exit() -> None:
    """This process stops: in multiprocess mode its live gauges must stop counting."""
    RECORDER.publish()
    if MULTIPROCESS:
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
