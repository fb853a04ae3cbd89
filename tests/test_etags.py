"""ETag on session reads and writes, If-Match on PUT/DELETE (412), If-None-Match on reads (304).

The ETag is the session's version ``v``: every write bumps it, a message too. Real Redis and Postgres.
"""

from __future__ import annotations

from typing import Any

import pytest

from session_svc.storage.resources import Backend
from tests import outbox_drain
from tests.helpers import add_message, error_json, get_session, make_session, new_user, session_url
from workers.expiry import sweep
from workers.flush import Flusher


async def etag_of(client: Any, sid: str, user: str, suffix: str = "") -> str:
    resp = await client.get(session_url(sid, suffix), params={"user_id": user})
    assert resp.status == 200
    tag: str = resp.headers["ETag"]
    return tag


async def test_reads_carry_the_version_as_a_strong_etag(client: Any) -> None:
    user = new_user()
    resp = await client.post("/api/v1/sessions", json={"user_id": user})
    sid = (await resp.json())["session_id"]
    assert resp.headers["ETag"] == '"1"'
    assert await etag_of(client, sid, user) == '"1"'
    await add_message(client, sid, user)
    assert await etag_of(client, sid, user) == '"2"'
    assert await etag_of(client, sid, user, "/summary") == '"2"'


async def test_if_match_guards_a_put_against_a_concurrent_change(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user, title="draft"))["session_id"]
    url, p = session_url(sid), {"user_id": user}
    tag = await etag_of(client, sid, user)
    ok = await client.put(url, params=p, json={"title": "mine"}, headers={"If-Match": tag})
    assert ok.status == 200 and ok.headers["ETag"] == '"2"'
    # Another editor still holds the old tag: 412, the current ETag, and nothing changed.
    late = await client.put(url, params=p, json={"title": "theirs"}, headers={"If-Match": tag})
    detail = (await error_json(late, 412))["detail"]
    assert "If-Match" in detail and '"2"' in detail
    assert late.headers["ETag"] == '"2"'
    session = await get_session(client, sid, user)
    assert session["title"] == "mine" and session["updated_at"] == (await ok.json())["updated_at"]
    # A new message changes the session too: a tag read before it no longer matches.
    await add_message(client, sid, user)
    stale = await client.put(url, params=p, json={"title": "x"}, headers={"If-Match": '"2"'})
    await error_json(stale, 412)
    # Lists, "*" and a weak tag (never matches: strong comparison).
    both = await client.put(url, params=p, json={"title": "y"}, headers={"If-Match": '"1", "3"'})
    assert both.status == 200
    weak = await client.put(url, params=p, json={"title": "z"}, headers={"If-Match": 'W/"4"'})
    await error_json(weak, 412)
    star = await client.put(url, params=p, json={"title": "z"}, headers={"If-Match": "*"})
    assert star.status == 200 and star.headers["ETag"] == '"5"'


async def test_if_match_on_delete(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    url, p = session_url(sid), {"user_id": user}
    await add_message(client, sid, user)
    old = await client.delete(url, params=p, headers={"If-Match": '"1"'})
    await error_json(old, 412)
    assert (await get_session(client, sid, user))["status"] == "active"
    ok = await client.delete(url, params=p, headers={"If-Match": '"2"'})
    assert ok.status == 200 and ok.headers["ETag"] == '"3"'


@pytest.mark.parametrize("bad", ["7", '"7', "W/7", '"a b"', "", '"1",,"1"'])
async def test_a_malformed_if_match_matches_nothing(client: Any, bad: str) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    resp = await client.put(
        session_url(sid), params={"user_id": user}, json={"title": "x"}, headers={"If-Match": bad}
    )
    assert "If-Match" in (await error_json(resp, 412))["detail"]
    assert resp.headers["ETag"] == '"1"'
    assert (await get_session(client, sid, user))["title"] == ""


async def test_if_match_on_a_missing_session_is_a_404(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    resp = await client.put(
        session_url(sid), params={"user_id": new_user()}, json={}, headers={"If-Match": "*"}
    )
    await error_json(resp, 404)


async def test_if_none_match_answers_304_until_the_session_changes(client: Any) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    tag = await etag_of(client, sid, user)
    for suffix in ("", "/summary"):
        same = await client.get(
            session_url(sid, suffix), params={"user_id": user}, headers={"If-None-Match": tag}
        )
        assert same.status == 304 and same.headers["ETag"] == tag and await same.read() == b""
        weak = await client.get(
            session_url(sid, suffix), params={"user_id": user}, headers={"If-None-Match": f"W/{tag}"}
        )
        assert weak.status == 304  # If-None-Match compares weakly
    await add_message(client, sid, user)
    changed = await client.get(session_url(sid), params={"user_id": user}, headers={"If-None-Match": tag})
    assert changed.status == 200 and changed.headers["ETag"] == '"2"'


async def test_a_cold_read_has_the_same_etag_as_the_hot_one(
    client: Any, backend: Backend, flusher: Flusher
) -> None:
    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await add_message(client, sid, user)
    await client.put(session_url(sid), params={"user_id": user}, json={"title": "t"})
    hot = await client.get(session_url(sid), params={"user_id": user})
    await outbox_drain.drain(flusher)
    assert await sweep(backend, 0) == 1
    cold = await client.get(session_url(sid), params={"user_id": user})
    assert cold.headers["ETag"] == hot.headers["ETag"] == '"3"'
    assert await cold.json() == await hot.json()
    # If-Match is checked against the version the session comes back with.
    stale = await client.put(session_url(sid), params={"user_id": user}, json={}, headers={"If-Match": '"2"'})
    await error_json(stale, 412)
    ok = await client.put(
        session_url(sid), params={"user_id": user}, json={"title": "u"}, headers={"If-Match": '"3"'}
    )
    assert ok.status == 200 and ok.headers["ETag"] == '"4"'
