"""Health endpoints and the OpenAPI document (the docs page: tests/test_docs_ui.py)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.helpers import SESSIONS, add_message, make_session, new_user, ok_json, parse_iso_z


async def test_health_has_guide_fields(client: Any, settings: Any) -> None:
    body = await ok_json(await client.get("/health"))
    assert set(body) == {"status", "service", "port", "version", "timestamp"}
    assert body["status"] == "healthy"
    assert body["service"] == "session_service"
    assert body["port"] == settings.service_port == 8205
    assert body["version"] == "1.0.0"
    parse_iso_z(body["timestamp"])


async def test_health_detailed_reports_both_stores_and_the_outbox(client: Any, live_worker: Any) -> None:
    body = await ok_json(await client.get("/health/detailed"))
    assert {
        "service",
        "status",
        "port",
        "version",
        "redis_connected",
        "database_connected",
        "outbox_backlog",
        "timestamp",
    } <= set(body)
    assert body["service"] == "session_service"
    assert body["status"] == "operational"
    assert body["redis_connected"] is True
    assert body["database_connected"] is True
    assert body["outbox_backlog"] == 0  # fresh key prefix: nothing written yet
    parse_iso_z(body["timestamp"])

    user = new_user()
    s = await make_session(client, user)
    await add_message(client, s["session_id"], user)
    after = await ok_json(await client.get("/health/detailed"))
    # No worker drains this test's outbox, so the writes are still waiting for Postgres.
    assert isinstance(after["outbox_backlog"], int) and after["outbox_backlog"] >= 1


def _api_routes(app: web.Application) -> set[tuple[str, str]]:
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        # The document itself, its page, and /metrics (Prometheus' format, described in docs/operations.md).
        if route.method == "HEAD" or path in ("/openapi.json", "/metrics") or path.startswith("/docs"):
            continue
        routes.add((route.method.lower(), path))
    return routes


async def test_openapi_covers_every_registered_route(client: Any) -> None:
    doc = await ok_json(await client.get("/openapi.json"))
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["version"] == "1.0.0"
    registered = _api_routes(client.app)
    # The route list: the document must not silently lose one of them either.
    assert {
        ("get", "/health"),
        ("get", "/health/detailed"),
        ("post", SESSIONS),
        ("get", f"{SESSIONS}/{{session_id}}"),
        ("put", f"{SESSIONS}/{{session_id}}"),
        ("delete", f"{SESSIONS}/{{session_id}}"),
        ("get", "/api/v1/users/{user_id}/sessions"),
        ("get", f"{SESSIONS}/{{session_id}}/summary"),
        ("post", f"{SESSIONS}/{{session_id}}/messages"),
        ("get", f"{SESSIONS}/{{session_id}}/messages"),
        ("post", f"{SESSIONS}/{{session_id}}/memory"),
        ("get", f"{SESSIONS}/{{session_id}}/memory"),
        ("get", f"{SESSIONS}/{{session_id}}/memories"),
        ("get", f"{SESSIONS}/stats"),
    } <= registered
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert registered <= documented, registered - documented

    schemas = doc["components"]["schemas"]
    for method, path in registered:
        op = doc["paths"][path][method]
        assert "200" in op["responses"]
        if method in ("post", "put"):
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            body_schema = schemas[ref.rsplit("/", 1)[1]]
            assert body_schema["properties"], (method, path)


async def test_openapi_body_schemas_come_from_the_validating_models(client: Any) -> None:
    doc = await ok_json(await client.get("/openapi.json"))
    schemas = doc["components"]["schemas"]

    def body_of(path: str, method: str) -> dict[str, Any]:
        ref = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        return schemas[ref.rsplit("/", 1)[1]]

    def enum_of(schema: dict[str, Any], prop: str) -> set[str]:
        node = schema["properties"][prop]
        if "$ref" in node:
            node = schemas[node["$ref"].rsplit("/", 1)[1]]
        if "allOf" in node:
            node = schemas[node["allOf"][0]["$ref"].rsplit("/", 1)[1]]
        return set(node["enum"])

    message = body_of(f"{SESSIONS}/{{session_id}}/messages", "post")
    assert set(message["required"]) == {"role", "content"}
    assert enum_of(message, "role") == {"user", "assistant", "system", "tool_call", "tool_result"}
    assert enum_of(message, "message_type") == {"chat", "system", "tool_call", "tool_result", "notification"}
    memory = body_of(f"{SESSIONS}/{{session_id}}/memory", "post")
    assert set(memory["required"]) == {"memory_type", "content"}
    assert enum_of(memory, "memory_type") == {"preference", "conversation", "entity", "summary", "custom"}
    create = body_of(SESSIONS, "post")
    assert create["required"] == ["user_id"]
    assert {"user_id", "title", "metadata"} <= set(create["properties"])
    update = body_of(f"{SESSIONS}/{{session_id}}", "put")
    editable = {"title", "metadata", "conversation_data", "session_summary", "status"}
    assert editable <= set(update["properties"])
