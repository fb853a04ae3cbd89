"""The fault tests' TCP proxy (``tests/proxy.py``) does what each mode says, to connections already open
and to new ones, in front of a small echo server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests.proxy import Proxy, proxy_to


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionResetError):  # the proxy resets its side on cut()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    with proxy_to(int(server.sockets[0].getsockname()[1])) as p:
        yield p
    server.close()
    await server.wait_closed()


async def _connect(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> float:
    t0 = time.monotonic()
    writer.write(data)
    assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data
    return time.monotonic() - t0


async def test_passes_bytes_and_adds_latency_per_direction(proxy: Proxy) -> None:
    reader, writer = await _connect(proxy)
    assert await _round_trip(reader, writer, b"x" * 200_000) < 1
    proxy.delay(up=0.2)
    assert await _round_trip(reader, writer, b"up") >= 0.2
    proxy.delay(down=0.3)
    assert await _round_trip(reader, writer, b"down") >= 0.3
    proxy.normal()
    assert await _round_trip(reader, writer, b"again") < 0.2
    writer.close()


async def test_black_hole_keeps_connections_and_drops_bytes_until_normal(proxy: Proxy) -> None:
    reader, writer = await _connect(proxy)
    await _round_trip(reader, writer, b"before")
    proxy.blackhole()
    writer.write(b"lost")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(10), 0.3)
    late_reader, late_writer = await _connect(proxy)  # new connections are accepted, and hear nothing
    late_writer.write(b"lost too")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(late_reader.read(10), 0.3)
    assert proxy.connections == 2
    proxy.normal()
    assert await _round_trip(reader, writer, b"after") < 1  # what was dropped stays dropped
    assert await _round_trip(late_reader, late_writer, b"after") < 1
    writer.close()
    late_writer.close()


async def test_cut_resets_open_and_new_connections_until_normal(proxy: Proxy) -> None:
    reader, writer = await _connect(proxy)
    await _round_trip(reader, writer, b"before")
    proxy.cut()
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await _round_trip(reader, writer, b"x")
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):  # at connect, or at once
        await _round_trip(*await _connect(proxy), b"x")
    proxy.normal()
    reader, writer = await _connect(proxy)
    assert await _round_trip(reader, writer, b"after") < 1
    writer.close()
