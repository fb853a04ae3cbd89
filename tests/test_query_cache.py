"""Query strings are parsed once and remembered (``validation.parse_query``): a remembered answer must be
the answer a fresh parse would give, for every way of writing a query."""

from __future__ import annotations

from typing import Any

from tests.helpers import make_session, session_url


async def test_an_escaped_ampersand_and_a_real_one_stay_different_users(client: Any) -> None:
    # One escaped character apart: the first is user "cache&user", the second user "cache" (and a
    # parameter "user"). A cache keyed on anything that does not tell them apart would mix them up.
    owner = "cache&user"
    sid = (await make_session(client, owner))["session_id"]
    for _ in range(2):  # the second round is answered from the cache
        resp = await client.get(session_url(sid) + "?user_id=cache%26user")
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["user_id"] == owner
        resp = await client.get(session_url(sid) + "?user_id=cache&user")
        assert resp.status == 404  # user "cache" does not own it


async def test_a_remembered_query_still_goes_with_its_own_route(client: Any) -> None:
    owner = "cache-route-user"
    sid = (await make_session(client, owner))["session_id"]
    query = f"?user_id={owner}&page=1&page_size=0"
    for _ in range(2):
        assert (await client.get(session_url(sid) + query)).status == 200  # page_size means nothing here
        resp = await client.get(session_url(sid, "/messages") + query)
        assert resp.status == 400  # but a page of 0 messages is refused, remembered or not
