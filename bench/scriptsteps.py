"""Where an append's script time goes: the append script cut after each of its steps, on a private Redis.

``scripts/bench.sh scriptsteps`` (``BENCH_REF`` / ``--ref GITREF`` adds that commit's append script as a
last row, e.g. ``--ref 1d8d233`` for release 1.0's). Each variant gets sessions of its own (created with
the service's create script), then ``SCRIPT_STEP_CALLS`` EVALSHAs of 1 KiB messages from one client,
pipelined by 100, with Redis pinned to one core when ``taskset`` exists (``BENCH_REDIS_CPUS``, default
1); ``SCRIPT_STEP_ROUNDS`` interleaved rounds, each variant measured after its own ``CONFIG RESETSTAT``
as ``INFO commandstats`` ``usec_per_call`` of EVALSHA; medians. Variants cut before the counters' HSET
add their message with an automatic stream id, since the sequence does not move there.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

from redis.asyncio import Redis

from bench.common import ROOT, private_redis
from session_svc.record.fields import new_session_record
from session_svc.record.keys import Keys
from session_svc.storage.scripts.api import APPEND_MESSAGE, CREATE_SESSION

CALLS = int(os.environ.get("SCRIPT_STEP_CALLS", "10000"))
ROUNDS = int(os.environ.get("SCRIPT_STEP_ROUNDS", "7"))
SESSIONS = 50
CONTENT = "x" * 1024

# (label, the line the script is cut before): each row is the script up to and including its step.
STEPS = (
    ("nothing (EVALSHA of 7 keys and 10 arguments, the preamble)", "local h, stop = owned("),
    ("the ownership check's HMGET (status, sequence, version, totals)", "if not h then return"),
    ("XADD of the message to the session's stream", "local oid = redis.call('XADD', outbox"),
    ("XADD of the pointer entry to the outbox", "if tokens < 2^53"),
    ("HSET of the counters, timestamps and oid", "touch(user_index, active_index, ACTIVE"),
    ("the user's two indexes (ZADD, ZADD)", "redis.call('HINCRBY', stats, 'messages', 1)"),
    ("the bucket's four stats counters (HINCRBY x 4)", "hot_touch(hot, msg_ts"),
)


def _cut(marker: str) -> Callable[[str], str]:
    def cut(body: str) -> str:
        head = body[: body.index(marker)]
        return head.replace("seq .. '-0'", "'*'") + "return {OK, 1}\n"

    return cut


def _source_at(ref: str) -> str:
    """The append script's source as commit ``ref`` generates it (its code from ``git archive``)."""
    with tempfile.TemporaryDirectory(prefix="scriptsteps-") as tree:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "session_svc"],
                                 capture_output=True, check=True)  # fmt: skip
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
        code = "from session_svc.storage.scripts.api import APPEND_MESSAGE; print(APPEND_MESSAGE.source)"
        env = {**os.environ, "PYTHONPATH": tree}
        out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        return out.stdout


async def _run(url: str, sources: dict[str, str]) -> dict[str, list[float]]:
    r = Redis.from_url(url, decode_responses=True)
    keys = Keys("steps", 16)
    create = await r.script_load(CREATE_SESSION.source)
    shas = {name: await r.script_load(src) for name, src in sources.items()}
    sessions: dict[str, list[tuple[str, str]]] = {}
    for v, name in enumerate(sources):
        sessions[name] = []
        for i in range(SESSIONS):
            uid, sid = f"u{v}-{i}", str(uuid.uuid4())
            uk, now = keys.for_user(uid), int(time.time() * 1e6)
            rec = new_session_record(sid, uid, "", "{}", "{}", "", now)
            ks = [uk.session(sid), uk.sessions, uk.active, uk.stats, uk.outbox, uk.hot]
            await r.evalsha(create, len(ks), *ks, sid, uid, now, *[x for kv in rec.items() for x in kv])
            sessions[name].append((uid, sid))
    results: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(ROUNDS):
        for name, sha in shas.items():
            await r.config_resetstat()
            pipe = r.pipeline(transaction=False)
            for i in range(CALLS):
                uid, sid = sessions[name][i % SESSIONS]
                uk = keys.for_user(uid)
                ks = [uk.session(sid), uk.messages(sid), uk.sessions, uk.active, uk.stats, uk.outbox, uk.hot]
                args = [sid, uid, str(uuid.uuid4()), "user", CONTENT, "chat", "12", "100", "{}",
                        int(time.time() * 1e6)]  # fmt: skip
                pipe.evalsha(sha, len(ks), *ks, *args)
                if len(pipe) >= 100:
                    await pipe.execute()
                    pipe = r.pipeline(transaction=False)
            await pipe.execute()
            stats = await r.info("commandstats")
            results[name].append(float(stats["cmdstat_evalsha"]["usec_per_call"]))
    await r.aclose()
    return results


def scriptsteps(env: dict[str, str]) -> None:
    body = APPEND_MESSAGE.body
    sources = {label: APPEND_MESSAGE.source.replace(body, _cut(marker)(body)) for label, marker in STEPS}
    sources["the hot set (skipped within the same second): the whole append"] = APPEND_MESSAGE.source
    ref = os.environ.get("BENCH_REF")
    if ref:
        sources[f"the whole append of {ref}"] = _source_at(ref)
    os.environ.setdefault("BENCH_REDIS_CPUS", "1")
    with private_redis() as url:
        results = asyncio.run(_run(url, sources))
    print(f"\n# where an append's script time goes: {CALLS:,} EVALSHAs per row and round, pipelined by 100, "
          f"{ROUNDS} interleaved rounds, medians; Redis on core {os.environ['BENCH_REDIS_CPUS']}")  # fmt: skip
    print("| the append script up to and including | µs per call | the step's share | rounds |")
    print("|---|---:|---:|---|")
    before = 0.0
    for i, (name, runs) in enumerate(results.items()):
        median = sorted(runs)[len(runs) // 2]
        share = f"{median - before:.1f}" if i <= len(STEPS) else ""
        print(f"| {name} | {median:.1f} | {share} | {', '.join(f'{x:.1f}' for x in runs)} |")
        if i <= len(STEPS):
            before = median


if __name__ == "__main__":
    scriptsteps(dict(os.environ))
