"""The OpenAPI 3.1 document at ``/openapi.json`` and the interactive Swagger UI page at ``/docs``.

The document is generated from ``views.ROUTES`` and the pydantic models that validate the requests, so
it cannot drift from what the service accepts. The page is Swagger UI driven by that document; its
JavaScript and CSS come from the pinned swagger-ui-py package and are served by this service under
``/docs/assets/<version>/`` (no CDN: the service runs offline). The document names no ``servers``, so
"Try it out" calls the service that served the page.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from session_svc import __version__
from session_svc.http import auth
from session_svc.http.appkeys import SETTINGS
from session_svc.http.middleware import json_response
from session_svc.http.views import ROUTES
from session_svc.record import models

_REF = "#/components/schemas/{model}"
_ERROR_TEXT = {
    400: "Validation error: detail is a list of {type, loc, msg} (a string for an HTTP request that "
    "cannot be parsed)",
    404: "Session not found (also for another user's session)",
    409: "The session's status forbids this change",
    401: "No credentials, or bad ones (WWW-Authenticate says which)",
    403: "These credentials may not do this: user_id is not the token's subject, or the route needs an "
    "API key or the sessions:admin scope",
    412: "If-Match names another version of the session: it changed since it was read. The ETag header "
    "carries the current version; nothing was written",
    413: "Request body too large",
    422: "This Idempotency-Key was already used for a different request (method, path, session, If-Match "
    "or body); nothing was written",
    429: "Too many writes for this user (RATE_LIMIT_WRITES_PER_MINUTE); Retry-After says in how many "
    "seconds to retry; nothing was written",
    503: "Redis or PostgreSQL unreachable",
}
_ETAG_HEADER = {
    "description": 'The session\'s version as a strong entity tag, e.g. "7". Every write to the session '
    "changes it, messages and memories too.",
    "schema": {"type": "string"},
}
_REPLAYED_HEADER = {
    "description": "`true` when this is the recorded answer of an earlier request with the same "
    "Idempotency-Key (absent otherwise)",
    "schema": {"type": "string", "enum": ["true"]},
}
_ERROR_HEADERS = {
    412: {"ETag": _ETAG_HEADER},
    429: {
        "Retry-After": {
            "description": "Whole seconds until the user may write again",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Makes the write safe to retry: a request with the same key, user and request (same "
    "method, path, session and body, any key order) within IDEMPOTENCY_TTL (24 h) answers the first "
    "answer again (header `Idempotent-Replayed: true`) and writes nothing; the same key with another "
    "request is a 422. Only successful answers are kept. 1 to 255 visible ASCII characters (400 otherwise).",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"},
}
_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": 'Change the session only if its ETag is one of these (`"7"`, a list, or `*` for any '
    'existing session); 412 otherwise. Strong comparison: a weak tag (`W/"7"`) never matches, nor does '
    "a value that is not a list of entity tags.",
    "schema": {"type": "string"},
}
_IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": "304 Not Modified, with no body, when the session's ETag is among these (or `*`); "
    "weak comparison. A value that is not a list of entity tags is ignored.",
    "schema": {"type": "string"},
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


_BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "AUTH_MODE=api_key: an API key of the service. AUTH_MODE=jwt: a JWT whose sub is the "
    "user_id of the request, or whose scope holds sessions:admin (any user_id, stats, operations).",
}


@cache
def document(auth_mode: str = "none", ops_open: bool = True) -> dict[str, Any]:
    """The document for a service run with these settings: with AUTH_MODE other than none, the bearer
    scheme, and 401/403 on every operation that asks for it."""
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
        if r.etag:
            responses["200"]["headers"] = {"ETag": _ETAG_HEADER}
        if r.writes:
            responses["200"].setdefault("headers", {})["Idempotent-Replayed"] = _REPLAYED_HEADER
        if r.etag and r.method == "GET":
            responses["304"] = {
                "description": "Not Modified (If-None-Match)",
                "headers": {"ETag": _ETAG_HEADER},
            }
        checked = auth.asks(auth_mode, ops_open, r.access)
        codes = sorted({*r.errors, 401, 403}) if checked else r.errors
        for code in codes:
            responses[str(code)] = {
                "description": _ERROR_TEXT[code],
                "content": {"application/json": {"schema": refs[(models.ErrorOut, "serialization")]}},
            }
            if code in _ERROR_HEADERS:
                responses[str(code)]["headers"] = _ERROR_HEADERS[code]
        headers = [_IDEMPOTENCY_KEY] if r.writes else []
        headers += [_IF_MATCH] if r.conditional else []
        headers += [_IF_NONE_MATCH] if r.etag and r.method == "GET" else []
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.handler.__name__,
            "parameters": _parameters(r.path, r.query, components) + headers,
            "responses": responses,
        }
        if auth_mode != "none":
            op["security"] = [{"bearer": []}] if checked else []
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
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "session_svc", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }
    if auth_mode != "none":
        doc["components"]["securitySchemes"] = {"bearer": _BEARER}
    return doc


# The files of the swagger-ui-py distribution that the page loads, and how each is served.
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "index.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
# The asset URLs carry the package's version, so a cached copy is never stale: an upgrade changes them.
_CACHE = "public, max-age=31536000, immutable"


@cache
def _swagger_ui() -> tuple[str, Path]:
    """The version of swagger-ui-py and its directory of Swagger UI's built files. Found through the
    distribution's metadata, so the API never imports the package (and its Jinja and YAML)."""
    dist = importlib.metadata.distribution("swagger-ui-py")
    return dist.version, Path(str(dist.locate_file("swagger_ui/static")))


@cache
def _page() -> str:
    version = _swagger_ui()[0]
    assets = f"/docs/assets/{version}"
    config = {
        "url": "/openapi.json",
        "dom_id": "#swagger-ui",
        "deepLinking": True,
        "displayRequestDuration": True,
        # No badge from validator.swagger.io: only the StandaloneLayout shows one, not the default
        # BaseLayout used here, but the page must never reach out should the layout change.
        "validatorUrl": None,
    }
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>session_svc API</title>"
        f"<link rel='stylesheet' href='{assets}/swagger-ui.css'>"
        f"<link rel='stylesheet' href='{assets}/index.css'>"
        f"<link rel='icon' type='image/png' href='{assets}/favicon-32x32.png' sizes='32x32'>"
        f"<link rel='icon' type='image/png' href='{assets}/favicon-16x16.png' sizes='16x16'>"
        "</head><body><div id='swagger-ui'></div>"
        f"<script src='{assets}/swagger-ui-bundle.js'></script>"
        f"<script>window.ui = SwaggerUIBundle({json.dumps(config)});</script>"
        "</body></html>"
    )


async def openapi_json(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return json_response(document(settings.auth_mode, settings.auth_ops_open))


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=_page(), content_type="text/html")


async def docs_asset(request: web.Request) -> web.FileResponse:
    version, directory = _swagger_ui()
    name = request.match_info["name"]
    if request.match_info["version"] != version or name not in _ASSETS:
        raise web.HTTPNotFound()
    return web.FileResponse(
        directory / name, headers={"Content-Type": _ASSETS[name], "Cache-Control": _CACHE}
    )


def setup(app: web.Application) -> None:
    settings = app[SETTINGS]
    app.router.add_get("/openapi.json", auth.ops(settings, openapi_json))
    app.router.add_get("/docs", auth.ops(settings, docs))
    app.router.add_get("/docs/assets/{version}/{name}", docs_asset)
