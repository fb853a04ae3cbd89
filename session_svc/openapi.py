"""The OpenAPI 3.1 document at ``/openapi.json`` and a readable page at ``/docs``.

Both are generated from ``views.ROUTES`` and the pydantic models that validate the requests, so the
document cannot drift from what the service accepts. The page is self-contained (no CDN).
"""

from __future__ import annotations

import html
import re
from functools import cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from session_svc import __version__, models
from session_svc.middleware import json_response
from session_svc.views import ROUTES

_REF = "#/components/schemas/{model}"
_ERROR_TEXT = {
    400: "Validation error: detail is a list of {type, loc, msg} (a string for an HTTP request that "
    "cannot be parsed)",
    404: "Session not found (also for another user's session)",
    409: "The session's status forbids this change",
    413: "Request body too large",
    503: "Redis or PostgreSQL unreachable",
}


_SESSION_ID = {
    "type": "string",
    "format": "uuid",
    "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    "description": "A session id the service issued: a lower-case UUID. Any other value is answered 404 "
    '"Session not found", like an unknown id.',
}


def _query_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A model property as a parameter schema: a query string has no null, an absent parameter is."""
    prop = dict(prop)
    branches = prop.get("anyOf", [])
    if {"type": "null"} in branches:
        rest = [b for b in branches if b != {"type": "null"}]
        del prop["anyOf"]
        prop.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
        if prop.get("default", 0) is None:
            del prop["default"]
    return prop


def _parameters(
    route_path: str, query: type[BaseModel] | None, components: dict[str, Any]
) -> list[dict[str, Any]]:
    """Path and query parameters, from the model that validates them (path parameters other than the
    session id are fields of the query model too, and are validated with the same rules)."""
    props: dict[str, Any] = {}
    required: set[str] = set()
    if query is not None:
        schema = query.model_json_schema(ref_template=_REF)
        for name, definition in schema.get("$defs", {}).items():
            # Enums shared with the bodies are among the components already, and must be the same.
            if components.setdefault(name, definition) != definition:
                raise RuntimeError(f"two different schemas named {name}")
        props = schema["properties"]
        required = set(schema.get("required", []))
    params: list[dict[str, Any]] = []
    if "{session_id}" in route_path:
        params.append({"name": "session_id", "in": "path", "required": True, "schema": _SESSION_ID})
    for name, prop in props.items():
        where = "path" if "{" + name + "}" in route_path else "query"
        params.append(
            {
                "name": name,
                "in": where,
                "required": where == "path" or name in required,
                "schema": _query_schema(prop),
            }
        )
    undocumented = set(re.findall(r"{(\w+)}", route_path)) - {p["name"] for p in params if p["in"] == "path"}
    if undocumented:
        raise RuntimeError(f"{route_path}: no schema for path parameters {sorted(undocumented)}")
    return params


@cache
def document() -> dict[str, Any]:
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(models.ErrorOut, "serialization")]
    for r in ROUTES:
        wanted.append((r.response, "serialization"))
        if r.body is not None:
            wanted.append((r.body, "validation"))
    refs, defs = models_json_schema(list(dict.fromkeys(wanted)), ref_template=_REF)
    components: dict[str, Any] = defs.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        responses: dict[str, Any] = {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": refs[(r.response, "serialization")]}},
            }
        }
        for code in r.errors:
            responses[str(code)] = {
                "description": _ERROR_TEXT[code],
                "content": {"application/json": {"schema": refs[(models.ErrorOut, "serialization")]}},
            }
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.handler.__name__,
            "parameters": _parameters(r.path, r.query, components),
            "responses": responses,
        }
        if r.description:
            op["description"] = r.description
        if r.body is not None:
            op["requestBody"] = {
                "description": "A JSON object of at most MAX_BODY_BYTES bytes (1 MiB unless configured; "
                "413 above). No NaN or Infinity (RFC 8259). Unknown fields are ignored.",
                "required": True,
                "content": {"application/json": {"schema": refs[(r.body, "validation")]}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "session_svc", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }


def _page() -> str:
    doc = document()
    schemas = doc["components"]["schemas"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>session_svc API</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}code{background:#eee}"
        "h2{border-top:1px solid #ccc;padding-top:.5em}td{padding:0 1em 0 0;vertical-align:top}</style>",
        "</head><body><h1>session_svc API</h1>",
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a></p>",
    ]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            parts.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>")
            parts.append(f"<p>{html.escape(op['summary'])}</p>")
            if "description" in op:
                parts.append(f"<p>{html.escape(op['description'])}</p>")
            if op["parameters"]:
                parts.append("<table><tr><th>parameter</th><th>in</th><th>required</th></tr>")
                for p in op["parameters"]:
                    parts.append(
                        f"<tr><td><code>{p['name']}</code></td><td>{p['in']}</td><td>{p['required']}</td></tr>"
                    )
                parts.append("</table>")
            if "requestBody" in op:
                name = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                body = schemas[name]
                fields = ", ".join(
                    f"<code>{f}</code>{'*' if f in body.get('required', []) else ''}"
                    for f in body["properties"]
                )
                parts.append(f"<p>Body ({name}): {fields}</p>")
            codes = ", ".join(op["responses"])
            parts.append(f"<p>Responses: {codes}</p>")
    parts.append("</body></html>")
    return "".join(parts)


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(document())


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=_page(), content_type="text/html")


def setup(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
