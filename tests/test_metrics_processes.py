"""Metrics across real processes: two API processes report their sum, and a real Prometheus server
(Debian's package) scraping the API and the worker holds exactly what the API did.

Each test starts its own API processes (``python -m session_svc``) and worker (``python -m workers``)
on spare ports, with its own schema and key prefix on the shared Redis and Postgres; Prometheus runs
with a private data directory.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from session_svc.settings import Settings
from tests import servers, support
from tests.metric_names import EXPORTED

MESSAGES = "/api/v1/sessions/{session_id}/messages"


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def stack_env(test_urls: Any, prefix_registry: Any) -> Iterator[dict[str, str]]:
    """Settings of this test's API processes (its own schema, prefix), migrated."""
    schema = support.create_schema(test_urls.database_url, "mx_")
    env = support.api_settings(test_urls.redis_url, test_urls.database_url, schema, prefix_registry.new(), 0)
    yield env
    support.drop_schema(test_urls.database_url, schema)


@contextlib.contextmanager
def api(env: dict[str, str], port: int, log: Path, **extra: str) -> Iterator[str]:
    """``python -m session_svc`` on ``port`` with ``env`` and ``extra``; its URL."""
    settings = {**env, "SERVICE_PORT": str(port), **extra}
    with servers.running_api(settings, log.parent, log.stem) as running:
        yield running.url


def write(base: str, user: str, messages: int, cost: str = "0.000123", tokens: int = 3) -> str:
    status, body = http("POST", base + "/api/v1/sessions", {"user_id": user})
    assert status == 200, body
    sid = str(body["session_id"])
    for i in range(messages):
        status, body = http(
            "POST",
            f"{base}/api/v1/sessions/{sid}/messages?user_id={user}",
            {"role": "user" if i % 2 else "assistant", "content": f"m{i}", "tokens_used": tokens,
             "cost_usd": float(cost)},
        )  # fmt: skip
        assert status == 200, body
    return sid


def test_two_api_processes_report_their_sum_whichever_answers(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """The service is about to run as N processes on one port: a scrape landing on any of them must
    report the host. Per-process figures come from prometheus-client's multiprocess files, published
    once a second; business figures from Redis."""
    mp = tmp_path / "prom"
    mp.mkdir()
    p1, p2 = servers.free_port(), servers.free_port()
    with (
        api(stack_env, p1, tmp_path / "a.log", PROMETHEUS_MULTIPROC_DIR=str(mp)) as a,
        api(stack_env, p2, tmp_path / "b.log", PROMETHEUS_MULTIPROC_DIR=str(mp)) as b,
    ):
        write(a, "alice", 7)
        write(b, "bob", 5)
        write(b, "carol", 1)

        def both_report(n: float) -> bool:
            texts = [http("GET", base + "/metrics")[1] for base in (a, b)]
            return all(metric(t, "session_http_requests_total", route=MESSAGES, method="POST",
                              status="200") == n for t in texts)  # fmt: skip

        support.wait_sync(lambda: both_report(13), "both processes to report 7 + 6 appends", 10)
        text = http("GET", a + "/metrics")[1]
        assert metric(text, "session_http_requests_total", route="/api/v1/sessions", method="POST",
                      status="200") == 3  # fmt: skip
        hist = metric(text, "session_http_request_duration_seconds_count", route=MESSAGES, method="POST")
        assert hist == 13
        assert sum(metric(text, "session_messages_total", role=r) for r in ("user", "assistant")) == 13
        assert metric(text, "session_sessions", status="active") == 3
        # Idle, both of them: a scrape does not count itself as traffic.
        assert metric(text, "session_http_requests_in_flight") == 0
    # A process that stopped keeps its counts (counters never go back), and is no longer in flight.
    with api(stack_env, p1, tmp_path / "c.log", PROMETHEUS_MULTIPROC_DIR=str(mp)) as c:
        text = http("GET", c + "/metrics")[1]
        assert metric(text, "session_http_requests_total", route=MESSAGES, method="POST", status="200") == 13
        assert metric(text, "session_http_requests_in_flight") == 0


def test_access_log_lines_reach_stderr_one_per_request(stack_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "api.log"
    port = servers.free_port()
    with api(stack_env, port, log, ACCESS_LOG="true") as base:
        sid = write(base, "dora", 3)
        assert http("GET", f"{base}/nope")[0] == 404
    # Stopped with SIGTERM: the last lines were written on the way out.
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    answered = [(x["method"], x["route"], x["status"]) for x in lines if x["route"] != "/health"]
    assert answered == [
        ("POST", "/api/v1/sessions", 200),
        *[("POST", MESSAGES, 200)] * 3,
        ("GET", "unmatched", 404),
    ]
    assert all(x.get("session_id") == sid for x in lines if x["route"] == MESSAGES)


# A real Prometheus ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def prometheus(targets: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """Debian's prometheus, scraping ``targets`` (job -> host:port) every second."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: scripts/tools.sh installs Debian's prometheus package"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": job, "static_configs": [{"targets": [target]}]}
                    for job, target in targets.items()
                ],
            }
        )
    )
    port = servers.free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        support.wait_sync(lambda: _ready(base, proc, log), "prometheus to be ready", 30)
        yield base
    finally:
        servers.stop_process(proc)


def _ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    try:
        return http("GET", base + "/-/ready")[0] == 200
    except OSError:
        return False


def query(base: str, promql: str) -> float | None:
    """The single value of an instant query, or None when it has no result."""
    status, body = http("GET", f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert status == 200 and body["status"] == "success", body
    result = body["data"]["result"]
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def test_prometheus_holds_exactly_what_the_api_did(
    stack_env: dict[str, str], test_urls: Any, tmp_path: Path
) -> None:
    api_port, worker_port = servers.free_port(), servers.free_port()
    worker_settings = Settings(
        redis_url=test_urls.redis_url, database_url=test_urls.database_url,
        db_schema=stack_env["DB_SCHEMA"], key_prefix=stack_env["KEY_PREFIX"],
        worker_metrics_port=worker_port, worker_heartbeat_interval=0.5,
    )  # fmt: skip
    worker = servers.start_worker(worker_settings, support.new_name("w-"), tmp_path)
    try:
        with (
            api(stack_env, api_port, tmp_path / "api.log") as base,
            prometheus(
                {"session_api": f"127.0.0.1:{api_port}", "session_worker": f"127.0.0.1:{worker_port}"},
                tmp_path,
            ) as prom,
        ):
            sids = [write(base, f"user-{i}", n, cost="0.1", tokens=11) for i, n in enumerate((4, 9, 2))]
            status, _ = http("DELETE", f"{base}/api/v1/sessions/{sids[2]}?user_id=user-2")
            assert status == 200
            # 15 messages, each 11 tokens and $0.1: $1.5 exactly, which 15 float additions miss.
            expected = {
                'sum(session_messages_total{job="session_api"})': 15,
                'session_tokens_total{job="session_api"}': 165,
                'session_sessions_created_total{job="session_api"}': 3,
                'session_sessions{job="session_api",status="active"}': 2,
                'session_sessions{job="session_api",status="ended"}': 1,
                'sum(session_http_requests_total{job="session_api",route="'
                + MESSAGES
                + '",status="200"})': 15,
                'session_redis_up{job="session_api"}': 1,
                'session_postgres_up{job="session_api"}': 1,
                'session_workers_alive{job="session_api"}': 1,
                # The worker wrote them all to Postgres, and its backlog is empty.
                'session_flush_rows_total{job="session_worker",kind="message"}': 15,
                'session_outbox_backlog_entries{job="session_worker"}': 0,
                'session_outbox_dead_letters{job="session_worker"}': 0,
                'up{job="session_api"}': 1,
                'up{job="session_worker"}': 1,
            }

            def holds() -> bool:
                return all(query(prom, q) == v for q, v in expected.items())

            try:
                support.wait_sync(holds, "Prometheus to hold the API's figures", 30)
            except AssertionError:
                raise AssertionError({q: query(prom, q) for q in expected}) from None
            cost = query(prom, 'session_cost_dollars_total{job="session_api"}')
            assert cost is not None and Decimal(repr(cost)) == Decimal("1.5")
            # Every name the alert rules and the dashboard use is exported by a live API or worker.
            text = http("GET", f"http://127.0.0.1:{worker_port}/metrics")[1]
            api_text = http("GET", base + "/metrics")[1]
            # The parser names a counter family without _total; queries use the series name.
            live = {
                f.name + "_total" if f.type == "counter" else f.name
                for t in (text, api_text)
                for f in text_string_to_metric_families(t)
            }
            assert not EXPORTED - live, EXPORTED - live
            # promtool lints the worker's exposition too.
            promtool = shutil.which("promtool")
            assert promtool
            lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            assert lint.returncode == 0 and lint.stdout == lint.stderr == "", lint.stdout + lint.stderr
    finally:
        servers.stop_workers([worker])
