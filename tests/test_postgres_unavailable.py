"""PostgreSQL unreachable: the API keeps serving hot sessions from Redis and health says degraded."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from session_svc import errors
from tests.helpers import add_message, error_json, get_session, list_messages, make_session, new_user, ok_json
from tests.servers import free_port
from workers import flush


@pytest.mark.fault
async def test_hot_sessions_are_served_while_postgres_is_down(make_client: Any) -> None:
    # Nothing listens on a fresh free port: every connection attempt is refused.
    client = await make_client(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    health = await ok_json(await client.get("/health/detailed"))
    assert (health["redis_connected"], health["database_connected"]) == (True, False)
    assert health["status"] == "degraded"

    user = new_user()
    sid = (await make_session(client, user))["session_id"]
    await add_message(client, sid, user, tokens_used=4)
    assert (await get_session(client, sid, user))["message_count"] == 1
    assert (await list_messages(client, sid, user))["total"] == 1

    # An id Redis does not know must be checked against Postgres, the system of record: without it the
    # service cannot claim "not found", so it answers 503 (JSON), not 404 and not 500.
    resp = await client.get(f"/api/v1/sessions/{uuid.uuid4()}", params={"user_id": user})
    assert await error_json(resp, 503) == {"detail": "Session store unavailable (PostgreSQL)"}


async def test_too_many_connections_is_503_as_in_the_worker(
    make_client: Any, pg: Any, test_urls: Any
) -> None:
    """Postgres that takes no more connections is unavailable (503), not a server error (500): the API
    and the worker share one definition of "PostgreSQL unavailable"."""
    assert flush.PG_UNAVAILABLE is errors.PG_UNAVAILABLE  # type: ignore[attr-defined]
    # A role whose CONNECTION LIMIT is 0: the real server answers every connection with SQLSTATE 53300.
    role = "t_full_" + uuid.uuid4().hex[:10]
    await pg.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
    try:
        url = urlsplit(test_urls.database_url)
        netloc = f"{role}@{url.hostname}" + (f":{url.port}" if url.port else "")
        client = await make_client(database_url=urlunsplit(url._replace(netloc=netloc)))
        user = new_user()
        # Unknown to Redis, so Postgres must be asked before the service can say "not found".
        resp = await client.get(f"/api/v1/sessions/{uuid.uuid4()}", params={"user_id": user})
        assert await error_json(resp, 503) == {"detail": "Session store unavailable (PostgreSQL)"}
        sid = (await make_session(client, user))["session_id"]  # hot sessions still work
        assert (await get_session(client, sid, user))["session_id"] == sid
    finally:
        await pg.execute(f'DROP ROLE IF EXISTS "{role}"')
