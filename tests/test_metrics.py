"""``GET /metrics``: what an operator's Prometheus reads, checked against what the API did.

In-process app on the shared Redis and Postgres with this test's own key prefix, so the service-wide
figures (read from this prefix's stats hashes) are exact; the per-process request figures are shared by
every app of this pytest process, so those are compared as differences between two scrapes.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import uuid
from decimal import Decimal
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from session_svc import __version__
from session_svc.domain.totals import CACHE_S
from session_svc.http.accesslog import ACCESS_LOG, FLUSH_EVERY_S
from session_svc.record.fields import MemoryType, SessionStatus
from session_svc.record.models import Role
from tests import outbox_drain
from tests.helpers import (
    add_memory,
    add_message,
    end_session,
    make_session,
    new_user,
    session_url,
    update_session,
)

# The worker's metrics live in this process too (as in any test run that imports it): the API's
# exposition must hold only its own, or names such as session_build_info would appear twice.
from workers import main as _worker_main  # noqa: F401
from workers.expiry import sweep
from workers.flush import Flusher

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(client: Any) -> tuple[str, Samples]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    return text, parse(text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


MESSAGES = "/api/v1/sessions/{session_id}/messages"


async def test_requests_are_counted_and_timed_by_route_template_never_by_raw_path(client: Any) -> None:
    _, before = await scrape(client)
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    for _ in range(3):
        await add_message(client, sid, user, content="hello")
    bad = await client.post(session_url(sid, "/messages"), params={"user_id": user}, json={"role": "x"})
    assert bad.status == 400
    probes = [f"/scan/{uuid.uuid4()}" for _ in range(5)]
    for path in probes:
        assert (await client.get(path)).status == 404
    # aiohttp's parser refuses unknown methods; a known but unrouted one counts as "other".
    assert (await client.request("PROPFIND", "/health")).status == 405
    text, after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("session_http_requests_total", route=MESSAGES, method="POST", status="200") == 3
    assert delta("session_http_requests_total", route=MESSAGES, method="POST", status="400") == 1
    assert delta("session_http_requests_total", route="/api/v1/sessions", method="POST", status="200") == 1
    assert delta("session_http_requests_total", route="unmatched", method="GET", status="404") == 5
    assert delta("session_http_requests_total", route="unmatched", method="other", status="405") == 1
    # The latency histogram counts the same requests (4 POSTs to the messages route), all in buckets.
    assert delta("session_http_request_duration_seconds_count", route=MESSAGES, method="POST") == 4
    assert (
        delta("session_http_request_duration_seconds_bucket", route=MESSAGES, method="POST", le="+Inf") == 4
    )
    assert delta("session_http_request_duration_seconds_sum", route=MESSAGES, method="POST") > 0
    assert delta("session_redis_call_duration_seconds_count", script="append_message") == 3
    # Bounded labels: no path, session id or user id ever becomes a series.
    for secret in (sid, user, *probes):
        assert secret not in text
    assert "PROPFIND" not in text


async def test_business_figures_are_the_exact_service_wide_counters(client: Any) -> None:
    users = [new_user() for _ in range(3)]
    sids = [(await make_session(client, u))["session_id"] for u in users]
    # Money that a binary float gets wrong when summed (0.1 + 0.2), and tokens.
    costs = [0.1, 0.2, 0.000001, 12.345678]
    roles = [Role.user, Role.assistant, Role.user, Role.system]
    for cost, role in zip(costs, roles, strict=True):
        await add_message(
            client, sids[0], users[0], role=role.value, content="m", cost_usd=cost, tokens_used=7
        )
    await add_memory(client, sids[1], users[1], memory_type=MemoryType.entity.value, content="x")
    await add_memory(client, sids[1], users[1], memory_type=MemoryType.summary.value, content="y")
    await add_memory(client, sids[1], users[1], memory_type=MemoryType.entity.value, content="z")
    await update_session(client, sids[1], users[1], status="completed")
    await update_session(client, sids[1], users[1], status="archived")
    await end_session(client, sids[2], users[2])
    await end_session(client, sids[2], users[2])  # a no-op: counted once

    _, m = await scrape(client)
    assert value(m, "session_redis_up") == 1 and value(m, "session_postgres_up") == 1
    assert value(m, "session_sessions_created_total") == 3
    by_status = {s.value: value(m, "session_sessions", status=s.value) for s in SessionStatus}
    assert by_status == {"active": 1, "completed": 0, "archived": 1, "ended": 1}
    by_role = {r.value: value(m, "session_messages_total", role=r.value) for r in Role}
    assert by_role == {"user": 2, "assistant": 1, "system": 1, "tool_call": 0, "tool_result": 0}
    assert value(m, "session_tokens_total") == 28
    # The exposition's float is computed once from exact micro-dollars: 12.645679 exactly as written.
    assert Decimal(repr(value(m, "session_cost_dollars_total"))) == sum(Decimal(str(c)) for c in costs)
    by_type = {t.value: value(m, "session_memories_total", type=t.value) for t in MemoryType}
    assert by_type == {"preference": 0, "conversation": 0, "entity": 2, "summary": 1, "custom": 0}
    assert value(m, "session_hot_sessions") == 3
    assert value(m, "session_build_info", version=__version__) == 1


async def test_rehydrations_and_hot_sessions_follow_the_cold_path(
    client: Any, flusher: Flusher, backend: Any
) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await add_message(client, sid, user, content="one")
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1
    _, m = await scrape(client)
    assert value(m, "session_hot_sessions") == 0 and value(m, "session_rehydrations_total") == 0
    await add_message(client, sid, user, content="two")  # a write brings it back from Postgres
    # The figures are cached for a second: wait it out rather than read a stale snapshot.
    await _past_cache()
    _, m = await scrape(client)
    assert value(m, "session_rehydrations_total") == 1 and value(m, "session_hot_sessions") == 1


async def _past_cache() -> None:
    await asyncio.sleep(CACHE_S + 0.05)


async def test_redis_down_answers_with_up_zero_and_no_invented_figures(make_client: Any) -> None:
    client = await make_client(redis_url="redis://127.0.0.1:1/0", redis_connect_timeout=0.2)
    text, m = await scrape(client)
    assert value(m, "session_redis_up") == 0
    assert "session_sessions" not in text and "session_messages_total" not in text


async def test_openmetrics_when_the_scraper_asks_for_it(client: Any) -> None:
    resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    text = await resp.text()
    assert text.endswith("# EOF\n")
    assert "session_sessions_created_total" in text


async def test_promtool_finds_nothing_to_lint(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await add_message(client, sid, user, content="x")
    text, _ = await scrape(client)
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/tools.sh installs Debian's prometheus package"
    out = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stdout + out.stderr


async def test_request_id_is_echoed_or_made(client: Any) -> None:
    resp = await client.get("/health", headers={"X-Request-ID": "frontend-42.a:b"})
    assert resp.headers["X-Request-ID"] == "frontend-42.a:b"
    made = (await client.get("/health")).headers["X-Request-ID"]
    assert len(made) == 16 and int(made, 16) >= 0
    assert (await client.get("/health")).headers["X-Request-ID"] != made
    # Something that is not an id (spaces, too long) is not echoed into headers or logs: a new one.
    for bad in ("a b", "x" * 129, "é"):
        rid = (await client.get("/health", headers={"X-Request-ID": bad})).headers["X-Request-ID"]
        assert rid != bad and len(rid) == 16
    # Errors carry it too.
    assert "X-Request-ID" in (await client.get("/nope")).headers


@pytest.mark.parametrize("on", [True, False])
async def test_access_log_is_one_json_line_without_content(make_client: Any, on: bool) -> None:
    client = await make_client(access_log=on)
    assert (ACCESS_LOG in client.app) is on
    out = io.BytesIO()
    if on:
        client.app[ACCESS_LOG].stream = out
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    secret = "the user's private words"
    resp = await client.post(
        session_url(sid, "/messages"),
        params={"user_id": user},
        json={"role": "user", "content": secret},
        headers={"X-Request-ID": "req-1"},
    )
    assert resp.status == 200
    if not on:
        return
    await asyncio.sleep(FLUSH_EVERY_S * 3)  # written in batches
    lines = out.getvalue().decode().splitlines()
    assert len(lines) == 2
    line = orjson.loads(lines[1])
    assert set(line) == {"ts", "method", "route", "status", "ms", "request_id", "session_id", "user"}
    assert line["method"] == "POST" and line["route"] == MESSAGES and line["status"] == 200
    assert line["request_id"] == "req-1" and line["session_id"] == sid and line["ms"] > 0
    assert user not in lines[1] and secret not in lines[1] and len(line["user"]) == 16


async def test_metrics_off_serves_no_metrics_and_counts_nothing(client: Any, make_client: Any) -> None:
    quiet = await make_client(metrics=False)
    assert (await quiet.get("/metrics")).status == 404
    _, before = await scrape(client)
    user = new_user()
    sid = (await make_session(quiet, user))["session_id"]
    await add_message(quiet, sid, user, content="x")
    assert "X-Request-ID" in (await quiet.get("/health")).headers
    _, after = await scrape(client)
    labels = {"route": MESSAGES, "method": "POST", "status": "200"}
    assert value(after, "session_http_requests_total", **labels) == value(
        before, "session_http_requests_total", **labels
    )


async def test_a_request_stuck_on_a_hung_redis_is_in_flight_and_the_scrape_still_answers(
    make_client: Any, private_redis: Any
) -> None:
    server = private_redis()
    client = await make_client(redis_url=server.url)
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    server.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        stuck = asyncio.ensure_future(
            client.post(session_url(sid, "/messages"), params={"user_id": user}, json={"role": "user",
                                                                                        "content": "x"})
        )  # fmt: skip
        await asyncio.sleep(0.2)
        started = asyncio.get_running_loop().time()
        text, m = await scrape(client)
        took = asyncio.get_running_loop().time() - started
        assert value(m, "session_http_requests_in_flight") == 1
        assert value(m, "session_redis_up") == 0 and "session_sessions_created_total" not in text
        assert took < 2.0  # capped by totals.TIMEOUT_S, not by the hung server
        assert (await stuck).status == 503
    finally:
        server.resume()
    _, m = await scrape(client)
    assert value(m, "session_http_requests_in_flight") == 0
