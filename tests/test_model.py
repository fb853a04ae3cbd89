"""Model-based test of the whole service: random sequences of API calls, flushes and sweeps against the
real Redis and PostgreSQL, each answer compared with a plain-Python model of what the service promises.

The model holds, per session: owner, status, title, metadata, conversation_data, summary, the messages
(sequence, role, type, content, tokens, cost as ``Decimal``) and memories (with their types), the
version (+1 per write) and where the session lives (``hot``: in Redis; ``dirty``: writes not yet in
Postgres). Rules act on the service and on the model at once; reads must answer exactly what the model
predicts (money exact, sequences 1..n, totals, listing order, ``is_active``, ``has_memory``), a drain of
the outbox must flush exactly one entry per acknowledged write and leave Postgres equal to the model,
and a sweep (``hot_ttl_s=0``) must evict exactly the sessions that are in Redis and fully flushed, and
a trim of the user indexes (retention 0) must take exactly the evicted sessions that are not active out
of their users' indexes, with nothing a user sees changing.

Timestamps cannot be predicted, so the model learns each one from the answer that acknowledged the write
(a message's ``created_at`` is its session's new ``last_activity``) and then holds the service to it. The
one write whose answer carries no timestamp (DELETE) leaves ``updated_at`` to be learned from the next
read, which must not go backwards.

Hypothesis stateful tests are synchronous and the service is asyncio: the test owns a private event loop
and every rule runs its requests to completion on it. Each example gets its own app (aiohttp
``TestServer``), Redis key prefix (deleted at the end of the example), user ids, and an emptied copy of
this module's own Postgres schema, so the stats and the tables must equal the model exactly.

Shaping the search (checked by breaking the service on purpose: wrong sequence numbers, counters, money
rounding, status arrows, ownership, eviction of unflushed data, rehydration, cold pages...; each one
fails this test): at most MAX_SESSIONS sessions per example so that writes pile up on each; flush and
sweep only when they can change something; PUT statuses drawn as "next", "forbidden", "same" or none
rather than uniformly; every read rule reads a session (or a listing) completely, every page.

Sessions are made to grow. Hypothesis picks among the enabled rules uniformly, and its swarm testing
disables a random subset of rules in each example (so one append rule was off in about half of them),
while ends came every few steps: the largest session of a whole run held 13 messages, and almost half
the steps acted on sessions that no longer took messages. Now the initial sessions start with 1-8
messages (initialize rules always run), two rules append (a batch of 1-8 messages, or 1-3 conversation
turns), appends move on to an active session unless ``redirect`` is 0, and a session leaves "active"
(DELETE, PUT completed) only after GROW_BEFORE_END messages were appended since one last did.
Measured over a run (instrumented copy, 2026-11-27): largest session 89 messages, the largest of each
example 8 at the median and 39 at p90, 2 examples in 115 without any message, 15% of the steps acting
on a session on one that is no longer active.

The run is derandomized (reproducible in CI) at 100 examples of up to 50 steps: 26 s here (25.5 and
25.9 s measured; it was 21 s before the weighting). A failure takes about 5 minutes more, while
Hypothesis shrinks it to a short sequence of rule calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from session_svc.http.app import create_app
from session_svc.http.appkeys import BACKEND
from session_svc.record.keys import bucket_of
from session_svc.settings import Settings
from session_svc.storage.resources import Backend
from tests import outbox_drain, pg_rows, support
from tests.helpers import ISO_Z, MEMORY_FIELDS, MESSAGE_FIELDS, SESSION_FIELDS, SESSIONS, session_url
from workers.expiry import sweep, trim_user_indexes

T = TypeVar("T")

ALLOWED = {("active", "completed"), ("completed", "archived"), ("active", "ended")}
STATUSES = ("active", "completed", "archived", "ended")
ROLES = ("user", "assistant", "system", "tool_call", "tool_result")
MESSAGE_TYPES = ("chat", "system", "tool_call", "tool_result", "notification")
MEMORY_TYPES = ("preference", "conversation", "entity", "summary", "custom")
N_USERS = 3  # users 0 and 1 share a Redis bucket, user 2 is in another one
# Few sessions per example, so that writes pile up on each (long lifecycles, several evictions).
MAX_SESSIONS = 5
# A session leaves "active" (DELETE, or PUT status=completed) only once this many messages were
# appended since one last did. Without it, ends came every few steps and half the steps acted on
# sessions that could no longer grow.
GROW_BEFORE_END = 8
SUMMARY_FIELDS = {
    "session_id", "user_id", "title", "status", "message_count", "total_tokens", "total_cost", "has_memory",
    "is_active", "session_summary", "created_at", "last_activity",
}  # fmt: skip
LIST_ITEM_FIELDS = {
    "session_id", "user_id", "title", "status", "is_active", "message_count", "total_tokens", "total_cost",
    "created_at", "updated_at", "last_activity",
}  # fmt: skip
STEP_TIMEOUT_S = 60
FOREIGN_REQUESTS = (
    ("GET", "", None),
    ("GET", "/summary", None),
    ("GET", "/messages", None),
    ("GET", "/memory", None),
    ("GET", "/memories", None),
    ("PUT", "", {"title": "taken over", "status": "ended"}),
    ("PUT", "", {}),
    ("DELETE", "", None),
    ("POST", "/messages", {"role": "user", "content": "intruder", "tokens_used": 1, "cost_usd": 1}),
    ("POST", "/memory", {"memory_type": "entity", "content": "intruder"}),
)


@pytest.fixture(scope="module")
def db_schema(test_urls: Any) -> Iterator[str]:
    """This module's own schema (overrides the per-run one of conftest); emptied at each example."""
    schema = support.create_schema(test_urls.database_url)
    yield schema
    support.drop_schema(test_urls.database_url, schema)


# Strategies ------------------------------------------------------------------------------------------

_chars = st.characters(codec="utf-8", exclude_characters="\x00")


def texts(min_size: int = 0, max_size: int = 20) -> st.SearchStrategy[str]:
    return st.text(_chars, min_size=min_size, max_size=max_size)


# user_id: not blank, no control characters, no "/" (it is a path segment of the user listing); anything
# else goes, braces included.
user_names = st.text(
    st.characters(codec="utf-8", exclude_characters=[chr(c) for c in range(32)] + ["\x7f", "/"]),
    min_size=1,
    max_size=12,
)
non_blank = texts(1, 30).filter(lambda s: s.strip() != "")
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts(0, 10)
)
_json_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts(0, 6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
json_objects = st.dictionaries(texts(0, 8), _json_values, max_size=4)
costs = st.sampled_from([Decimal("0"), Decimal("0.0001"), Decimal("0.000001"), Decimal("1000000")]) | (
    st.decimals(min_value=0, max_value=1_000_000, places=6)
)
tokens = st.sampled_from([0, 1, 2**31 - 1]) | st.integers(0, 2**31 - 1)


def maybe(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    """``None`` = leave the field out of the request (the service's default applies)."""
    return st.none() | strategy


a_message = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES), "content": non_blank},
    optional={
        "message_type": st.sampled_from(MESSAGE_TYPES),
        "tokens_used": tokens,
        "cost_usd": costs,
        "metadata": json_objects,
    },
)
messages_to_send = st.lists(a_message, min_size=1, max_size=8)
# A conversation turn: the user's message, optionally a tool call and its result, the assistant's answer.
turns = st.lists(
    st.tuples(non_blank, non_blank, st.booleans(), tokens, costs, maybe(json_objects)), min_size=1, max_size=3
)
# Rules that append draw the session from the bundle, then (unless ``redirect`` is 0) move on to the next
# active one: appends mostly land where they are taken, and sometimes meet a finished session (409).
redirects = st.integers(0, 3)


# The model -------------------------------------------------------------------------------------------


@dataclass
class Session:
    sid: str
    user: str
    title: str
    metadata: dict[str, Any]
    conversation_data: dict[str, Any]
    summary: str
    created_at: str
    last_activity: str
    updated_at: str | None  # None: changed by a write that did not answer it (DELETE); learned at next read
    updated_floor: str  # updated_at may not go below this
    status: str = "active"
    messages: list[dict[str, Any]] = field(default_factory=list)  # API shape, money as Decimal
    memories: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    version: int = 1  # +1 per acknowledged write (= per outbox entry)
    hot: bool = True  # its data is in Redis
    dirty: bool = True  # it has writes not yet flushed to Postgres
    indexed: bool = True  # in its user's index in Redis (not trimmed)

    @property
    def tokens(self) -> int:
        return sum(m["tokens_used"] for m in self.messages)

    @property
    def cost(self) -> Decimal:
        return sum((m["cost_usd"] for m in self.messages), Decimal(0))

    def touched(self, at: str | None) -> None:
        """A write happened: ``at`` is its updated_at when the answer told it."""
        self.version += 1
        self.dirty = True
        self.hot = True
        self.indexed = True
        if at is None:
            self.updated_floor = self.updated_at or self.updated_floor
        else:
            assert at >= (self.updated_at or self.updated_floor), (at, self.updated_at, self.updated_floor)
        self.updated_at = at

    def learn_updated_at(self, got: str) -> None:
        if self.updated_at is None:
            assert ISO_Z.match(got), got
            assert got >= self.updated_floor, (self.sid, got, self.updated_floor)
            self.updated_at = got

    def api(self) -> dict[str, Any]:
        """GET /sessions/{id}, with total_cost as an exact Decimal."""
        return {
            "session_id": self.sid,
            "user_id": self.user,
            "title": self.title,
            "status": self.status,
            "conversation_data": self.conversation_data,
            "metadata": self.metadata,
            "is_active": self.is_active,
            "message_count": len(self.messages),
            "total_tokens": self.tokens,
            "total_cost": self.cost,
            "session_summary": self.summary,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_activity": self.last_activity,
        }

    def summary_api(self) -> dict[str, Any]:
        full = {**self.api(), "has_memory": bool(self.memories)}
        return {k: full[k] for k in SUMMARY_FIELDS}

    def list_item(self) -> dict[str, Any]:
        full = self.api()
        return {k: full[k] for k in LIST_ITEM_FIELDS}

    @property
    def is_active(self) -> bool:
        return self.status == "active"

    def memories_newest_first(self, memory_type: str | None) -> list[dict[str, Any]]:
        return [m for m in reversed(self.memories) if memory_type is None or m["memory_type"] == memory_type]


def canon(value: Any) -> Any:
    """JSON numbers compared as decimals: Postgres (jsonb) keeps a number's value, not its spelling (a
    float sent as ``7.025859339845334e+16`` comes back as ``70258593398453340``). Floats become the
    Decimal of their shortest repr, which is what the JSON text says."""
    if isinstance(value, dict):
        return {k: canon(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canon(v) for v in value]
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


def money(value: Any) -> Decimal:
    """Answers are parsed with ``parse_float=Decimal``: the exact number the JSON text shows."""
    assert isinstance(value, int | Decimal) and not isinstance(value, bool), value
    return Decimal(value)


def norm_session(body: dict[str, Any]) -> dict[str, Any]:
    for name in ("is_active", "has_memory"):
        if name in body:
            assert isinstance(body[name], bool), body
    for name in ("message_count", "total_tokens"):
        assert type(body[name]) is int, body
    return {**body, "total_cost": money(body["total_cost"])}


def norm_message(m: dict[str, Any]) -> dict[str, Any]:
    assert set(m) == MESSAGE_FIELDS, m
    assert type(m["sequence"]) is int and type(m["tokens_used"]) is int, m
    return {**m, "cost_usd": money(m["cost_usd"])}


@dataclass(frozen=True)
class Env:
    """What every example shares: the test's event loop, settings and registry of key prefixes."""

    loop: asyncio.AbstractEventLoop
    base: Settings
    redis_url: str
    prefixes: set[str]


class ServiceMachine(RuleBasedStateMachine):
    env: ClassVar[Env]
    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.prefix = support.new_name("tm")
        self.env.prefixes.add(self.prefix)  # safety net: conftest deletes it at the end of the test
        self.settings = dataclasses.replace(self.env.base, key_prefix=self.prefix)
        self.schema = self.settings.db_schema
        self.users: list[str] = []  # drawn by first_sessions
        self.stranger = "stranger-" + uuid.uuid4().hex  # a user who never owns anything
        self.model: dict[str, Session] = {}
        self.unflushed = 0  # outbox entries written since the last drain
        self.unswept = True  # something may have changed since the last sweep
        self.grown = 0  # messages appended since a session last left "active" (see GROW_BEFORE_END)
        self.client: TestClient | None = None
        self.client = self.run(self._start())
        self.backend: Backend = self.client.app[BACKEND]
        assert self.backend.pg is not None
        self.flusher = outbox_drain.make_flusher(
            self.backend.redis, self.backend.pg, self.backend.keys, self.schema
        )

    def _new_users(self, names: list[str]) -> list[str]:
        """Fresh ids that start with the drawn names: the first two share a bucket (ownership is checked
        inside one script), the third does not (ownership by key layout, and the Postgres fallback of a
        Redis miss)."""
        buckets = self.settings.redis_buckets

        def fresh(name: str) -> str:
            return f"{name}-{uuid.uuid4().hex}"

        first = fresh(names[0])
        while bucket_of(second := fresh(names[1]), buckets) != bucket_of(first, buckets):
            pass
        while bucket_of(third := fresh(names[2]), buckets) == bucket_of(first, buckets):
            pass
        return [first, second, third]

    async def _start(self) -> TestClient:
        client = TestClient(TestServer(create_app(self.settings)))
        await client.start_server()
        pg = client.app[BACKEND].pg
        assert pg is not None
        s = f'"{self.schema}"'
        await pg.execute(f"TRUNCATE {s}.session_messages, {s}.session_memories, {s}.sessions")
        return client

    def teardown(self) -> None:
        try:
            if self.client is not None:
                self.run(self.client.close())
        finally:
            support.delete_prefix(self.env.redis_url, self.prefix)
            self.env.prefixes.discard(self.prefix)

    # Plumbing ------------------------------------------------------------------------------------------

    def run(self, coro: Awaitable[T]) -> T:
        return self.env.loop.run_until_complete(asyncio.wait_for(coro, STEP_TIMEOUT_S))

    async def _request(self, method: str, path: str, params: dict[str, str], body: Any) -> tuple[int, Any]:
        assert self.client is not None
        resp = await self.client.request(method, path, params=params, json=body)
        text = await resp.text()
        assert resp.content_type == "application/json", (method, path, resp.status, text)
        return resp.status, json.loads(text, parse_float=Decimal)

    def call(self, method: str, path: str, body: Any = None, **params: str) -> tuple[int, Any]:
        if method != "GET":
            self.unswept = True
        return self.run(self._request(method, path, params, body))

    def ok(self, method: str, path: str, body: Any = None, **params: str) -> Any:
        status, answer = self.call(method, path, body, **params)
        assert status == 200, (method, path, params, body, status, answer)
        return answer

    def error(self, status: int, method: str, path: str, body: Any = None, **params: str) -> Any:
        got, answer = self.call(method, path, body, **params)
        assert got == status, (method, path, params, body, got, answer)
        assert set(answer) == {"detail"}, answer
        return answer["detail"]

    def owner_write(self, s: Session) -> None:
        """A write request by the owner brings a cold session back into Redis (clean), whatever its
        outcome: the script meets the cold session first and the service rehydrates it to run it."""
        if not s.hot:
            s.hot, s.dirty, s.indexed = True, False, True

    def assert_session(self, s: Session) -> None:
        body = self.ok("GET", session_url(s.sid), user_id=s.user)
        assert set(body) == SESSION_FIELDS, body
        s.learn_updated_at(body["updated_at"])
        assert norm_session(body) == s.api()

    # Writes ------------------------------------------------------------------------------------------

    @initialize(
        target=sessions,
        names=st.lists(user_names, min_size=N_USERS, max_size=N_USERS),
        owners=st.lists(st.integers(0, N_USERS - 1), min_size=1, max_size=3),
        histories=st.lists(st.lists(a_message, min_size=1, max_size=8), min_size=3, max_size=3),
    )
    def first_sessions(
        self, names: list[str], owners: list[int], histories: list[list[dict[str, Any]]]
    ) -> Any:
        """The example's users, and sessions to start with (each with a few messages already), so that
        every rule has something to act on. Swarm testing may disable both append rules in an example,
        but never an initialize rule: every example has messages."""
        self.users = self._new_users(names)
        sids = [self.create_session(user, {}) for user in owners]
        for sid, history in zip(sids, histories, strict=False):
            self.append(sid, history)  # type: ignore[arg-type]  # a rule, typed by hypothesis as its results
        return multiple(*sids)

    @precondition(lambda self: len(self.model) < MAX_SESSIONS)
    @rule(
        target=sessions,
        user=st.integers(0, N_USERS - 1),
        fields=st.fixed_dictionaries(
            {},
            optional={
                "title": texts(0, 30),
                "metadata": json_objects,
                "conversation_data": json_objects,
                "session_summary": texts(0, 30),
            },
        ),
    )
    def create_session(self, user: int, fields: dict[str, Any]) -> str:
        uid = self.users[user]
        body = self.ok("POST", SESSIONS, {"user_id": uid, **fields})
        assert set(body) == SESSION_FIELDS, body
        assert ISO_Z.match(body["created_at"]), body
        assert body["created_at"] == body["updated_at"] == body["last_activity"], body
        assert body["session_id"] not in self.model
        s = Session(
            sid=body["session_id"],
            user=uid,
            title=fields.get("title", ""),
            metadata=canon(fields.get("metadata", {})),
            conversation_data=canon(fields.get("conversation_data", {})),
            summary=fields.get("session_summary", ""),
            created_at=body["created_at"],
            last_activity=body["created_at"],
            updated_at=body["created_at"],
            updated_floor=body["created_at"],
        )
        assert norm_session(body) == s.api()
        self.model[s.sid] = s
        self.unflushed += 1
        return s.sid

    def growing(self, sid: str, redirect: int) -> str:
        """``sid``, or (``redirect`` > 0) the first active session from it on, if any is."""
        if redirect == 0 or self.model[sid].status == "active":
            return sid
        ids = list(self.model)
        i = ids.index(sid)
        return next((x for x in ids[i:] + ids[:i] if self.model[x].status == "active"), sid)

    @rule(sid=sessions, batch=messages_to_send, redirect=redirects)
    def append_messages(self, sid: str, batch: list[dict[str, Any]], redirect: int) -> None:
        self.append(self.growing(sid, redirect), batch)

    @rule(sid=sessions, turns=turns, redirect=redirects)
    def converse(
        self, sid: str, turns: list[tuple[str, str, bool, int, Decimal, Any]], redirect: int
    ) -> None:
        """Turns of a conversation as a chat client sends them: the user's message, then (when drawn) a
        tool call and its result, then the assistant's answer with its tokens and cost."""
        batch: list[dict[str, Any]] = []
        for question, answer, tool, n_tokens, cost, metadata in turns:
            batch.append({"role": "user", "content": question})
            if tool:
                batch.append({"role": "tool_call", "message_type": "tool_call", "content": '{"q": 1}'})
                batch.append({"role": "tool_result", "message_type": "tool_result", "content": answer})
            reply = {"role": "assistant", "content": answer, "tokens_used": n_tokens, "cost_usd": cost}
            batch.append(reply if metadata is None else {**reply, "metadata": metadata})
        self.append(self.growing(sid, redirect), batch)

    def append(self, sid: str, batch: list[dict[str, Any]]) -> None:
        s = self.model[sid]
        for sent in batch:
            self.owner_write(s)
            wire = dict(sent)
            if "cost_usd" in sent:  # as a JSON client sends it: an integer, or the nearest double
                cost = sent["cost_usd"]
                wire["cost_usd"] = int(cost) if cost == cost.to_integral_value() else float(cost)
            path = session_url(sid, "/messages")
            if s.status != "active":
                detail = self.error(409, "POST", path, wire, user_id=s.user)
                assert detail == f"Session is {s.status}: only an active session takes new messages"
                self.assert_session(s)
                continue
            got = norm_message(self.ok("POST", path, wire, user_id=s.user))
            assert ISO_Z.match(got["created_at"]) and got["created_at"] >= s.last_activity, (got, s)
            expected = {
                "message_id": got["message_id"],
                "session_id": sid,
                "user_id": s.user,
                "sequence": len(s.messages) + 1,
                "role": sent["role"],
                "content": sent["content"],
                "message_type": sent.get("message_type", "chat"),
                "metadata": canon(sent.get("metadata", {})),
                "tokens_used": sent.get("tokens_used", 0),
                "cost_usd": sent.get("cost_usd", Decimal(0)),
                "created_at": got["created_at"],
            }
            assert got == expected
            s.messages.append(expected)
            s.last_activity = got["created_at"]
            s.touched(got["created_at"])
            self.unflushed += 1
            self.grown += 1
            # Read your write: the last page of one message is this one.
            page = self.ok("GET", path, user_id=s.user, page=str(len(s.messages)), page_size="1")
            assert [norm_message(m) for m in page["messages"]] == [expected]

    @rule(
        sid=sessions,
        memory_type=st.sampled_from(MEMORY_TYPES),
        content=non_blank,
        metadata=maybe(json_objects),
    )
    def create_memory(
        self, sid: str, memory_type: str, content: str, metadata: dict[str, Any] | None
    ) -> None:
        s = self.model[sid]
        self.owner_write(s)
        sent: dict[str, Any] = {"memory_type": memory_type, "content": content}
        if metadata is not None:
            sent["metadata"] = metadata
        path = session_url(sid, "/memory")
        if s.status in ("archived", "ended"):
            detail = self.error(409, "POST", path, sent, user_id=s.user)
            assert detail == f"Session is {s.status}: it no longer takes memories"
            self.assert_session(s)
            return
        got = self.ok("POST", path, sent, user_id=s.user)
        assert set(got) == MEMORY_FIELDS, got
        assert ISO_Z.match(got["created_at"]) and got["created_at"] >= s.last_activity, (got, s)
        assert all(got["memory_id"] != m["memory_id"] for m in s.memories)
        expected = {
            "memory_id": got["memory_id"],
            "session_id": sid,
            "user_id": s.user,
            "memory_type": memory_type,
            "content": content,
            "metadata": canon(metadata or {}),
            "created_at": got["created_at"],
        }
        assert got == expected
        s.memories.append(expected)
        s.last_activity = got["created_at"]
        s.touched(got["created_at"])
        self.unflushed += 1
        # Read your write: it is the latest memory, of any type and of its own.
        for params in ({}, {"memory_type": memory_type}):
            assert self.ok("GET", path, user_id=s.user, **params) == expected, params

    @rule(
        sid=sessions,
        updates=st.lists(
            st.tuples(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "title": texts(0, 30),
                        "metadata": json_objects,
                        "conversation_data": json_objects,
                        "session_summary": texts(0, 30),
                    },
                ),
                st.sampled_from(["next", "forbidden", "same", "none"]),
                st.integers(0, 3),
            ),
            min_size=1,
            max_size=3,
        ),
    )
    def update_session(self, sid: str, updates: list[tuple[dict[str, Any], str, int]]) -> None:
        """One to three PUTs in a row. The status sent is a legal next one, a forbidden one (409, and
        nothing changes), the current one (allowed), or none."""
        s = self.model[sid]
        for fields, how, pick in updates:
            options: dict[str, list[str | None]] = {
                "next": [new for new in STATUSES if (s.status, new) in ALLOWED],
                "forbidden": [new for new in STATUSES if new != s.status and (s.status, new) not in ALLOWED],
                "same": [s.status],
            }
            choices = options.get(how) or [None]
            status = choices[pick % len(choices)]
            if s.status == "active" and status == "completed" and self.grown < GROW_BEFORE_END:
                status = None  # not yet: let it grow (GROW_BEFORE_END)
            self.put(s, fields if status is None else {**fields, "status": status})

    def put(self, s: Session, fields: dict[str, Any]) -> None:
        self.owner_write(s)
        new_status = fields.get("status", s.status)
        if new_status != s.status and (s.status, new_status) not in ALLOWED:
            detail = self.error(409, "PUT", session_url(s.sid), fields, user_id=s.user)
            assert detail == f"Session is {s.status}: it cannot become {new_status}"
            self.assert_session(s)
            return
        body = self.ok("PUT", session_url(s.sid), fields, user_id=s.user)
        assert set(body) == SESSION_FIELDS, body
        changes = {k: v for k, v in fields.items() if k != "status"}
        if changes or new_status != s.status:
            s.title = changes.get("title", s.title)
            s.metadata = canon(changes.get("metadata", s.metadata))
            s.conversation_data = canon(changes.get("conversation_data", s.conversation_data))
            s.summary = changes.get("session_summary", s.summary)
            if s.status == "active" != new_status:
                self.grown = 0
            s.status = new_status
            s.touched(body["updated_at"])
            self.unflushed += 1
        else:  # nothing to change: nothing is written, not even updated_at
            s.learn_updated_at(body["updated_at"])
        assert norm_session(body) == s.api()

    @precondition(lambda self: self.grown >= GROW_BEFORE_END)
    @rule(sid=sessions, times=st.integers(1, 2))
    def end_session(self, sid: str, times: int) -> None:
        """DELETE, once or twice in a row (idempotent)."""
        s = self.model[sid]
        for _ in range(times):
            self.owner_write(s)
            if s.status in ("completed", "archived"):
                detail = self.error(409, "DELETE", session_url(sid), user_id=s.user)
                assert detail == f"Session is {s.status}: it cannot become ended"
                self.assert_session(s)
                continue
            body = self.ok("DELETE", session_url(sid), user_id=s.user)
            assert body == {"message": "Session ended successfully"}
            if s.status == "active":
                s.status = "ended"
                s.touched(None)
                self.unflushed += 1
                self.grown = 0

    @rule(
        sid=sessions,
        who=st.sampled_from(["other user", "stranger", "missing session", "not a uuid"]),
        other=st.integers(0, N_USERS - 2),
        missing=st.uuids(version=4),
    )
    def foreign_requests(self, sid: str, who: str, other: int, missing: uuid.UUID) -> None:
        """Every route on another user's session, or on no session at all: 404 "Session not found", and
        nothing changes (users 0 and 1 share a bucket: the scripts' owner check; user 2 does not)."""
        s = self.model[sid]
        target, user = sid, s.user
        if who == "other user":
            user = [u for u in self.users if u != s.user][other]
        elif who == "stranger":
            user = self.stranger
        elif who == "missing session":
            target = str(missing)
        else:
            target = "stats-" + sid[:8]
        for method, suffix, body in FOREIGN_REQUESTS:
            detail = self.error(404, method, session_url(target, suffix), body, user_id=user)
            assert detail == "Session not found", (method, suffix)
        self.assert_session(s)

    @precondition(lambda self: self.unflushed > 0)
    @rule(then_sweep=st.booleans())
    def flush(self, then_sweep: bool) -> None:
        """Drain the outbox: one entry per acknowledged write, and Postgres then equals the model."""
        self.unswept = True
        flushed = self.run(outbox_drain.drain(self.flusher))
        assert flushed == self.unflushed
        self.unflushed = 0
        for s in self.model.values():
            s.dirty = False
        self.run(self._assert_postgres_equals_model())
        if then_sweep:
            self.evict()

    @precondition(lambda self: self.unswept)
    @rule()
    def evict(self) -> None:
        """Sweep with hot_ttl_s=0: exactly the sessions in Redis with every write flushed leave it."""
        self.unswept = False
        evicted = self.run(sweep(self.backend, 0))
        leaving = [s for s in self.model.values() if s.hot and not s.dirty]
        assert evicted == len(leaving), (evicted, [s.sid for s in leaving])
        for s in leaving:
            s.hot = False

    @precondition(lambda self: any(s.indexed and not (s.hot or s.is_active) for s in self.model.values()))
    @rule()
    def trim(self) -> None:
        """Trim the user indexes with a retention of 0 (over the whole example's schema: the window
        starts at the beginning every time): exactly the sessions out of Redis that are not active leave
        their users' indexes. Nothing a user sees changes: the read rules check listings, reads and
        writes of trimmed sessions against the same model."""
        self.run(self.backend.redis.delete(self.backend.keys.trimmed_until))
        trimmed = self.run(trim_user_indexes(self.backend, 0))
        leaving = [s for s in self.model.values() if s.indexed and not (s.hot or s.is_active)]
        assert trimmed == len(leaving), (trimmed, [s.sid for s in leaving])
        for s in leaving:
            s.indexed = False

    async def _assert_postgres_equals_model(self) -> None:
        pg = self.backend.pg
        assert pg is not None
        counts = [
            await pg.fetchval(f'SELECT count(*) FROM "{self.schema}".{table}')
            for table in ("sessions", "session_messages", "session_memories")
        ]
        expected_counts = [
            len(self.model),
            sum(len(s.messages) for s in self.model.values()),
            sum(len(s.memories) for s in self.model.values()),
        ]
        assert counts == expected_counts
        rows = canon(await pg_rows.pg_sessions(pg, self.schema, list(self.model)))
        for sid, s in self.model.items():
            row = rows[sid]
            s.learn_updated_at(row["updated_at"])
            assert row == {**s.api(), "memory_count": len(s.memories), "version": s.version}, sid
            assert canon(await pg_rows.pg_messages(pg, self.schema, sid)) == s.messages, sid
            stored = canon(await pg_rows.pg_memories(pg, self.schema, sid))
            expected = [{**m, "seq": i} for i, m in enumerate(s.memories, start=1)]
            assert stored == expected, sid

    # Reads -------------------------------------------------------------------------------------------

    @rule(sid=sessions, page_size=st.integers(1, 5), memory_type=maybe(st.sampled_from(MEMORY_TYPES)))
    def read_session(self, sid: str, page_size: int, memory_type: str | None) -> None:
        """Every read of one session: itself, its summary, every page of its messages (default size, and
        ``page_size`` up to one past the end), its latest memory of any type and of each type, and every
        page of its memories (all, or of ``memory_type``)."""
        s = self.model[sid]
        self.assert_session(s)
        body = self.ok("GET", session_url(sid, "/summary"), user_id=s.user)
        assert set(body) == SUMMARY_FIELDS, body
        assert norm_session(body) == s.summary_api()
        self.assert_messages(s, None)
        self.assert_messages(s, page_size)
        for mtype in (None, *MEMORY_TYPES):
            params = {"user_id": s.user} if mtype is None else {"user_id": s.user, "memory_type": mtype}
            newest_first = s.memories_newest_first(mtype)
            if newest_first:
                assert self.ok("GET", session_url(sid, "/memory"), **params) == newest_first[0], mtype
            else:
                detail = self.error(404, "GET", session_url(sid, "/memory"), **params)
                assert detail == "Memory not found", mtype
        params = (
            {"user_id": s.user} if memory_type is None else {"user_id": s.user, "memory_type": memory_type}
        )
        newest_first = s.memories_newest_first(memory_type)
        for page in range(1, len(newest_first) // page_size + 2):
            body = self.ok(
                "GET", session_url(sid, "/memories"), page=str(page), page_size=str(page_size), **params
            )
            assert body == {
                "memories": newest_first[(page - 1) * page_size : page * page_size],
                "total": len(newest_first),
                "page": page,
                "page_size": page_size,
            }, page

    def assert_messages(self, s: Session, page_size: int | None) -> None:
        """Every page of ``page_size`` up to one past the end, or the default page (``None``)."""
        pages = [None] if page_size is None else range(1, len(s.messages) // page_size + 2)
        for page in pages:
            params = {"user_id": s.user}
            if page is not None:
                params.update(page=str(page), page_size=str(page_size))
            body = self.ok("GET", session_url(s.sid, "/messages"), **params)
            p, n = page or 1, page_size or 100
            assert set(body) == {"messages", "total", "page", "page_size"}, body
            assert (body["total"], body["page"], body["page_size"]) == (len(s.messages), p, n), body
            got = [norm_message(m) for m in body["messages"]]
            assert got == s.messages[(p - 1) * n : p * n], (p, n)

    @rule(
        user=st.integers(0, N_USERS), all_param=st.sampled_from([None, "false"]), page_size=st.integers(1, 4)
    )
    def list_user_sessions(self, user: int, all_param: str | None, page_size: int) -> None:
        """A user's listing (N_USERS: the stranger), all sessions and active ones only: the default page,
        then every page of ``page_size``. Newest activity first, ``total`` exact."""
        uid = self.users[user] if user < N_USERS else self.stranger
        for active_only in (all_param, "true"):
            mine = [
                s for s in self.model.values() if s.user == uid and (s.is_active or active_only != "true")
            ]
            mine.sort(key=lambda s: (s.last_activity, s.sid), reverse=True)
            base = {} if active_only is None else {"active_only": active_only}
            pages = [(None, None)] + [(p, page_size) for p in range(1, len(mine) // page_size + 2)]
            for page, size in pages:
                params = dict(base)
                if page is not None and size is not None:
                    params.update(page=str(page), page_size=str(size))
                body = self.ok("GET", f"/api/v1/users/{quote(uid, safe='')}/sessions", **params)
                p, n = page or 1, size or 50
                assert set(body) == {"sessions", "total", "page", "page_size"}, body
                assert (body["total"], body["page"], body["page_size"]) == (len(mine), p, n), body
                for item in body["sessions"]:
                    assert set(item) == LIST_ITEM_FIELDS, item
                    assert item["session_id"] in self.model, item
                    self.model[item["session_id"]].learn_updated_at(item["updated_at"])
                got = [norm_session(item) for item in body["sessions"]]
                assert got == [s.list_item() for s in mine[(p - 1) * n : p * n]], (active_only, p, n)

    @invariant()
    def stats_are_exact(self) -> None:
        body = self.ok("GET", f"{SESSIONS}/stats")
        sessions = list(self.model.values())
        n_messages = sum(len(s.messages) for s in sessions)
        expected = {
            "total_sessions": len(sessions),
            "active_sessions": sum(s.is_active for s in sessions),
            "total_messages": n_messages,
            "total_tokens": sum(s.tokens for s in sessions),
            "total_cost": sum((s.cost for s in sessions), Decimal(0)),
        }
        got = {k: body[k] for k in expected}
        got["total_cost"] = money(got["total_cost"])
        assert got == expected, body
        average = body["average_messages_per_session"]
        assert isinstance(average, int | Decimal) and not isinstance(average, bool), body
        exact = Decimal(n_messages) / len(sessions) if sessions else Decimal(0)
        assert abs(average - exact) <= Decimal("0.005") and average == round(average, 2), body


def test_service_matches_the_model(make_settings: Any, test_urls: Any, prefix_registry: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        env = Env(loop, make_settings(), test_urls.redis_url, prefix_registry.prefixes)
        machine = type("Machine", (ServiceMachine,), {"env": env})
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=100,
                stateful_step_count=50,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=[
                    HealthCheck.too_slow,
                    HealthCheck.filter_too_much,
                    HealthCheck.data_too_large,
                ],
            ),
        )
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@pytest.mark.parametrize("user_id", ["{team}", "a}b", "{", "...", ".a", "a.", "%2F", "a b"])
async def test_a_user_id_accepted_at_creation_can_list_its_sessions(client: TestClient, user_id: str) -> None:
    """Any user id that POST /sessions accepts must be able to read GET /users/{user_id}/sessions. Braces
    do not match aiohttp's default pattern for a path variable (``[^{}/]+``); dots other than the dot
    segments themselves are ordinary characters."""
    resp = await client.post(SESSIONS, json={"user_id": user_id})
    assert resp.status == 200, await resp.text()
    sid = (await resp.json())["session_id"]
    listing = await client.get(f"/api/v1/users/{quote(user_id, safe='')}/sessions")
    assert listing.status == 200, (listing.url, listing.status, await listing.text())
    assert [s["session_id"] for s in (await listing.json())["sessions"]] == [sid]


@pytest.mark.parametrize("user_id", [".", "..", "a/b", "/"])
async def test_a_user_id_that_cannot_be_a_path_segment_is_refused_at_creation(
    client: TestClient, user_id: str
) -> None:
    """ "." and ".." are dot segments that every HTTP client removes from a path (RFC 3986, 5.2.4), and a
    "/" splits the segment: such an id could never reach its listing, so it is refused up front (400
    naming ``user_id``) and no session is created."""
    resp = await client.post(SESSIONS, json={"user_id": user_id})
    assert resp.status == 400, await resp.text()
    assert await resp.json() == {
        "detail": [
            {
                "type": "value_error",
                "loc": ["body", "user_id"],
                "msg": 'Value error, must not contain "/" nor be "." or ".."',
            }
        ]
    }
    stats = await client.get(f"{SESSIONS}/stats")
    assert (await stats.json())["total_sessions"] == 0
