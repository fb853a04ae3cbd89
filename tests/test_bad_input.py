"""Bad input, systematically: each kind has one documented answer (docs/api.md, "Limits" and the notes), a 4xx
with a JSON ``detail``, never a 500, and it writes nothing.

The requests go over a real socket as raw bytes (``helpers.exchange``): aiohttp's client would refuse or
repair most of them. What the process's memory does under the big ones is ``test_memory_stays_bounded``,
against a real ``python -m session_svc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from session_svc.record.models import MAX_JSON_DEPTH, TOO_DEEP
from session_svc.settings import Settings
from session_svc.storage.resources import Backend
from tests import outbox_drain
from tests.helpers import (
    SESSIONS,
    Address,
    add_message,
    exchange,
    get_session,
    list_messages,
    make_session,
    read_response,
    serving,
    session_url,
)
from tests.servers import free_port, running_api
from tests.support import api_settings
from workers.expiry import sweep
from workers.flush import Flusher

HEAD = b"Host: test\r\nConnection: close\r\n"


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\n".encode()
        + HEAD
        + extra
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


def get(target: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\n" + HEAD + extra + b"\r\n"


def nested(depth: int) -> bytes:
    """A JSON object nesting ``depth`` levels of objects and arrays (itself the first)."""
    return b'{"x":' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"


def create(user: str, fields: bytes) -> Callable[[str], bytes]:
    """A session creation for ``user`` with raw JSON ``fields`` (``b'"metadata": {...}'``)."""
    return lambda sid: post(SESSIONS, b'{"user_id":"%s","title":"t",%s}' % (user.encode(), fields))


def append(user: str, fields: bytes) -> Callable[[str], bytes]:
    body = b'{"role":"user","content":"hi",%s}' % fields
    return lambda sid: post(f"{session_url(sid, '/messages')}?user_id={user}", body)


USER = "user-bad-input"  # each test's own key prefix keeps it apart


@dataclass(frozen=True)
class Case:
    request: Callable[[str], bytes]  # of the session id
    status: int
    says: str  # in the JSON detail
    loc: list[str] | None = None  # of the one problem in a list detail


TOO_DEEP_AT = {"type": "json_too_deep", "msg": TOO_DEEP}
NOT_UTF8 = "Percent-encoded bytes that are not UTF-8"

CASES: dict[str, Case] = {
    # Nesting: one answer from the field's own limit and from the parser's (200), at any depth.
    "depth-65": Case(create(USER, b'"metadata":' + nested(65)), 400, TOO_DEEP, ["body", "metadata"]),
    "depth-200": Case(create(USER, b'"metadata":' + nested(200)), 400, TOO_DEEP, ["body"]),
    "depth-100000": Case(create(USER, b'"metadata":' + nested(100_000)), 400, TOO_DEEP, ["body"]),
    "depth-65-message": Case(append(USER, b'"metadata":' + nested(65)), 400, TOO_DEEP, ["body", "metadata"]),
    "depth-200-unknown-field": Case(append(USER, b'"extra":' + nested(200)), 400, TOO_DEEP, ["body"]),
    # Invalid UTF-8: in the body, percent-encoded in the query or path, raw in the request line.
    "utf8-body-string": Case(create(USER, b'"metadata":{"a":"\xff\xfe"}'), 400, "invalid unicode", ["body"]),
    "utf8-body-key": Case(create(USER, b'"metadata":{"\xc3":1}'), 400, "invalid unicode", ["body"]),
    "utf8-query": Case(
        lambda sid: post(f"{session_url(sid, '/messages')}?user_id=%FF", b'{"role":"user","content":"x"}'),
        400,
        NOT_UTF8,
        ["query"],
    ),
    "utf8-query-raw": Case(
        lambda sid: post(f"{session_url(sid, '/messages')}?user_id=", b"{}").replace(b"=", b"=\xff", 1),
        400,
        "Invalid char in url query",
    ),
    "utf8-path": Case(lambda sid: get(b"/api/v1/users/%FF%FE/sessions"), 400, NOT_UTF8, ["path"]),
    "utf8-path-raw": Case(lambda sid: get(b"/api/v1/users/\xff/sessions"), 400, "Invalid char in url path"),
    # Numbers past what JSON, Redis and Postgres hold alike.
    "1e400-metadata": Case(create(USER, b'"metadata":{"x":1e400}'), 400, "finite", ["body", "metadata"]),
    "1e400-tokens": Case(append(USER, b'"tokens_used":1e400'), 400, "integer", ["body", "tokens_used"]),
    "1e400-cost": Case(append(USER, b'"cost_usd":1e400'), 400, "between 0 and", ["body", "cost_usd"]),
    "2**64-metadata": Case(
        create(USER, b'"metadata":{"x":%d}' % 2**64), 400, "64 bits", ["body", "metadata"]
    ),
    "2**64-tokens": Case(
        append(USER, b'"tokens_used":%d' % 2**64), 400, "less than", ["body", "tokens_used"]
    ),
    "4001-digits-metadata": Case(
        create(USER, b'"metadata":{"x":%d}' % 10**4000), 400, "64 bits", ["body", "metadata"]
    ),
    "100000-digits-metadata": Case(
        create(USER, b'"metadata":{"x":1' + b"0" * 100_000 + b"}"), 400, "number out of range", ["body"]
    ),
    "4001-digits-cost": Case(
        append(USER, b'"cost_usd":%d' % 10**4000), 400, "between 0 and", ["body", "cost_usd"]
    ),
    # Sizes: refused from the header, or by the parser after its limit, never read whole.
    "100MB-declared": Case(
        lambda sid: post(SESSIONS, b"").replace(b"Content-Length: 0", b"Content-Length: 104857600"),
        413,
        "Request body too large",
    ),
    "1MB-header-line": Case(
        lambda sid: get(b"/health", b"X-Big: " + b"a" * 2**20 + b"\r\n"), 400, "8190 bytes"
    ),
    "10000-headers": Case(
        lambda sid: get(b"/health", b"".join(b"X-H%d: 1\r\n" % i for i in range(10_000))),
        400,
        "Too many headers",
    ),
}


@pytest.fixture
async def served(app: web.Application) -> AsyncIterator[Address]:
    async with serving(app) as address:
        yield address


async def state(http: aiohttp.ClientSession, sid: str) -> tuple[Any, Any]:
    """What a bad request must leave unchanged: the user's sessions and the session's messages."""
    async with http.get(f"/api/v1/users/{USER}/sessions") as resp:
        listing = await resp.json()
    async with http.get(session_url(sid, "/messages"), params={"user_id": USER}) as resp:
        messages = await resp.json()
    return listing, messages


async def send(address: Address, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """``request`` written while the answer is read: the server may answer (and close) before it has
    read all of it, and the rest of the write then fails, as it would for any client."""
    reader, writer = await asyncio.open_connection(*address)

    async def write() -> None:
        with contextlib.suppress(ConnectionError):
            for i in range(0, len(request), 2**16):
                writer.write(request[i : i + 2**16])
                await writer.drain()

    sending = asyncio.create_task(write())
    try:
        return await asyncio.wait_for(read_response(reader), 30)
    finally:
        sending.cancel()
        writer.close()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_bad_input_gets_its_documented_4xx_and_writes_nothing(served: Address, case: Case) -> None:
    async with aiohttp.ClientSession(f"http://{served[0]}:{served[1]}") as http:
        async with http.post(SESSIONS, json={"user_id": USER, "title": "mine"}) as resp:
            sid = (await resp.json())["session_id"]
        before = await state(http, sid)

        status, headers, body = await send(served, case.request(sid))

        assert (status, headers["content-type"]) == (case.status, "application/json"), body[:300]
        detail = orjson.loads(body)["detail"]
        assert case.says in orjson.dumps(detail).decode(), detail
        if case.loc is not None:
            [problem] = detail
            assert problem["loc"] == case.loc, problem
            if case.says == TOO_DEEP:
                assert problem == {**TOO_DEEP_AT, "loc": case.loc}
        assert await state(http, sid) == before


# What is accepted at the edges, hot and cold ------------------------------------------------------------


def deep_value(depth: int) -> dict[str, Any]:
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return {"x": value}


async def make_cold(flusher: Flusher, backend: Backend, redis: Redis, sid: str) -> None:
    """Every write of the test's prefix in Postgres, and the session out of Redis."""
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) >= 1
    assert not await redis.exists(backend.keys.for_user(USER).session(sid))


async def test_json_nested_exactly_to_the_limit_is_kept_hot_and_cold(
    client: Any, flusher: Flusher, backend: Backend, redis: Redis
) -> None:
    # More brackets than levels, so that the depth is walked, not just bounded by counting them.
    deepest = {**deep_value(MAX_JSON_DEPTH), "more": [{"a": [1]}, [2]]}
    sid = (await make_session(client, USER, metadata=deepest, conversation_data=deepest))["session_id"]
    message = await add_message(client, sid, USER, metadata=deepest)
    hot = await get_session(client, sid, USER)
    assert hot["metadata"] == hot["conversation_data"] == deepest
    assert (await list_messages(client, sid, USER))["messages"] == [message]
    assert message["metadata"] == deepest

    await make_cold(flusher, backend, redis, sid)
    assert await get_session(client, sid, USER) == hot
    assert (await list_messages(client, sid, USER))["messages"] == [message]


async def test_negative_zero_keeps_its_value_and_loses_its_sign_in_postgres(
    client: Any, flusher: Flusher, backend: Backend, redis: Redis
) -> None:
    """Documented (docs/api.md, "JSON in metadata"): PostgreSQL's numeric has no negative zero."""
    sid = (await make_session(client, USER, metadata={"z": -0.0, "l": [-0.0]}))["session_id"]
    resp = await client.get(session_url(sid), params={"user_id": USER})
    assert b'"metadata":{"z":-0.0,"l":[-0.0]}' in await resp.read()  # hot: as sent

    await make_cold(flusher, backend, redis, sid)
    resp = await client.get(session_url(sid), params={"user_id": USER})
    cold = (await resp.json())["metadata"]
    assert cold == {"z": 0, "l": [0]} == {"z": -0.0, "l": [-0.0]}  # the same numbers
    assert b'"z":-' not in await resp.read()


async def test_duplicate_keys_last_one_wins(client: Any) -> None:
    """Documented: as in JavaScript and most parsers (RFC 8259 leaves it open), the last value counts."""
    sid = (await make_session(client, USER))["session_id"]
    raw = b'{"role":"system","content":"x","role":"user","metadata":{"a":1,"a":2}}'
    resp = await client.post(
        session_url(sid, "/messages"),
        params={"user_id": USER},
        data=raw,
        headers={"Content-Type": "application/json"},
    )
    message = await resp.json()
    assert resp.status == 200, message
    assert (message["role"], message["metadata"]) == ("user", {"a": 2})


async def test_invalid_utf8_in_header_values_is_ignored(served: Address) -> None:
    """Header values are bytes to HTTP; the one the service reads, X-Request-ID, is replaced when it
    is not an id."""
    status, headers, body = await exchange(
        served, get(b"/health", b"X-Request-ID: \xff\xfe\r\nX-Other: \xc3\r\n")
    )
    assert status == 200, body
    assert headers["x-request-id"].isascii() and "\\x" not in headers["x-request-id"]


# Memory: the big ones are refused without being read whole ------------------------------------------


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[Any]:
    env = api_settings(
        settings.redis_url, settings.database_url, settings.db_schema, settings.key_prefix, free_port()
    )
    with running_api({**env, "METRICS": "false"}, tmp_path) as api:
        yield api


async def test_memory_stays_bounded(api: Any) -> None:
    address = ("127.0.0.1", api.port)
    status, _, _ = await send(address, post(SESSIONS, b'{"user_id":"warm","title":"t"}'))
    assert status == 200
    before = peak_rss(api.proc.pid)

    # 100 MB sent chunked (no Content-Length): refused once past MAX_BODY_BYTES, as a client sees it
    # while it is still sending.
    reader, writer = await asyncio.open_connection(*address)
    writer.write(
        b"POST /api/v1/sessions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (2**16, b"a" * 2**16)
    answer = asyncio.create_task(read_response(reader))
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < 100 * 2**20 and not answer.done():
            writer.write(chunk)
            await writer.drain()
            sent += 2**16
    status, _, body = await asyncio.wait_for(answer, 30)
    writer.close()
    assert status == 413, body
    assert sent < 50 * 2**20, f"the answer came after {sent} bytes"

    for request in (CASES["1MB-header-line"], CASES["10000-headers"], CASES["depth-100000"]):
        status, _, _ = await send(address, request.request(str(uuid.uuid4())))
        assert status in (400, 413)
    grown = peak_rss(api.proc.pid) - before
    assert grown < 30 * 2**20, f"peak memory grew by {grown / 2**20:.1f} MiB"
