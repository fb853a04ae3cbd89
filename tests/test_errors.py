"""Errors: 404 (unknown, malformed and other users' sessions), 400 in the guide's list shape, 413.

Every failed request must leave the session, the user's listing and the stats exactly as they were.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from yarl import URL

from session_svc.record.keys import bucket_of
from tests.helpers import (
    SESSIONS,
    add_memory,
    add_message,
    error_json,
    get_session,
    list_sessions,
    make_session,
    new_user,
    ok_json,
    session_url,
    stats,
    validation_locs,
)

NOT_FOUND = {"detail": "Session not found"}

# (method, suffix, json body) of every session-scoped route; bodies are valid so only the id can fail.
SESSION_ROUTES = [
    ("GET", "", None),
    ("PUT", "", {"title": "stolen", "status": "ended"}),
    ("DELETE", "", None),
    ("GET", "/summary", None),
    ("POST", "/messages", {"role": "user", "content": "intruder", "tokens_used": 9, "cost_usd": 1}),
    ("GET", "/messages", None),
    ("POST", "/memory", {"memory_type": "entity", "content": "intruder"}),
    ("GET", "/memory", None),
    ("GET", "/memories", None),
]
ROUTE_IDS = [f"{m} {s or '/'}" for m, s, _ in SESSION_ROUTES]


async def snapshot(client: Any, sid: str, user: str) -> dict[str, Any]:
    """Everything a user could notice about one session and the service."""
    params = {"user_id": user}
    return {
        "session": await get_session(client, sid, user),
        "messages": await ok_json(await client.get(session_url(sid, "/messages"), params=params)),
        "memories": await ok_json(await client.get(session_url(sid, "/memories"), params=params)),
        "listing": await list_sessions(client, user),
        "stats": await stats(client),
    }


async def seeded_session(client: Any, user: str) -> str:
    sid = (await make_session(client, user, title="orig", metadata={"k": "v"}))["session_id"]
    await add_message(client, sid, user, tokens_used=2, cost_usd=0.01)
    await add_memory(client, sid, user, memory_type="preference", content="tea")
    return sid


# 404 -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "suffix", "body"), SESSION_ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    "sid",
    [str(uuid.uuid4()), "not-a-uuid", "12345", str(uuid.uuid4()).upper(), "stats-x"],
    ids=["unknown-uuid", "word", "number", "upper-case-uuid", "stats-like"],
)
async def test_unknown_or_malformed_session_id_is_404(
    client: Any, method: str, suffix: str, body: Any, sid: str
) -> None:
    user = new_user()
    resp = await client.request(method, session_url(sid, suffix), params={"user_id": user}, json=body)
    assert await error_json(resp, 404) == NOT_FOUND
    assert (await stats(client))["total_sessions"] == 0
    assert (await list_sessions(client, user))["total"] == 0


def other_user(owner: str, same_bucket: bool, buckets: int = 16) -> str:
    """A user whose keys fall in the owner's bucket (or not): both ownership paths get exercised."""
    while True:
        candidate = new_user()
        if (bucket_of(candidate, buckets) == bucket_of(owner, buckets)) == same_bucket:
            return candidate


@pytest.mark.parametrize("same_bucket", [True, False], ids=["same-bucket", "other-bucket"])
async def test_another_users_session_is_404_and_stays_untouched(
    client: Any, settings: Any, same_bucket: bool
) -> None:
    owner = new_user()
    intruder = other_user(owner, same_bucket, settings.redis_buckets)
    sid = await seeded_session(client, owner)
    before = await snapshot(client, sid, owner)

    for method, suffix, body in SESSION_ROUTES:
        resp = await client.request(method, session_url(sid, suffix), params={"user_id": intruder}, json=body)
        assert await error_json(resp, 404) == NOT_FOUND, (method, suffix)

    assert await snapshot(client, sid, owner) == before
    assert (await list_sessions(client, intruder))["total"] == 0


async def test_unknown_routes_and_methods_answer_json(client: Any) -> None:
    assert await error_json(await client.get("/api/v1/nothing-here"), 404) == {"detail": "Not Found"}
    sid = str(uuid.uuid4())
    resp = await client.patch(session_url(sid), params={"user_id": "u"}, json={})
    assert await error_json(resp, 405) == {"detail": "Method Not Allowed"}


# 400 -------------------------------------------------------------------------------------------------

_ABSENT = object()


@dataclass(frozen=True)
class Bad:
    """One invalid request. ``path`` is ``create``, ``listing`` or a session suffix ('' = the session)."""

    method: str
    path: str
    locs: list[list[str]]
    json: Any = _ABSENT
    raw: bytes | None = None
    query: dict[str, str] = field(default_factory=dict)
    owner_query: bool = True  # add ?user_id=<owner>
    types: tuple[str, ...] = ()  # expected error ``type`` values, when they matter


MSG = {"role": "user", "content": "hi"}
BIG_METADATA = {"blob": "x" * (17 * 1024)}

BAD_REQUESTS: dict[str, Bad] = {
    # missing user_id on every session-scoped route
    "get-no-user": Bad("GET", "", [["query", "user_id"]], owner_query=False, types=("missing",)),
    "put-no-user": Bad("PUT", "", [["query", "user_id"]], json={"title": "x"}, owner_query=False),
    "delete-no-user": Bad("DELETE", "", [["query", "user_id"]], owner_query=False),
    "summary-no-user": Bad("GET", "/summary", [["query", "user_id"]], owner_query=False),
    "append-no-user": Bad("POST", "/messages", [["query", "user_id"]], json=MSG, owner_query=False),
    "messages-no-user": Bad("GET", "/messages", [["query", "user_id"]], owner_query=False),
    "memory-post-no-user": Bad(
        "POST",
        "/memory",
        [["query", "user_id"]],
        json={"memory_type": "custom", "content": "x"},
        owner_query=False,
    ),
    "memory-get-no-user": Bad("GET", "/memory", [["query", "user_id"]], owner_query=False),
    "memories-no-user": Bad("GET", "/memories", [["query", "user_id"]], owner_query=False),
    "user-id-control-char": Bad(
        "GET", "", [["query", "user_id"]], query={"user_id": "a\x01b"}, owner_query=False
    ),
    "empty-user-id": Bad("GET", "", [["query", "user_id"]], query={"user_id": ""}, owner_query=False),
    # bodies that are not a JSON object
    "malformed-json": Bad(
        "POST", "/messages", [["body"]], raw=b'{"role": "user", "content": ', types=("json_invalid",)
    ),
    "json-array": Bad("POST", "/messages", [["body"]], raw=b'[{"role": "user", "content": "hi"}]'),
    "empty-body": Bad("POST", "/messages", [["body"]], raw=b""),
    "json-string": Bad("PUT", "", [["body"]], raw=b'"status"'),
    "put-json-array": Bad("PUT", "", [["body"]], raw=b"[]"),
    "create-malformed": Bad("POST", "create", [["body"]], raw=b"{user_id: 1}"),
    # messages: wrong types, enums, blanks, ranges, money precision
    "tokens-as-string": Bad("POST", "/messages", [["body", "tokens_used"]], json={**MSG, "tokens_used": "5"}),
    "tokens-as-float": Bad("POST", "/messages", [["body", "tokens_used"]], json={**MSG, "tokens_used": 5.5}),
    "tokens-as-bool": Bad("POST", "/messages", [["body", "tokens_used"]], json={**MSG, "tokens_used": True}),
    "content-as-number": Bad("POST", "/messages", [["body", "content"]], json={**MSG, "content": 5}),
    "unknown-role": Bad(
        "POST", "/messages", [["body", "role"]], json={**MSG, "role": "robot"}, types=("enum",)
    ),
    "unknown-message-type": Bad(
        "POST", "/messages", [["body", "message_type"]], json={**MSG, "message_type": "email"}
    ),
    "blank-content": Bad("POST", "/messages", [["body", "content"]], json={**MSG, "content": "  \n\t "}),
    "empty-content": Bad("POST", "/messages", [["body", "content"]], json={**MSG, "content": ""}),
    "negative-tokens": Bad("POST", "/messages", [["body", "tokens_used"]], json={**MSG, "tokens_used": -1}),
    "negative-cost": Bad("POST", "/messages", [["body", "cost_usd"]], json={**MSG, "cost_usd": -0.01}),
    "cost-7-decimals": Bad("POST", "/messages", [["body", "cost_usd"]], json={**MSG, "cost_usd": 0.1234567}),
    "cost-as-string": Bad("POST", "/messages", [["body", "cost_usd"]], json={**MSG, "cost_usd": "0.1"}),
    "message-metadata-list": Bad("POST", "/messages", [["body", "metadata"]], json={**MSG, "metadata": [1]}),
    "message-metadata-oversized": Bad(
        "POST", "/messages", [["body", "metadata"]], json={**MSG, "metadata": BIG_METADATA}
    ),
    "missing-role-and-content": Bad(
        "POST",
        "/messages",
        [["body", "role"], ["body", "content"]],
        json={"tokens_used": 1},
        types=("missing", "missing"),
    ),
    "two-bad-fields": Bad(
        "POST",
        "/messages",
        [["body", "role"], ["body", "tokens_used"]],
        json={**MSG, "role": "x", "tokens_used": -5},
    ),
    "content-over-cap": Bad(
        "POST", "/messages", [["body", "content"]], json={**MSG, "content": "c" * (256 * 1024 + 1)}
    ),
    "memory-content-over-cap": Bad(
        "POST",
        "/memory",
        [["body", "content"]],
        json={"memory_type": "entity", "content": "c" * (64 * 1024 + 1)},
    ),
    "put-summary-over-cap": Bad(
        "PUT", "", [["body", "session_summary"]], json={"session_summary": "s" * (64 * 1024 + 1)}
    ),
    # message paging
    "messages-page-0": Bad("GET", "/messages", [["query", "page"]], query={"page": "0"}),
    "messages-page-abc": Bad(
        "GET", "/messages", [["query", "page"]], query={"page": "abc"}, types=("int_parsing",)
    ),
    "messages-page-size-201": Bad("GET", "/messages", [["query", "page_size"]], query={"page_size": "201"}),
    "messages-page-size-0": Bad("GET", "/messages", [["query", "page_size"]], query={"page_size": "0"}),
    # memories
    "memory-missing-type": Bad(
        "POST", "/memory", [["body", "memory_type"]], json={"content": "x"}, types=("missing",)
    ),
    "memory-unknown-type": Bad(
        "POST", "/memory", [["body", "memory_type"]], json={"memory_type": "mood", "content": "x"}
    ),
    "memory-blank-content": Bad(
        "POST", "/memory", [["body", "content"]], json={"memory_type": "entity", "content": " "}
    ),
    "memory-metadata-string": Bad(
        "POST",
        "/memory",
        [["body", "metadata"]],
        json={"memory_type": "entity", "content": "x", "metadata": "x"},
    ),
    "memory-query-unknown-type": Bad(
        "GET", "/memory", [["query", "memory_type"]], query={"memory_type": "mood"}
    ),
    "memories-page-0": Bad("GET", "/memories", [["query", "page"]], query={"page": "0"}),
    "memories-unknown-type": Bad("GET", "/memories", [["query", "memory_type"]], query={"memory_type": "x"}),
    # session updates
    "put-unknown-status": Bad("PUT", "", [["body", "status"]], json={"status": "deleted"}),
    "put-title-over-cap": Bad("PUT", "", [["body", "title"]], json={"title": "t" * 501}),
    "put-title-wrong-type": Bad("PUT", "", [["body", "title"]], json={"title": 7}),
    "put-metadata-list": Bad("PUT", "", [["body", "metadata"]], json={"metadata": ["a"]}),
    "put-conversation-data-string": Bad(
        "PUT", "", [["body", "conversation_data"]], json={"conversation_data": "x"}
    ),
    "put-metadata-oversized": Bad("PUT", "", [["body", "metadata"]], json={"metadata": BIG_METADATA}),
    "put-good-and-bad": Bad("PUT", "", [["body", "status"]], json={"title": "new", "status": "gone"}),
    # session creation
    "create-no-user": Bad("POST", "create", [["body", "user_id"]], json={"title": "x"}, types=("missing",)),
    "create-user-id-number": Bad("POST", "create", [["body", "user_id"]], json={"user_id": 5}),
    "create-user-id-too-long": Bad("POST", "create", [["body", "user_id"]], json={"user_id": "u" * 256}),
    "create-title-over-cap": Bad(
        "POST", "create", [["body", "title"]], json={"user_id": "OWNER", "title": "t" * 501}
    ),
    "create-metadata-list": Bad(
        "POST", "create", [["body", "metadata"]], json={"user_id": "OWNER", "metadata": []}
    ),
    "create-metadata-oversized": Bad(
        "POST", "create", [["body", "metadata"]], json={"user_id": "OWNER", "metadata": BIG_METADATA}
    ),
    "create-conversation-data-number": Bad(
        "POST", "create", [["body", "conversation_data"]], json={"user_id": "OWNER", "conversation_data": 1}
    ),
    "create-json-array": Bad("POST", "create", [["body"]], json=[{"user_id": "OWNER"}]),
    # user listing
    "listing-page-0": Bad("GET", "listing", [["query", "page"]], query={"page": "0"}, owner_query=False),
    "listing-page-abc": Bad("GET", "listing", [["query", "page"]], query={"page": "abc"}, owner_query=False),
    "listing-page-size-101": Bad(
        "GET", "listing", [["query", "page_size"]], query={"page_size": "101"}, owner_query=False
    ),
    "listing-active-only-maybe": Bad(
        "GET", "listing", [["query", "active_only"]], query={"active_only": "maybe"}, owner_query=False
    ),
}


def _fill(value: Any, owner: str) -> Any:
    if value == "OWNER":
        return owner
    if isinstance(value, dict):
        return {k: _fill(v, owner) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, owner) for v in value]
    return value


async def send(client: Any, bad: Bad, sid: str, owner: str) -> Any:
    if bad.path == "create":
        url = SESSIONS
    elif bad.path == "listing":
        url = f"/api/v1/users/{owner}/sessions"
    else:
        url = session_url(sid, bad.path)
    params = {"user_id": owner} if bad.owner_query else {}
    params.update(bad.query)
    kwargs: dict[str, Any] = {"params": params}
    if bad.raw is not None:
        kwargs["data"] = bad.raw
        kwargs["headers"] = {"Content-Type": "application/json"}
    elif bad.json is not _ABSENT:
        kwargs["json"] = _fill(bad.json, owner)
    return await client.request(bad.method, url, **kwargs)


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_input_is_400_naming_each_field_and_changes_nothing(client: Any, case: str) -> None:
    bad = BAD_REQUESTS[case]
    owner = new_user()
    sid = await seeded_session(client, owner)
    before = await snapshot(client, sid, owner)

    resp = await send(client, bad, sid, owner)
    locs = await validation_locs(resp)
    # Each problem names its field; a union-typed field (cost_usd) may add the member it tried.
    assert {tuple(loc[:2]) for loc in locs} == {tuple(loc) for loc in bad.locs}
    assert all(len(loc) <= len(bad.locs[0]) + 1 for loc in locs), locs
    if bad.types:
        body = await resp.json()
        assert sorted(item["type"] for item in body["detail"]) == sorted(bad.types)

    assert await snapshot(client, sid, owner) == before


async def test_missing_memory_type_matches_the_guides_example(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    resp = await client.post(session_url(sid, "/memory"), params={"user_id": user}, json={"content": "x"})
    assert await error_json(resp, 400) == {
        "detail": [{"type": "missing", "loc": ["body", "memory_type"], "msg": "Field required"}]
    }


@pytest.mark.parametrize(
    "where",
    ["create-metadata", "create-conversation-data", "message-metadata", "memory-metadata", "put-metadata"],
)
async def test_json_numbers_outside_64_bits_are_400_not_500(client: Any, where: str) -> None:
    """Valid JSON whose integers do not fit 64 bits cannot be stored; it must be refused as a 400."""
    owner = new_user()
    sid = await seeded_session(client, owner)
    before = await snapshot(client, sid, owner)
    huge = {"n": 123456789012345678901234567890}
    user = {"user_id": owner}
    request = {
        "create-metadata": ("POST", SESSIONS, {}, {**user, "metadata": huge}, "metadata"),
        "create-conversation-data": (
            "POST",
            SESSIONS,
            {},
            {**user, "conversation_data": huge},
            "conversation_data",
        ),
        "message-metadata": (
            "POST",
            session_url(sid, "/messages"),
            user,
            {**MSG, "metadata": huge},
            "metadata",
        ),
        "memory-metadata": (
            "POST",
            session_url(sid, "/memory"),
            user,
            {"memory_type": "entity", "content": "x", "metadata": huge},
            "metadata",
        ),
        "put-metadata": ("PUT", session_url(sid), user, {"metadata": huge}, "metadata"),
    }[where]
    method, url, params, body, name = request
    resp = await client.request(method, url, params=params, json=body)
    assert await validation_locs(resp) == [["body", name]]
    assert await snapshot(client, sid, owner) == before


async def test_nan_is_not_json(client: Any) -> None:
    """``NaN`` is not JSON (RFC 8259): a malformed body is a 400, not silently stored as null."""
    user = new_user()
    raw = b'{"user_id": "%s", "metadata": {"score": NaN}}' % user.encode()
    resp = await client.post(SESSIONS, data=raw, headers={"Content-Type": "application/json"})
    (problem,) = (await error_json(resp, 400))["detail"]
    assert (problem["type"], problem["loc"]) == ("json_invalid", ["body"]), problem
    assert problem["msg"].startswith("Invalid JSON: "), problem
    assert (await list_sessions(client, user))["total"] == 0


# 413 -------------------------------------------------------------------------------------------------

TOO_LARGE_2048 = {"detail": "Request body too large (limit 2048 bytes)"}


async def test_body_over_the_configured_limit_is_413(make_client: Any) -> None:
    client = await make_client(max_body_bytes=2048)
    owner = new_user()
    sid = await seeded_session(client, owner)
    # A body under the limit still passes.
    ok = await add_message(client, sid, owner, content="a" * 1500)
    assert ok["sequence"] == 2
    before = await snapshot(client, sid, owner)

    big = "b" * 3000
    attempts = [
        ("POST", session_url(sid, "/messages"), {"role": "user", "content": big}),
        ("POST", session_url(sid, "/memory"), {"memory_type": "entity", "content": big}),
        ("PUT", session_url(sid), {"title": "x", "metadata": {"blob": big}}),
        ("POST", SESSIONS, {"user_id": owner, "metadata": {"blob": big}}),
    ]
    for method, url, body in attempts:
        resp = await client.request(method, url, params={"user_id": owner}, json=body)
        assert await error_json(resp, 413) == TOO_LARGE_2048, (method, url)

    # Without a Content-Length (chunked upload) the limit holds too.
    async def chunks() -> Any:
        for _ in range(4):
            yield b'{"role": "user", "content": "' + b"c" * 1000 + b'"}'[:1000]

    resp = await client.post(
        session_url(sid, "/messages"),
        params={"user_id": owner},
        data=chunks(),
        headers={"Content-Type": "application/json"},
    )
    assert await error_json(resp, 413) == TOO_LARGE_2048

    assert await snapshot(client, sid, owner) == before


async def test_a_declared_length_over_the_limit_is_413_at_once(make_client: Any) -> None:
    """A client announcing 100 MB and sending nothing gets its 413 straight away, not after a wait for a
    body that would be refused anyway."""
    client = await make_client(max_body_bytes=2048)
    owner = new_user()
    sid = await seeded_session(client, owner)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(
            f"POST {session_url(sid, '/messages')}?user_id={owner} HTTP/1.1\r\nHost: test\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n".encode()
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), timeout=3)
        assert status.split()[1] == b"413", status
    finally:
        writer.close()


async def test_default_limit_is_one_mebibyte(client: Any) -> None:
    owner = new_user()
    sid = await seeded_session(client, owner)
    before = await snapshot(client, sid, owner)
    resp = await client.post(
        session_url(sid, "/messages"),
        params={"user_id": owner},
        json={"role": "user", "content": "c" * (1 << 20)},
    )
    assert await error_json(resp, 413) == {"detail": "Request body too large (limit 1048576 bytes)"}
    assert await snapshot(client, sid, owner) == before


@pytest.mark.parametrize(
    "raw_user",
    ["a%01b", "%20%20", "u" * 256, "a%2Fb", "%2E%2E", "%7F"],
    ids=["control-char", "blank", "too-long", "slash", "dot-dot", "delete-char"],
)
async def test_bad_user_id_in_the_listing_path_is_named_as_a_path_parameter(
    client: Any, raw_user: str
) -> None:
    resp = await client.get(URL(f"/api/v1/users/{raw_user}/sessions", encoded=True))
    assert await validation_locs(resp) == [["path", "user_id"]]
