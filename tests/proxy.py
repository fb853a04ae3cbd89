"""A TCP proxy for fault tests: put it between a service and its Redis or PostgreSQL, then slow, black-hole
or cut the link while connections are open, and put it back.

It runs its own event loop in a daemon thread, so a test drives it the same way from a synchronous test,
an ``async`` one, or while the service is a subprocess. Each mode applies at once to every open
connection and to new ones:

- ``normal()``: bytes pass as they come.
- ``delay(up=, down=)``: each chunk is held ``up`` seconds on its way to the server and ``down`` seconds
  on its way back, in order (a slow link, not a slow server: the server answers at once).
- ``blackhole()``: connections stay open (and new ones are accepted), every byte is read and dropped,
  both ways, and a close is held back too; the peers wait for answers that never come, as behind a
  firewall that drops packets. Bytes dropped stay dropped: a connection used across a black-hole is
  out of step, which is why a client must not reuse one whose command timed out.
- ``cut()``: every open connection is reset (RST), and so is every new one until the mode changes.

``connections`` counts the connections open now, ``accepted`` those accepted so far, ``held_up`` the
chunks read from a client that the server has not been sent yet (a request provably in the link: hold
it with ``delay(up=...)``, then ``cut()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["normal", "delay", "blackhole", "cut"]
_READ = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


@dataclass(eq=False)  # held in a set, by identity
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    held_up: int = 0  # chunks read from the client and not yet passed to the server


class Proxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.mode: Mode = "normal"
        self.up_delay = 0.0
        self.down_delay = 0.0
        self.accepted = 0
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._mode_changed = asyncio.Event()

    # Control, from any thread --------------------------------------------------------------------------

    def start(self) -> Proxy:
        self._thread.start()
        self.port = self._call(self._listen())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def normal(self) -> None:
        self._set("normal", 0.0, 0.0)

    def delay(self, up: float = 0.0, down: float = 0.0) -> None:
        self._set("delay", up, down)

    def blackhole(self) -> None:
        self._set("blackhole", 0.0, 0.0)

    def cut(self) -> None:
        self._set("cut", 0.0, 0.0)

    @property
    def connections(self) -> int:
        return len(self._links)

    @property
    def held_up(self) -> int:
        return sum(link.held_up for link in list(self._links))

    def url(self, scheme_and_rest: str) -> str:
        """``url("redis://127.0.0.1:{port}/0")``: a URL with this proxy's port filled in."""
        return scheme_and_rest.format(port=self.port)

    def _set(self, mode: Mode, up: float, down: float) -> None:
        self._call(self._apply(mode, up, down))

    def _call(self, coro: Coroutine[Any, Any, int]) -> int:
        fut: Future[int] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout=10)

    # The loop's side ----------------------------------------------------------------------------------

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _apply(self, mode: Mode, up: float, down: float) -> int:
        self.mode, self.up_delay, self.down_delay = mode, up, down
        self._mode_changed.set()
        self._mode_changed = asyncio.Event()
        if mode == "cut":
            for link in list(self._links):
                self._reset(link)
        return 0

    async def _shutdown(self) -> int:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._reset(link)
        return 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "cut":
            _reset_writer(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset_writer(writer)  # the server is down: the client sees a reset, as from a dead host
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pipe(link, reader, up_writer, upstream=True)),
            asyncio.create_task(self._pipe(link, up_reader, writer, upstream=False)),
        ]

    async def _pipe(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        """One direction: read chunks, hold each for the delay in force when it arrived, forward them in
        order (or drop them while black-holed); then pass the close on."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer, link, upstream))
        try:
            while True:
                try:
                    chunk = await reader.read(_READ)
                except OSError:
                    break
                if not chunk:
                    break
                if self.mode in ("blackhole", "cut"):
                    continue
                hold = self.up_delay if upstream else self.down_delay
                link.held_up += upstream
                queue.put_nowait((time.monotonic() + hold, chunk))
            queue.put_nowait((0.0, b""))  # end of stream, after what is queued
            await sender
        finally:
            sender.cancel()
            self._drop(link)

    async def _send(
        self,
        queue: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        link: _Link,
        upstream: bool,
    ) -> None:
        try:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    while self.mode == "blackhole":  # the close is lost with the packets
                        await self._mode_changed.wait()
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.mode in ("blackhole", "cut"):
                    link.held_up -= upstream
                    continue
                writer.write(chunk)
                link.held_up -= upstream
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def _drop(self, link: _Link) -> None:
        if link in self._links and all(t.done() or t is asyncio.current_task() for t in link.tasks):
            self._links.discard(link)

    def _reset(self, link: _Link) -> None:
        for task in link.tasks:
            task.cancel()
        _reset_writer(link.client)
        _reset_writer(link.server)
        self._links.discard(link)


def _reset_writer(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


@contextlib.contextmanager
def proxy_to(port: int) -> Iterator[Proxy]:
    """A started ``Proxy`` to 127.0.0.1:``port``, closed (every connection reset) on the way out."""
    proxy = Proxy(port).start()
    try:
        yield proxy
    finally:
        proxy.close()
