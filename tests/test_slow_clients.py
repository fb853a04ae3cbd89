"""Slow and hostile clients cannot hold the process: a request's headers must arrive within
HEADER_TIMEOUT and its body within BODY_TIMEOUT (408, or a close for a connection that never sent a
byte), and past MAX_CONNECTIONS a new connection is closed at once, while the established ones go on.

Served as in production (``server.AppRunner``) on a free port, over real sockets. The timeouts are made
short here; the assertions allow generous slack for a busy machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from session_svc.http.app import create_app
from session_svc.ops.telemetry import CONNECTIONS_CLOSED, RECORDER, REGISTRY
from tests.helpers import Address, parse_response, read_response, serving

SLACK = 10.0  # seconds a busy machine may add to any deadline below
HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


def closed_for(reason: str) -> float:
    """This process's count of connections closed for ``reason`` (all tests' servers together)."""
    RECORDER.publish()
    value = REGISTRY.get_sample_value(CONNECTIONS_CLOSED._name + "_total", {"reason": reason})
    return value or 0.0


@pytest.fixture
def serve(make_settings: Any) -> Callable[..., contextlib.AbstractAsyncContextManager[Address]]:
    """``async with serve(**settings) as address``: the app with those settings, served."""

    @contextlib.asynccontextmanager
    async def served(**overrides: Any) -> AsyncIterator[Address]:
        async with serving(create_app(make_settings(**overrides))) as address:
            yield address

    return served


async def open_many(address: Address, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    conns = []
    for start in range(0, n, 50):  # in batches: the listen backlog is 128
        conns += await asyncio.gather(
            *(asyncio.open_connection(*address) for _ in range(start, min(n, start + 50)))
        )
    return conns


async def ask(address: Address, request: bytes = HEALTH) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(request)
        return await asyncio.wait_for(read_response(reader), SLACK)
    finally:
        writer.close()


async def test_slowloris_connections_are_closed_after_the_header_timeout(serve: Any) -> None:
    header_timeout = 2.0
    partial = [b"GET /hea", b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: "]
    async with serve(header_timeout=header_timeout) as address:
        timeouts_before = closed_for("header_timeout")
        opened = time.monotonic()
        conns = await open_many(address, 500)
        for i, (_, writer) in enumerate(conns):
            if i % 10:  # one in ten sends nothing at all
                writer.write(partial[i % 2])
        # The attack does not keep anyone else waiting.
        asked = time.monotonic()
        status, _, _ = await ask(address)
        assert status == 200
        answered = time.monotonic() - asked
        still_open = sum(not reader.at_eof() for reader, _ in conns)

        async def outcome(reader: asyncio.StreamReader) -> tuple[bytes, float]:
            try:
                data = await asyncio.wait_for(reader.read(), header_timeout + SLACK)
            except ConnectionResetError:
                data = b""
            return data, time.monotonic() - opened

        outcomes = await asyncio.gather(*(outcome(reader) for reader, _ in conns))
        for _, writer in conns:
            writer.close()

    assert still_open == 500, f"{500 - still_open} closed before the answer that took {answered:.2f}s"
    for i, (data, after) in enumerate(outcomes):
        assert after >= header_timeout - 0.1, f"connection {i} closed after {after:.2f}s"
        if i % 10 == 0:
            assert data == b"", data  # nothing was asked: nothing to answer
        else:
            status, headers, body = parse_response(data)
            assert (status, headers["content-type"], headers["connection"]) == (
                408,
                "application/json",
                "close",
            )
            assert orjson.loads(body) == {"detail": "Request headers not received within 2 s"}
    assert closed_for("header_timeout") - timeouts_before == 500


async def test_an_idle_kept_alive_connection_is_not_a_slow_client(serve: Any) -> None:
    """Between requests a connection may wait (the keep-alive timeout's business, 75 s in production):
    the header timeout starts with the next request's first byte."""
    async with serve(header_timeout=1.0) as address:
        reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(HEALTH)
            assert (await read_response(reader))[0] == 200
            await asyncio.sleep(2.5)  # idle past the header timeout, on purpose
            writer.write(HEALTH)
            assert (await asyncio.wait_for(read_response(reader), SLACK))[0] == 200
            started = time.monotonic()
            writer.write(b"GET /health HTTP/1.1\r\n")  # ...and no more
            status, _, _ = await asyncio.wait_for(read_response(reader), SLACK)
            assert status == 408 and time.monotonic() - started >= 0.9
            assert await asyncio.wait_for(reader.read(), SLACK) == b""  # closed
        finally:
            writer.close()


@pytest.mark.parametrize("trickle", [False, True], ids=["never-sent", "trickled"])
async def test_a_body_that_does_not_arrive_in_time_is_a_408(serve: Any, trickle: bool) -> None:
    body_timeout = 1.0
    user = "slow-body-user"
    async with serve(body_timeout=body_timeout) as address:
        timeouts_before = closed_for("body_timeout")
        reader, writer = await asyncio.open_connection(*address)
        started = time.monotonic()
        writer.write(
            b"POST /api/v1/sessions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"user_id": "%s"' % user.encode()
        )

        async def dribble() -> None:
            with contextlib.suppress(ConnectionError):
                while trickle:  # a byte every 0.2 s: it never stops for long, it never ends in time
                    await asyncio.sleep(0.2)
                    writer.write(b" ")
                    await writer.drain()

        dribbling = asyncio.create_task(dribble())
        try:
            status, headers, body = await asyncio.wait_for(read_response(reader), body_timeout + SLACK)
            answered = time.monotonic() - started
            # The connection closes with the answer: aiohttp does not linger 10 s over the rest.
            with contextlib.suppress(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
        finally:
            dribbling.cancel()
            writer.close()
        assert (status, headers["connection"]) == (408, "close")
        assert orjson.loads(body) == {"detail": "Request body not received within 1 s"}
        assert answered >= body_timeout - 0.1
        listing = f"http://{address[0]}:{address[1]}/api/v1/users/{user}/sessions"
        async with aiohttp.ClientSession() as http, http.get(listing) as resp:
            assert (await resp.json())["total"] == 0
        assert closed_for("body_timeout") - timeouts_before == 1


async def test_past_max_connections_a_new_connection_is_closed_and_the_others_go_on(serve: Any) -> None:
    async with serve(max_connections=5) as address:
        refused_before = closed_for("over_capacity")
        held = await open_many(address, 5)
        for reader, writer in held:  # each has been answered: each is counted
            writer.write(HEALTH)
            assert (await asyncio.wait_for(read_response(reader), SLACK))[0] == 200

        reader, writer = await asyncio.open_connection(*address)
        writer.write(HEALTH)
        with contextlib.suppress(ConnectionResetError):  # closed with the request unread: a reset
            assert await asyncio.wait_for(reader.read(), SLACK) == b""
        writer.close()
        assert closed_for("over_capacity") - refused_before == 1

        # The established connections are still served; once one goes, a new one gets its place.
        reader0, writer0 = held[0]
        writer0.write(HEALTH)
        assert (await asyncio.wait_for(read_response(reader0), SLACK))[0] == 200
        held[1][1].close()
        deadline = time.monotonic() + SLACK
        while True:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                assert (await ask(address))[0] == 200
                break
            assert time.monotonic() < deadline, "no connection accepted after one closed"
            await asyncio.sleep(0.05)
        for _, writer in held:
            writer.close()
