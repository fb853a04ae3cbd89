"""Request helpers shared by the test modules: small wrappers that assert the call succeeded."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from session_svc.http import server

Client = TestClient[web.Request, web.Application]

SESSIONS = "/api/v1/sessions"
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")

SESSION_FIELDS = {
    "session_id",
    "user_id",
    "title",
    "status",
    "conversation_data",
    "metadata",
    "is_active",
    "message_count",
    "total_tokens",
    "total_cost",
    "session_summary",
    "created_at",
    "updated_at",
    "last_activity",
}
MESSAGE_FIELDS = {
    "message_id",
    "session_id",
    "user_id",
    "sequence",
    "role",
    "content",
    "message_type",
    "metadata",
    "tokens_used",
    "cost_usd",
    "created_at",
}
MEMORY_FIELDS = {"memory_id", "session_id", "user_id", "memory_type", "content", "metadata", "created_at"}


def new_user() -> str:
    return "user-" + uuid.uuid4().hex


def session_url(sid: str, suffix: str = "") -> str:
    return f"{SESSIONS}/{sid}{suffix}"


def parse_iso_z(value: str) -> datetime:
    """Asserts ISO 8601 UTC with a trailing Z and returns the aware datetime."""
    assert ISO_Z.match(value), value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None and parsed.utcoffset() == UTC.utcoffset(parsed)
    return parsed


async def ok_json(resp: Any) -> Any:
    """The JSON body of a response that must be 200."""
    body = await resp.json()
    assert resp.status == 200, (resp.status, body)
    return body


async def ok_object(resp: Any) -> dict[str, Any]:
    """``ok_json`` of an answer that is a JSON object (all of the API's are)."""
    body = await ok_json(resp)
    assert isinstance(body, dict), body
    return body


async def make_session(client: Client, user_id: str, **fields: Any) -> dict[str, Any]:
    return await ok_object(await client.post(SESSIONS, json={"user_id": user_id, **fields}))


async def get_session(client: Client, sid: str, user_id: str) -> dict[str, Any]:
    return await ok_object(await client.get(session_url(sid), params={"user_id": user_id}))


async def update_session(client: Client, sid: str, user_id: str, **fields: Any) -> dict[str, Any]:
    resp = await client.put(session_url(sid), params={"user_id": user_id}, json=fields)
    return await ok_object(resp)


async def end_session(client: Client, sid: str, user_id: str) -> dict[str, Any]:
    return await ok_object(await client.delete(session_url(sid), params={"user_id": user_id}))


async def add_message(client: Client, sid: str, user_id: str, **fields: Any) -> dict[str, Any]:
    body = {"role": "user", "content": "hello", **fields}
    resp = await client.post(session_url(sid, "/messages"), params={"user_id": user_id}, json=body)
    return await ok_object(resp)


async def list_messages(client: Client, sid: str, user_id: str, **params: Any) -> dict[str, Any]:
    resp = await client.get(session_url(sid, "/messages"), params={"user_id": user_id, **params})
    return await ok_object(resp)


async def add_memory(client: Client, sid: str, user_id: str, **fields: Any) -> dict[str, Any]:
    body = {"memory_type": "preference", "content": "likes tea", **fields}
    resp = await client.post(session_url(sid, "/memory"), params={"user_id": user_id}, json=body)
    return await ok_object(resp)


async def list_sessions(client: Client, user_id: str, **params: Any) -> dict[str, Any]:
    resp = await client.get(f"/api/v1/users/{user_id}/sessions", params=params)
    return await ok_object(resp)


async def stats(client: Client) -> dict[str, Any]:
    return await ok_object(await client.get(f"{SESSIONS}/stats"))


async def error_json(resp: Any, status: int) -> Any:
    """The JSON error body of a response that must have ``status``; asserts the ``detail`` shape."""
    assert resp.content_type == "application/json", (resp.status, await resp.text())
    body = await resp.json()
    assert resp.status == status, (resp.status, body)
    assert set(body) == {"detail"}, body
    return body


async def validation_locs(resp: Any) -> list[list[str | int]]:
    """Asserts a 400 in the guide's list shape and returns the ``loc`` of each problem."""
    body = await error_json(resp, 400)
    detail = body["detail"]
    assert isinstance(detail, list) and detail, body
    for item in detail:
        assert set(item) == {"type", "loc", "msg"}, item
        assert isinstance(item["type"], str) and item["type"]
        assert isinstance(item["msg"], str) and item["msg"]
        assert isinstance(item["loc"], list) and item["loc"][0] in ("body", "query", "path"), item
    return [item["loc"] for item in detail]


# Raw HTTP over a real socket, for what aiohttp's client would not send (or would fix) ------------------

Address = tuple[str, int]


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[Address]:
    """``app`` served as in production (``server.AppRunner``: no handler cancellation, the connection
    bounds of its settings) on a free loopback port."""
    runner = server.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield host, port
    finally:
        await runner.cleanup()


Response = tuple[int, dict[str, str], bytes]


def parse_response(raw: bytes) -> Response:
    """Status, headers (lower-case names) and body of one raw HTTP response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


async def exchange(address: Address, *parts: bytes, within: float = 5.0) -> Response:
    """Send raw bytes (pausing between parts), read until the server closes: status, headers, body."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)
        raw = await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()
    return parse_response(raw)


async def read_response(reader: asyncio.StreamReader) -> Response:
    """One response from a kept-alive connection (its body by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, headers, _ = parse_response(head)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body
