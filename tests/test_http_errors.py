"""Errors raised by aiohttp rather than by a handler: they leave as JSON ``{"detail": ...}`` too, with
the headers HTTP requires."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.helpers import SESSIONS, error_json, session_url


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", session_url(str(uuid.uuid4())), {"GET", "PUT", "DELETE"}),
        ("GET", SESSIONS, {"POST"}),
        ("POST", session_url(str(uuid.uuid4()), "/summary"), {"GET"}),
        ("DELETE", session_url(str(uuid.uuid4()), "/messages"), {"GET", "POST"}),
        ("PUT", "/api/v1/users/someone/sessions", {"GET"}),
    ],
)
async def test_405_says_which_methods_are_allowed(
    client: Any, method: str, path: str, allowed: set[str]
) -> None:
    resp = await client.request(method, path, params={"user_id": "u"})
    assert await error_json(resp, 405) == {"detail": "Method Not Allowed"}
    assert {m.strip() for m in resp.headers["Allow"].split(",")} == allowed
