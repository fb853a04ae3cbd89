"""``scripts/bench.sh chat``: one chat turn, end to end, on this service and on the stores an agent
backend would otherwise use.

One turn = append the user's message, read the newest 50 messages (the model's context), append the
assistant's reply (``bench/turns.py``). Each conversation is a sequential loop of turns, seeded with 20
messages; 1 and 64 conversations at once; fresh conversations for every cell. Rows, interleaved round
by round (medians of ``BENCH_REPEATS``, each cell ``BENCH_CHAT_DURATION`` s after
``BENCH_CHAT_WARMUP`` s):

1. **session_svc over HTTP**: one API process (``python -m session_svc`` with the bench env, as
   ``bench/run.py`` starts it) and one worker (``python -m workers``) flushing to PostgreSQL, called from
   this process by an aiohttp ``ClientSession`` (one pooled connector), as an agent backend would call it.
   The API has page numbers only (``page``, ``page_size`` 1..200, oldest first): the client knows the
   message count (each append answers its ``sequence``) and asks for the smallest page size from 50 up
   whose page holding the newest message also holds the 50th newest: always one GET, about 54 messages
   on average, of which it keeps the newest 50;
2. **the OpenAI Agents SDK's RedisSession and SQLAlchemySession** (``bench/chat_agents.py``), in
   their own virtualenv, as a subprocess;
3. **bare Redis**: the same three steps as raw redis-py commands (RPUSH, LRANGE -50 -1, RPUSH), with
   the service's redis-py (the ceiling the ratios are against) and with the SDK venv's.

``BENCH_REDIS_CONF=config/redis.conf`` runs everything against a private redis-server started with that
file (``bench.common.private_redis``) instead of the shared Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from bench.common import PREFIX, PY, ROOT, SCHEMA, backlog, private_redis, stop, wait_http
from bench.turns import ASSISTANT_TEXT, CONTEXT, SEED, USER_TEXT, Turn, bare_redis_turns, measure
from session_svc.settings import Settings

AGENTS_PY = os.environ.get("BENCH_AGENTS_PY", str(ROOT / "var" / "venv-bench" / "bin" / "python"))

SERVICE = "session_svc over HTTP (aiohttp client)"
REDIS_SESSION = "Agents SDK RedisSession"
SQL_SESSION = "Agents SDK SQLAlchemySession (PostgreSQL)"
CEILING = "ceiling: bare Redis, redis-py 5.2.1"
CEILING_SDK = "bare Redis, the SDK venv's redis-py"
DURABLE = "durable on PostgreSQL: session_svc yes (write-behind), RedisSession no, SQLAlchemySession yes (synchronous)"


def context_page(n: int, want: int = CONTEXT, max_size: int = 200) -> tuple[int, int]:
    """(page, page_size) of one page that holds the newest ``want`` of ``n`` messages (sequences 1..n),
    with the smallest such page size; two GETs would be needed only if none existed up to ``max_size``,
    which does not happen below 200,000 messages (checked)."""
    if n <= want:
        return 1, want
    lo = n - want + 1
    for size in range(want, max_size + 1):
        page = (n - 1) // size + 1
        if (page - 1) * size + 1 <= lo:
            return page, size
    raise ValueError(f"no single page holds the newest {want} of {n}")


async def service_turns(base: str, conc: int, cell: int) -> tuple[list[Turn], Callable[[], Awaitable[None]]]:
    http = aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=100))
    headers = {"Content-Type": "application/json"}

    async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with http.post(path, data=orjson.dumps(body), headers=headers) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"POST {path}: {resp.status} {data[:200]!r}")
            return orjson.loads(data)  # type: ignore[no-any-return]

    def user_msg(i: int) -> dict[str, Any]:
        return {"role": "user", "content": USER_TEXT[i % 8], "tokens_used": 75}

    def reply_msg(i: int) -> dict[str, Any]:
        return {"role": "assistant", "content": ASSISTANT_TEXT[i % 8], "tokens_used": 256,
                "cost_usd": 0.0004, "metadata": {"model": "gpt-4o"}}  # fmt: skip

    async def conversation(k: int) -> Turn:
        uid = f"chat-{cell}-{k}"
        sid = (await post("/api/v1/sessions", {"user_id": uid, "title": "chat"}))["session_id"]
        msgs = f"/api/v1/sessions/{sid}/messages?user_id={uid}"
        for j in range(SEED):
            n = (await post(msgs, user_msg(j) if j % 2 == 0 else reply_msg(j)))["sequence"]

        async def turn(i: int) -> None:
            nonlocal n
            n = (await post(msgs, user_msg(i)))["sequence"]
            page, size = context_page(n)
            async with http.get(f"{msgs}&page={page}&page_size={size}") as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"GET messages: {resp.status} {data[:200]!r}")
            context = orjson.loads(data)["messages"][-CONTEXT:]
            assert context[-1]["sequence"] == n and len(context) == min(n, CONTEXT), (n, page, size)
            n = (await post(msgs, reply_msg(i)))["sequence"]

        return turn

    turns = list(await asyncio.gather(*(conversation(k) for k in range(conc))))
    return turns, http.close


class Agents:
    """The ``bench/chat_agents.py`` subprocess in the SDK's venv, or why there is none."""

    def __init__(self, redis_url: str, database_url: str) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}
        self.why = ""
        if not os.path.exists(AGENTS_PY):
            self.why = f"no {AGENTS_PY} (scripts/bench.sh makes it from bench/agents-requirements.txt)"
            return
        self.proc = subprocess.Popen(
            [AGENTS_PY, "-m", "bench.chat_agents", redis_url, database_url, PREFIX, f"{SCHEMA}_agents"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        self.info = json.loads(line) if line.strip() else {"error": "it exited at start (see stderr above)"}
        if "error" in self.info:
            self.why = self.info["error"]
            self.close()

    def cell(self, row: str, conc: int, duration: float, warmup: float) -> dict[str, Any]:
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(
            json.dumps({"row": row, "conc": conc, "duration": duration, "warmup": warmup}) + "\n"
        )
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench/chat_agents.py died during {row} at {conc} conversations")
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin:
            self.proc.stdin.close()  # end of input: it drops its keys and schema, then exits
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _run(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


@contextmanager
def _redis(env: dict[str, str]) -> Iterator[dict[str, str]]:
    conf = os.environ.get("BENCH_REDIS_CONF")
    with private_redis(conf) if conf else nullcontext(None) as url:
        if url is None:
            yield env
        else:
            extra = {"REDIS_URL": url}
            if env.get("ARQ_REDIS_URL"):
                extra["ARQ_REDIS_URL"] = url
            yield {**env, **extra}


def chat_table(env: dict[str, str]) -> None:
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    duration = float(os.environ.get("BENCH_CHAT_DURATION", "5"))
    warmup = float(os.environ.get("BENCH_CHAT_WARMUP", "1"))
    concs = [int(c) for c in os.environ.get("BENCH_CHAT_CONCS", "1,64").split(",")]
    with _redis(env) as env:
        settings = Settings.from_env(env)
        redis_url = settings.redis_url

        async def persistence() -> dict[str, str]:
            r = aioredis.Redis.from_url(redis_url, decode_responses=True)
            cfg = {**await r.config_get("appendonly"), **await r.config_get("appendfsync")}
            ver = (await r.info("server"))["redis_version"]
            await r.aclose()
            return {**cfg, "version": ver}

        rcfg = _run(persistence())
        conf = os.environ.get("BENCH_REDIS_CONF")
        where = f"a private redis-server with {conf}" if conf else "the shared Redis"
        print(
            f"\n# chat turn: append user message, read newest {CONTEXT}, append reply; conversations seeded "
            f"with {SEED}; {duration:g} s per cell after {warmup:g} s, medians of {repeats}, "
            f"{os.cpu_count()} cores shared by client, API, worker and servers"
        )
        print(
            f"# Redis {rcfg['version']} ({where}: appendonly {rcfg['appendonly']}, "
            f"appendfsync {rcfg['appendfsync']})"
        )
        api = subprocess.Popen([PY, "-m", "session_svc"], env=env, cwd=ROOT)
        worker = subprocess.Popen([PY, "-m", "workers"], env=env, cwd=ROOT)
        agents = Agents(redis_url, settings.database_url)
        try:
            base = f"http://127.0.0.1:{env['SERVICE_PORT']}"
            wait_http(base)
            rows = [SERVICE, REDIS_SESSION, SQL_SESSION, CEILING, CEILING_SDK]
            if agents.why:
                print(f"# Agents SDK rows skipped: {agents.why}")
                rows = [SERVICE, CEILING]
            else:
                v = agents.info["versions"]
                pg = agents.info["postgres"]
                print(
                    f"# openai-agents {v['openai-agents']} (its venv: redis-py {v['redis']}, SQLAlchemy "
                    f"{v['sqlalchemy']}, asyncpg {v['asyncpg']}); PostgreSQL {pg['server_version'].split()[0]} "
                    f"synchronous_commit={pg['synchronous_commit']} fsync={pg['fsync']}"
                )
            # BENCH_ROWS=session_svc,sqlalchemy: only the rows whose names contain one of these (and the ceiling)
            only = [w.lower() for w in os.environ.get("BENCH_ROWS", "").split(",") if w]
            rows = [r for r in rows if r == CEILING or not only or any(w in r.lower() for w in only)]
            results: dict[tuple[str, int], list[dict[str, Any]]] = {(r, c): [] for r in rows for c in concs}
            lag = 0.0
            cell = 0
            for _ in range(repeats):
                for conc in concs:
                    for row in rows:
                        cell += 1
                        if row == SERVICE:

                            async def svc(conc: int = conc, cell: int = cell) -> dict[str, Any]:
                                turns, close = await service_turns(base, conc, cell)
                                try:
                                    return await measure(turns, duration, warmup, (api.pid, worker.pid))
                                finally:
                                    await close()

                            res = _run(svc())

                            async def outbox() -> float:
                                r = aioredis.Redis.from_url(redis_url, decode_responses=True)
                                try:
                                    return (await backlog(r, settings))[1]
                                finally:
                                    await r.aclose()

                            lag = max(lag, _run(outbox()))
                        elif row == CEILING:

                            async def ceiling(conc: int = conc) -> dict[str, Any]:
                                turns, close = await bare_redis_turns(redis_url, PREFIX, conc)
                                try:
                                    return await measure(turns, duration, warmup)
                                finally:
                                    await close()

                            res = _run(ceiling())
                        else:
                            name = {REDIS_SESSION: "redis_session", SQL_SESSION: "sqlalchemy_session",
                                    CEILING_SDK: "bare_redis"}[row]  # fmt: skip
                            res = agents.cell(name, conc, duration, warmup)
                        results[(row, conc)].append(res)
                        print(
                            f"  {row} c={conc}: {res['tps']:.0f} turns/s p50 {res['p50']:.2f} ms p99 {res['p99']:.2f} ms, "
                            f"CPU {res['cpu_ms']:.2f} ms/turn, load {res['loadavg']:.1f}",
                            file=sys.stderr,
                        )
            _print(results, rows, concs)
            if SERVICE in rows:
                split = [
                    sorted(r["cpu_split_ms"][i] for r in results[(SERVICE, c)])[repeats // 2]
                    for c in concs
                    for i in range(3)
                ]
                print(
                    "(session_svc CPU ms per turn, client / API / worker: "
                    + ", ".join(
                        f"c={c}: {split[3 * j]:.2f} / {split[3 * j + 1]:.2f} / {split[3 * j + 2]:.2f}"
                        for j, c in enumerate(concs)
                    )
                    + ")"
                )
            print(DURABLE)
            print(
                f"(session_svc's worker flushed to PostgreSQL during the run; oldest unflushed write right "
                f"after a cell: at most {lag:.2f} s)"
            )
        finally:
            agents.close()
            stop([api, worker])


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(sorted(r[key] for r in runs)[len(runs) // 2])


def _print(results: dict[tuple[str, int], list[dict[str, Any]]], rows: list[str], concs: list[int]) -> None:
    """A Markdown table: per concurrency, the medians of turns/s, p50, p99 and CPU per turn, and the
    median turns/s as a ratio of the bare-Redis ceiling's (redis-py 5.2.1)."""
    head = "| system |"
    rule = "|---|"
    for c in concs:
        head += f" c={c} turns/s | p50 ms | p99 ms | vs ceiling | CPU ms/turn |"
        rule += "---:|---:|---:|---:|---:|"
    print(head)
    print(rule)
    for row in rows:
        line = f"| {row} |"
        for c in concs:
            runs = results[(row, c)]
            tps = _median(runs, "tps")
            ceil = _median(results[(CEILING, c)], "tps")
            line += (
                f" {tps:,.0f} | {_median(runs, 'p50'):.2f} | {_median(runs, 'p99'):.2f} | {tps / ceil:.2f}x"
                f" | {_median(runs, 'cpu_ms'):.2f} |"
            )
        print(line)
    loads = sorted(r["loadavg"] for runs in results.values() for r in runs)
    print(
        f"(1-minute load average during the cells: {loads[0]:.1f} to {loads[-1]:.1f} on {os.cpu_count()} cores)"
    )
