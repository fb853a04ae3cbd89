"""The API guide's own examples, driven against the service.

The guide (``docs/session_service_api_guide.md``, the contract as our users' clients received it) is
read at test time, so there is no second copy of it here. Every fenced ``bash`` block with a ``curl``
command becomes a request, and the ``**响应:**`` JSON block after it becomes the expected shape. The
error section gives the exact 404 and 400 bodies. The ``SessionClient`` example runs as written
against a tiny in-process ``httpx`` stand-in that forwards to the test client.

The guide's user ids are mapped to ids unique to this run (``test_user_123`` -> ``test_user_123-<hex>``),
``{session_id}``/``{SESSION_ID}``/``{user_id}`` to the session that the nearest preceding create example
made (and its owner). Values are checked against what was sent (echo), except ``status`` (the guide's
value) and the DELETE answer (the guide's body exactly). ``memory_type`` is returned as sent (docs/api.md,
"Memories"), not as the guide's example shows.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import types
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from aiohttp.test_utils import TestClient

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "session_service_api_guide.md"
MIN_CURL_EXAMPLES = 12
MIN_RESPONSE_EXAMPLES = 10

FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
RESPONSE_LABEL = re.compile(r"^\*\*响应[:\uff1a]\*\*$")
ERROR_HEADING = re.compile(r"^#{2,6}\s*(\d{3})\b[^\n]*\n+```json[ \t]*\n(.*?)^```", re.M | re.S)
PLACEHOLDER = re.compile(r"\{(\w+)\}")

S = r"/api/v1/sessions"  # session routes
# (kind, method, path pattern); the first match wins ("stats" before "{id}").
ROUTES = [
    ("health", "GET", r"/health"),
    ("health_detailed", "GET", r"/health/detailed"),
    ("create", "POST", S),
    ("message_post", "POST", S + r"/[^/]+/messages"),
    ("message_get", "GET", S + r"/[^/]+/messages"),
    ("memory_post", "POST", S + r"/[^/]+/memory"),
    ("memory_get", "GET", S + r"/[^/]+/memory"),
    ("stats", "GET", S + r"/stats"),
    ("get", "GET", S + r"/[^/]+"),
    ("list", "GET", r"/api/v1/users/[^/]+/sessions"),
    ("update", "PUT", S + r"/[^/]+"),
    ("summary", "GET", S + r"/[^/]+/summary"),
    ("delete", "DELETE", S + r"/[^/]+"),
    ("other", "", r".*"),
]
# The order the examples run in: create first, delete last (an unknown route still runs, before delete).
RUN_ORDER = [
    "health",
    "health_detailed",
    "create",
    "message_post",
    "message_get",
    "memory_post",
    "memory_get",
    "get",
    "list",
    "update",
    "summary",
    "stats",
    "other",
    "delete",
]
FREE_FORM = {"metadata", "conversation_data"}  # objects of the caller's own: their keys are not the contract
SESSION_OBJECTS = {"create", "get", "update"}  # full session objects: every field sent is echoed


def route_kind(method: str, path: str) -> str:
    for kind, route_method, pattern in ROUTES:
        if route_method in ("", method) and re.fullmatch(pattern, path):
            return kind
    raise AssertionError("unreachable: 'other' matches everything")


# Parsing the guide ---------------------------------------------------------------------------------------


@dataclass
class Curl:
    index: int  # position among the guide's curl commands
    method: str
    path: str  # still with the guide's placeholders and user ids
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: dict[str, Any] | None
    response: Any  # the guide's **响应:** example, None when it shows none
    group: int  # which create-session example (0, 1, ...) this one follows in the guide
    source: str

    @property
    def kind(self) -> str:
        return route_kind(self.method, self.path)


@dataclass
class Guide:
    curls: list[Curl]
    errors: dict[int, Any]  # status -> the error section's example body
    python_client: str
    shapes: dict[str, Any] = field(default_factory=dict)  # kind -> the first response example of that kind


def curl_commands(block: str) -> list[list[str]]:
    """The argument lists of every ``curl`` in a bash block (comments dropped, ``| ...`` cut off)."""
    lines = [line for line in block.splitlines() if not line.lstrip().startswith("#")]
    tokens = shlex.split("\n".join(lines).replace("\\\n", " "))
    commands: list[list[str]] = []
    current: list[str] | None = None
    for token in tokens:
        if token == "curl":
            current = []
            commands.append(current)
        elif token in ("|", "||", "&&", ";"):
            current = None
        elif current is not None:
            current.append(token)
    return commands


def parse_curl(args: list[str]) -> tuple[str, str, dict[str, str], str | None]:
    method, url, data, headers = None, None, None, {}
    it = iter(args)
    for arg in it:
        if arg in ("-X", "--request"):
            method = next(it)
        elif arg in ("-H", "--header"):
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip()
        elif arg in ("-d", "--data", "--data-raw"):
            data = next(it)
        elif arg in ("-s", "-S", "-sS", "--silent", "-i", "-v"):
            continue
        elif re.match(r"https?://", arg):
            url = arg
        else:
            raise AssertionError(f"unsupported curl argument {arg!r} in {args}")
    assert url is not None, f"no URL in curl {args}"
    return method or ("POST" if data is not None else "GET"), url, headers, data


@cache
def load_guide() -> Guide:
    assert GUIDE.is_file(), f"the API guide is missing: {GUIDE}"
    text = GUIDE.read_text(encoding="utf-8")
    fences = list(FENCE.finditer(text))
    curls: list[Curl] = []
    creates = 0
    for i, fence in enumerate(fences):
        lang, block = fence[1], fence[2]
        if lang != "bash" or "curl" not in block:
            continue
        response = None
        if i + 1 < len(fences):
            following = fences[i + 1]
            label = text[fence.end() : following.start()].strip()
            if following[1] == "json" and RESPONSE_LABEL.match(label):
                response = json.loads(following[2])
        for args in curl_commands(block):
            method, url, headers, data = parse_curl(args)
            parts = urlsplit(url)
            body = json.loads(data) if data is not None else None
            assert body is None or isinstance(body, dict), f"-d is not a JSON object: {data}"
            call = Curl(
                len(curls), method, parts.path, parse_qsl(parts.query), headers, body, response, 0, block
            )
            if call.kind == "create":
                creates += 1
            call.group = max(creates - 1, 0)
            curls.append(call)
    errors = {int(m[1]): json.loads(m[2]) for m in ERROR_HEADING.finditer(text)}
    clients = [f[2] for f in fences if f[1] == "python" and "class SessionClient" in f[2]]
    assert len(clients) == 1, "the guide's SessionClient example is missing"
    guide = Guide(curls, errors, clients[0])
    for call in curls:
        if call.response is not None:
            guide.shapes.setdefault(call.kind, call.response)
    return guide


# Checking answers --------------------------------------------------------------------------------------


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    for name, kind in (("string", str), ("object", dict), ("array", list)):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def check_shape(example: Any, got: Any, where: str) -> None:
    """Every key of the guide's example is in ``got`` with the same JSON type (lists: the first element).

    ``status`` must also have the guide's value.
    """
    if example is None:
        return
    assert json_type(got) == json_type(example), f"{where}: {json_type(example)} expected, got {got!r}"
    if isinstance(example, dict):
        for key, value in example.items():
            assert key in got, f"{where}: key {key!r} missing (guide shows {value!r}) in {got!r}"
            if key in FREE_FORM:  # the caller's own object: its type here, its content by check_echo
                assert json_type(got[key]) == json_type(value), f"{where}.{key}: {got[key]!r}"
            else:
                check_shape(value, got[key], f"{where}.{key}")
        if isinstance(example.get("status"), str):
            assert got["status"] == example["status"], f"{where}.status: {example['status']!r} expected"
    elif isinstance(example, list) and example:
        assert got, f"{where}: empty list, the guide shows {example!r}"
        check_shape(example[0], got[0], f"{where}[0]")


def check_echo(got: dict[str, Any], sent: dict[str, Any], where: str, *, present_only: bool = False) -> None:
    """Every field that was sent comes back with the same value (``present_only``: when it is shown)."""
    for key, value in sent.items():
        if key not in got:
            assert present_only, f"{where}: sent {key}={value!r}, not in the answer {got!r}"
            continue
        assert got[key] == value, f"{where}.{key}: sent {value!r}, got {got[key]!r}"


def check_user(got: Any, user: str, where: str) -> None:
    if isinstance(got, dict):
        for key, value in got.items():
            if key == "user_id":
                assert value == user, f"{where}.user_id: {user!r} expected, got {value!r}"
            check_user(value, user, f"{where}.{key}")
    elif isinstance(got, list):
        for i, item in enumerate(got):
            check_user(item, user, f"{where}[{i}]")


class UserMap(dict[str, str]):
    """The guide's user ids -> ids unique to this map (one map per test), same structure."""

    def __init__(self) -> None:
        super().__init__()
        self.token = uuid.uuid4().hex[:12]

    def __missing__(self, name: str) -> str:
        self[name] = f"{name}-{self.token}"
        return self[name]


@dataclass
class Runner:
    """Sends requests, checks them against the guide and against what was sent before."""

    client: TestClient
    guide: Guide
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)  # what was sent: create, then PUTs
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    memories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    async def call(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        body: dict[str, Any] | None,
        *,
        user: str | None,
        headers: dict[str, str] | None = None,
        example: Any = None,
    ) -> Any:
        kind = route_kind(method, path)
        where = f"{method} {path}?{query}"
        data = None if body is None else json.dumps(body)
        if body is not None and headers is None:
            headers = {"Content-Type": "application/json"}
        resp = await self.client.request(method, path, params=query, data=data, headers=headers)
        got = await resp.json()
        assert resp.status == 200, f"{where}: {resp.status} {got!r}"
        self.log.append(kind)
        example = example if example is not None else self.guide.shapes.get(kind)
        check_shape(example, got, where)
        if kind == "delete" and example is not None:
            assert got == example, f"{where}: {example!r} expected exactly, got {got!r}"
        if user is not None:
            check_user(got, user, where)
        self.check_state(kind, path, body, got, where)
        return got

    def check_state(self, kind: str, path: str, body: dict[str, Any] | None, got: Any, where: str) -> None:
        m = re.match(S + r"/([^/]+)", path)
        sid = m[1] if m else ""
        if body is not None:
            check_echo(got, body, where)
        if kind == "create":
            sid = got["session_id"]
            self.sessions[sid] = dict(body or {})
            self.messages[sid], self.memories[sid] = [], []
        elif kind == "update":
            self.sessions[sid].update(body or {})
        elif kind == "message_post":
            self.messages[sid].append(body or {})
        elif kind == "memory_post":
            self.memories[sid].append(body or {})
        if kind in SESSION_OBJECTS | {"summary"}:
            check_echo(got, self.sessions[sid], where, present_only=kind == "summary")
        elif kind == "message_get":
            sent = self.messages[sid]
            assert len(got["messages"]) == len(sent), f"{where}: {len(sent)} messages sent, got {got!r}"
            for i, (item, body_sent) in enumerate(zip(got["messages"], sent, strict=True)):
                check_echo(item, body_sent, f"{where}.messages[{i}]")
        elif kind == "memory_get":
            check_echo(got, self.memories[sid][-1], where)
        elif kind == "list":
            for i, item in enumerate(got["sessions"]):
                assert item["session_id"] in self.sessions, f"{where}: unknown session {item!r}"
                check_echo(
                    item, self.sessions[item["session_id"]], f"{where}.sessions[{i}]", present_only=True
                )


def resolve(
    call: Curl, users: UserMap, sid: str | None, owner: str | None
) -> tuple[str, list[tuple[str, str]], dict[str, Any] | None, str | None]:
    """The example's path, query and body with real ids; and the user it acts for."""
    user = None
    segments = call.path.split("/")
    for i, segment in enumerate(segments):
        placeholder = PLACEHOLDER.fullmatch(segment)
        if placeholder:
            name = placeholder[1].lower()
            assert name in ("session_id", "user_id"), f"unknown placeholder {segment} in {call.source}"
            value = sid if name == "session_id" else owner
            assert value is not None, f"{segment}: no session created before {call.source}"
            segments[i] = value
            user = owner if name == "user_id" else user
        elif i > 0 and segments[i - 1] == "users":
            segments[i] = user = users[segment]
    query = [(k, users[v] if k == "user_id" else v) for k, v in call.query]
    user = next((v for k, v in query if k == "user_id"), user)
    body = None if call.body is None else dict(call.body)
    if body is not None and "user_id" in body:
        body["user_id"] = user = users[body["user_id"]]
    return "/".join(segments), query, body, user


# Tests ---------------------------------------------------------------------------------------------------


def test_guide_parses_into_enough_examples() -> None:
    guide = load_guide()
    kinds = [call.kind for call in guide.curls]
    assert len(guide.curls) >= MIN_CURL_EXAMPLES, f"only {len(guide.curls)} curl examples parsed"
    assert sum(call.response is not None for call in guide.curls) >= MIN_RESPONSE_EXAMPLES
    assert set(RUN_ORDER) - {"other"} <= set(kinds), f"a route has no example: {kinds}"
    assert "other" not in kinds, f"an example calls a route this test does not know: {kinds}"
    assert {400, 404} <= set(guide.errors), guide.errors


async def test_guide_curl_examples(client: TestClient, live_worker: object) -> None:
    guide = load_guide()
    users = UserMap()
    runner = Runner(client, guide)
    created: dict[int, tuple[str, str]] = {}  # create example's group -> (session id, owner)
    for call in sorted(guide.curls, key=lambda c: (RUN_ORDER.index(c.kind), c.index)):
        sid, owner = created.get(call.group, (None, None))
        path, query, body, user = resolve(call, users, sid, owner)
        got = await runner.call(
            call.method, path, query, body, user=user, headers=call.headers, example=call.response
        )
        if call.kind == "create":
            assert user is not None, call.source
            created[call.group] = (got["session_id"], user)
    assert len(runner.log) == len(guide.curls) >= MIN_CURL_EXAMPLES


async def test_guide_error_examples(client: TestClient) -> None:
    """The error section's 404 for every session-scoped example, and its 400 for a memory without a type."""
    guide = load_guide()
    users = UserMap()
    runner = Runner(client, guide)
    create = next(call for call in guide.curls if call.kind == "create")
    path, query, body, owner = resolve(create, users, None, None)
    assert owner is not None
    sid = (await runner.call("POST", path, query, body, user=owner, headers=create.headers))["session_id"]

    scoped = [call for call in guide.curls if "{session_id}" in call.path.lower()]
    assert len(scoped) >= 8, [call.path for call in scoped]
    for call in scoped:
        path, query, body, _ = resolve(call, users, str(uuid.uuid4()), owner)
        resp = await client.request(call.method, path, params=query, json=body)
        got = await resp.json()
        assert (resp.status, got) == (404, guide.errors[404]), f"{call.method} {path}"

    memory = next(call for call in guide.curls if call.kind == "memory_post")
    path, query, body, _ = resolve(memory, users, sid, owner)
    assert body is not None and "memory_type" in body
    del body["memory_type"]
    resp = await client.request(memory.method, path, params=query, json=body)
    got = await resp.json()
    assert (resp.status, got) == (400, guide.errors[400]), f"{memory.method} {path}"


async def test_guide_python_client(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guide's SessionClient and its main(), as written, over an httpx stand-in on the test client."""
    guide = load_guide()
    users = UserMap()
    runner = Runner(client, guide)

    class Response:
        def __init__(self, status_code: int, body: Any) -> None:
            self.status_code, self._body = status_code, body

        def json(self) -> Any:
            return self._body

        def raise_for_status(self) -> None:
            assert self.status_code == 200, self.status_code

    class AsyncClient:
        async def __aenter__(self) -> AsyncClient:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def request(self, method: str, url: str, **kwargs: Any) -> Response:
            assert set(kwargs) <= {"params", "json"}, kwargs
            params = [(k, users[v] if k == "user_id" else v) for k, v in (kwargs.get("params") or {}).items()]
            body = kwargs.get("json")
            user = next((v for k, v in params if k == "user_id"), None)
            if body is not None and "user_id" in body:
                body = {**body, "user_id": users[body["user_id"]]}
                user = body["user_id"]
            got = await runner.call(method, urlsplit(url).path, params, body, user=user)
            return Response(200, got)

        async def get(self, url: str, **kwargs: Any) -> Response:
            return await self.request("GET", url, **kwargs)

        async def post(self, url: str, **kwargs: Any) -> Response:
            return await self.request("POST", url, **kwargs)

        async def put(self, url: str, **kwargs: Any) -> Response:
            return await self.request("PUT", url, **kwargs)

        async def delete(self, url: str, **kwargs: Any) -> Response:
            return await self.request("DELETE", url, **kwargs)

    stub = types.ModuleType("httpx")
    stub.AsyncClient = AsyncClient  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "httpx", stub)
    namespace: dict[str, Any] = {"__name__": "guide_session_client"}
    exec(compile(guide.python_client, f"{GUIDE}:SessionClient", "exec"), namespace)

    calls = re.findall(r"await client\.(\w+)\(", guide.python_client.partition("async def main")[2])
    expected = {"create_session", "add_message", "create_memory", "get_messages", "end_session"}
    assert expected <= set(calls), calls
    await namespace["main"]()  # reads session["session_id"]; every request asserts its 200 and echoes
    assert len(runner.log) == len(calls), (runner.log, calls)
    assert runner.log[0] == "create" and runner.log[-1] == "delete", runner.log
