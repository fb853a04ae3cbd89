"""The chat-turn driver shared by ``bench/chat_turn.py`` and ``bench/chat_agents.py``.

Standard library only (redis-py is imported where the bare-Redis ceiling is built), because
``bench/chat_agents.py`` imports it from the separate virtualenv that holds the OpenAI Agents SDK, where
session_svc is not installed.

One turn = (1) append the user's message, (2) read the newest ``CONTEXT`` messages (the model's context),
(3) append the assistant's reply. A conversation is a sequential loop of turns; ``measure`` runs N of them
at once for a fixed time and reports turns/s and the per-turn latency.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

CONTEXT = 50  # messages read back per turn
SEED = 20  # messages in a conversation before the first measured turn

_PROSE = (
    "the service keeps every conversation in redis first and writes it through to postgres so the next "
    "turn of the model reads its context back in about a millisecond while the record of it stays durable "
    "an assistant answers with a few paragraphs explaining the steps the user asked about with a short "
    "example and a note on what to check next when the result is not what was expected"
)
_WORDS = _PROSE.split(" ")


def _text(n_bytes: int, salt: int) -> str:
    out: list[str] = []
    size = 0
    i = salt
    while size < n_bytes:
        w = _WORDS[i % len(_WORDS)]
        out.append(w)
        size += len(w) + 1
        i += 7
    return " ".join(out)[:n_bytes]


# A user message of a few hundred bytes, an assistant reply of about 1 KiB (its text; JSON adds the rest).
USER_TEXT = [_text(300, s) for s in range(8)]
ASSISTANT_TEXT = [_text(1024, s) for s in range(8)]


def user_item(i: int) -> dict[str, Any]:
    """The user's message as the Agents SDK stores it (an EasyInputMessage)."""
    return {"role": "user", "content": USER_TEXT[i % 8]}


def assistant_item(i: int) -> dict[str, Any]:
    """The assistant's reply as the Agents SDK stores a model output (a ResponseOutputMessage as a dict)."""
    return {
        "id": f"msg_{i:024d}",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": ASSISTANT_TEXT[i % 8], "annotations": []}],
    }


Turn = Callable[[int], Awaitable[None]]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of this process (``pid=None``) or of process ``pid`` (Linux ``/proc``)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    turns: list[Turn], duration: float, warmup: float, pids: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Run every conversation's ``turn(i)`` in a loop, all at once, for ``warmup`` then ``duration``
    seconds; only turns that start and end inside the measured window count. ``cpu_ms``: CPU time per
    turn over the window, of this process and of ``pids`` (the API, the worker), not of the Redis or
    PostgreSQL servers: what the Python side costs whatever else shares the cores."""
    loop = asyncio.get_running_loop()
    t_start = loop.time() + warmup
    t_end = t_start + duration
    latencies: list[float] = []
    clock = time.perf_counter
    cpu: list[list[float]] = []

    def cpu_now() -> list[float]:
        return [cpu_seconds(), *(cpu_seconds(p) for p in pids)]

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, t_start - loop.time()))
        cpu.append(cpu_now())
        await asyncio.sleep(max(0.0, t_end - loop.time()))
        cpu.append(cpu_now())

    async def conversation(turn: Turn) -> None:
        i = 0
        while True:
            t0 = loop.time()
            if t0 >= t_end:
                return
            p0 = clock()
            await turn(i)
            p1 = clock()
            if t0 >= t_start and loop.time() <= t_end:
                latencies.append(p1 - p0)
            i += 1

    await asyncio.gather(sample_cpu(), *(conversation(t) for t in turns))
    latencies.sort()
    n = len(latencies)
    if n == 0:
        return {
            "turns": 0,
            "tps": 0.0,
            "p50": float("nan"),
            "p99": float("nan"),
            "cpu_ms": float("nan"),
            "cpu_split_ms": [],
        }
    return {
        "turns": n,
        "tps": n / duration,
        "p50": latencies[n // 2] * 1000,
        "p99": latencies[min(n - 1, int(n * 0.99))] * 1000,
        "cpu_ms": (sum(cpu[1]) - sum(cpu[0])) / n * 1000,
        # the same split: this process, then each of ``pids``
        "cpu_split_ms": [(b - a) / n * 1000 for a, b in zip(cpu[0], cpu[1], strict=True)],
        "loadavg": os.getloadavg()[0],
    }


def serialized(item: dict[str, Any]) -> str:
    """An item as RedisSession stores it (``json.dumps`` with compact separators)."""
    return json.dumps(item, separators=(",", ":"))


async def bare_redis_turns(url: str, prefix: str, n: int) -> tuple[list[Turn], Callable[[], Awaitable[None]]]:
    """The ceiling: the same three steps as raw redis-py commands, one command per round trip (RPUSH of
    the user's item, LRANGE -50 -1, RPUSH of the reply), on one shared client with its pool, the replies
    not decoded. Each conversation is a list ``{prefix}:raw:{n}`` seeded with ``SEED`` items."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    users = [serialized(user_item(i)) for i in range(8)]
    replies = [serialized(assistant_item(i)) for i in range(8)]
    keys = [f"{prefix}:raw:{k}:{time.monotonic_ns()}" for k in range(n)]
    async with r.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.rpush(key, *[users[j % 8] if j % 2 == 0 else replies[j % 8] for j in range(SEED)])
        await pipe.execute()

    def make(key: str) -> Turn:
        async def turn(i: int) -> None:
            await r.rpush(key, users[i % 8])
            await r.lrange(key, -CONTEXT, -1)
            await r.rpush(key, replies[i % 8])

        return turn

    async def close() -> None:
        await r.unlink(*keys)
        await r.aclose()

    return [make(k) for k in keys], close
