"""Errors raised by aiohttp rather than by a handler: they leave as JSON ``{"detail": ...}`` too, with
the headers HTTP requires."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from session_svc.http import server
from tests.helpers import SESSIONS, Address, error_json, exchange, serving, session_url


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", session_url(str(uuid.uuid4())), {"GET", "PUT", "DELETE"}),
        ("GET", SESSIONS, {"POST"}),
        ("PUT", f"{SESSIONS}/stats", {"GET"}),
        ("DELETE", f"{SESSIONS}/stats", {"GET"}),
        ("PATCH", f"{SESSIONS}/stats", {"GET"}),
        ("POST", session_url(str(uuid.uuid4()), "/summary"), {"GET"}),
        ("DELETE", session_url(str(uuid.uuid4()), "/messages"), {"GET", "POST"}),
        ("PUT", "/api/v1/users/someone/sessions", {"GET"}),
    ],
)
async def test_405_says_which_methods_are_allowed(
    client: Any, method: str, path: str, allowed: set[str]
) -> None:
    resp = await client.request(method, path, params={"user_id": "u"})
    assert await error_json(resp, 405) == {"detail": "Method Not Allowed"}
    assert {m.strip() for m in resp.headers["Allow"].split(",")} == allowed


# Errors aiohttp answers before any middleware runs, on the runner ``python -m session_svc`` serves with.


@pytest.fixture
async def served(app: web.Application) -> AsyncIterator[Address]:
    async with serving(app) as address:
        yield address


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING
    ]


HEAD = b"Host: test\r\nConnection: close\r\n"
CREATE = b"POST /api/v1/sessions HTTP/1.1\r\n" + HEAD + b"Content-Type: application/json\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "says"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + HEAD + b"\r\n", "longer than 8190 bytes"),
        (
            b"GET /health HTTP/1.1\r\n" + HEAD + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n",
            "longer than 8190 bytes",
        ),
        (
            b"GET /health HTTP/1.1\r\n" + HEAD + b"".join(b"X-H%d: 1\r\n" % i for i in range(200)) + b"\r\n",
            "Too many headers",
        ),
        (b"G@T /health HTTP/1.1\r\n" + HEAD + b"\r\n", "Invalid method"),
        (CREATE + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", "chunk size"),
    ],
    ids=["request-line-too-long", "header-too-long", "too-many-headers", "bad-method", "bad-chunk-size"],
)
async def test_unparsable_requests_get_a_json_400_logged_as_client_errors(
    served: Address, caplog: pytest.LogCaptureFixture, request_bytes: bytes, says: str
) -> None:
    caplog.set_level(logging.INFO)
    status, headers, body = await exchange(served, request_bytes)
    assert (status, headers["content-type"]) == (400, "application/json"), body
    detail = orjson.loads(body)["detail"]
    assert detail.startswith("Bad request: ") and says in detail and "\n" not in detail, detail
    assert server_errors(caplog) == []
    assert any(r.levelno == logging.INFO and says in r.getMessage() for r in caplog.records)


async def test_a_body_that_does_not_decode_is_a_400(
    served: Address, caplog: pytest.LogCaptureFixture
) -> None:
    status, headers, body = await exchange(
        served, CREATE + b"Content-Encoding: gzip\r\nContent-Length: 5\r\n\r\n", b"abcde"
    )
    assert (status, headers["content-type"]) == (400, "application/json"), body
    [problem] = orjson.loads(body)["detail"]
    assert problem["loc"] == ["body"] and "content-encoding" in problem["msg"], problem
    assert server_errors(caplog) == []


async def test_a_client_leaving_mid_body_is_no_server_error(
    served: Address, caplog: pytest.LogCaptureFixture
) -> None:
    _, writer = await asyncio.open_connection(*served)
    writer.write(CREATE + b"Content-Length: 100\r\n\r\n" + b'{"user_id": ')
    await writer.drain()
    await asyncio.sleep(0.1)  # the handler is waiting for the rest of the body
    writer.close()
    await asyncio.sleep(0.2)
    assert server_errors(caplog) == []  # it was logged as "postgres unavailable"


async def test_server_errors_are_json_and_still_logged_with_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("bug")

    bare = web.Application()  # no error middleware: the exception reaches aiohttp's handler
    bare.router.add_get("/", broken)
    runner = server.AppRunner(bare)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        status, headers, body = await exchange(
            runner.addresses[0][:2], b"GET / HTTP/1.1\r\n" + HEAD + b"\r\n"
        )
    finally:
        await runner.cleanup()
    assert (status, headers["content-type"], orjson.loads(body)) == (
        500,
        "application/json",
        {"detail": "Internal server error"},
    )
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is not None and "bug" in str(record.exc_info[1])
