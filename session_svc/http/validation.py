"""Turning request bodies and query strings into models, or a 400 in the guide's list shape."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ValidationError

from session_svc.errors import SESSION_NOT_FOUND, BadRequest, NotFound
from session_svc.http import fastbody
from session_svc.http.appkeys import SETTINGS
from session_svc.ops.telemetry import CONNECTIONS_CLOSED, RECORDER
from session_svc.record import models

M = TypeVar("M", bound=BaseModel)


def _problems(exc: ValidationError, where: str, path: Collection[str] = ()) -> list[dict[str, Any]]:
    """The guide's list shape; ``loc`` starts with ``path`` for the fields named in ``path``."""
    return [
        {
            "type": e["type"],
            "loc": ["path" if e["loc"][:1] and e["loc"][0] in path else where, *e["loc"]],
            "msg": e["msg"],
        }
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


async def parse_body(request: web.Request, model: type[M]) -> M:
    settings = request.app[SETTINGS]
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        # Decided from the header: never wait for (or read) a body that will be refused anyway.
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        if request.content.is_eof():  # all there already (a small body comes with its headers)
            raw = await request.read()
        else:
            async with asyncio.timeout(settings.body_timeout):
                raw = await request.read()  # aiohttp raises 413 past client_max_size
    except TimeoutError:
        # A body that trickles or never comes. Abandon it: aiohttp would otherwise keep reading (and
        # discarding) it for its lingering time after the 408, which closes the connection.
        RECORDER.count(CONNECTIONS_CLOSED, ("body_timeout",))
        request.protocol.close()
        request.content.feed_eof()
        raise web.HTTPRequestTimeout() from None
    except web.RequestPayloadError as exc:  # chunked framing or Content-Encoding that does not decode
        cause = exc.__cause__
        why = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
        detail = [{"type": "body_invalid", "loc": ["body"], "msg": f"Invalid request body: {why}"}]
        raise BadRequest(detail) from None
    except ConnectionResetError:
        # The client left before sending the whole body. Nobody will read the answer, and this is not
        # a failure of ours (nor of PostgreSQL, which an OSError escaping to the middleware would mean).
        detail = [{"type": "body_incomplete", "loc": ["body"], "msg": "The connection closed mid-body"}]
        raise BadRequest(detail) from None
    fast = fastbody.FAST.get(model)
    suspect = b"NaN" in raw or b"Infinity" in raw
    if fast is not None or suspect:  # else pydantic's own parse below is the only one
        try:
            doc: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if suspect:
                # pydantic's parser takes these non-JSON tokens (and orjson would write them back as
                # null); orjson's strict parser tells a real one from the same letters inside a string.
                if "depth limit" in str(exc):
                    raise BadRequest([TOO_DEEP]) from None
                detail = [{"type": "json_invalid", "loc": ["body"], "msg": f"Invalid JSON: {exc}"}]
                raise BadRequest(detail) from None
        else:
            known = fast(doc, raw) if fast is not None else None
            if known is not None:
                return known  # type: ignore[return-value]  # keyed by its model
    # Anything the fast path does not take for certain (every error, anything unusual): the model
    # itself, so every answer to a bad body stays pydantic's.
    try:
        # JSON mode: strict types, yet enum values arrive as the strings they are.
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = _problems(exc, "body")
        if problems[0]["type"] == "json_invalid" and "recursion limit" in problems[0]["msg"]:
            # pydantic's parser stops at 200 levels (whatever the field), before any field is seen; the
            # fields that take JSON values allow models.MAX_JSON_DEPTH. The same answer for both.
            raise BadRequest([TOO_DEEP]) from None
        raise BadRequest(problems) from None


TOO_DEEP = {"type": "json_too_deep", "loc": ["body"], "msg": models.TOO_DEEP}


# Query strings already validated, by model: a chat client sends the same ``?user_id=...`` on every
# turn. Bounded: emptied when full. A model instance is only ever read, so one can serve many requests.
_QUERY_CACHE_SIZE = 4096
_QUERY_CACHE_MAX_CHARS = 512
_queries: dict[tuple[type[BaseModel], str, tuple[str, ...]], BaseModel] = {}


def parse_query(request: web.Request, model: type[M], **path: str) -> M:
    """Query parameters (plus any path parameters given) into ``model``; a problem with a path parameter
    is reported at ``["path", name]``."""
    # The query as sent (percent-encoded): what the parse result depends on, so two queries that parse
    # differently never share an entry.
    raw = request.rel_url.raw_query_string
    if path and any("%" in v for v in path.values()) and not _utf8(request.rel_url.raw_path):
        # yarl leaves an escape that does not decode as it came: "%FF" would read as the user "%FF".
        raise BadRequest([_NOT_UTF8 | {"loc": ["path"]}])
    key = (model, raw, tuple(path.values()))
    known = _queries.get(key)
    if known is not None:
        return known  # type: ignore[return-value]  # keyed by its model
    if "%" in raw and not _utf8(raw):
        # yarl decodes such an escape as U+FFFD: "%FF" and "%FE" would both read as the same user.
        raise BadRequest([_NOT_UTF8 | {"loc": ["query"]}])
    try:
        parsed = model.model_validate({**request.query, **path})
    except ValidationError as exc:
        raise BadRequest(_problems(exc, "query", path)) from None
    if len(raw) <= _QUERY_CACHE_MAX_CHARS:
        if len(_queries) >= _QUERY_CACHE_SIZE:
            _queries.clear()
        _queries[key] = parsed
    return parsed


_NOT_UTF8 = {"type": "utf8_invalid", "msg": "Percent-encoded bytes that are not UTF-8"}


def _utf8(raw: str) -> bool:
    try:
        unquote_to_bytes(raw).decode()
    except UnicodeDecodeError:
        return False
    return True


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def session_id(request: web.Request) -> str:
    """Session ids are UUIDs the service issued; anything else cannot exist, so it is a 404."""
    raw = request.match_info["session_id"]
    if not _CANONICAL_UUID.fullmatch(raw):  # what str(uuid.UUID(raw)) gives back unchanged
        raise NotFound(SESSION_NOT_FOUND)
    return raw


# Request headers -------------------------------------------------------------------------------------

IDEMPOTENCY_KEY = "Idempotency-Key"
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]{1,255}")
# One entity tag of a list (RFC 9110, 8.8.3), then a comma or the end.
_ETAG = re.compile(r'[ \t]*(W/)?"([\x21\x23-\x7e]*)"[ \t]*(?:,|$)')


def _header_problem(name: str, msg: str) -> BadRequest:
    return BadRequest([{"type": "header_invalid", "loc": ["header", name], "msg": msg}])


def idempotency_key(request: web.Request) -> str | None:
    """The Idempotency-Key header, if sent: 1 to 255 visible ASCII characters, else a 400."""
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is not None and not _VISIBLE_ASCII.fullmatch(key):
        raise _header_problem(IDEMPOTENCY_KEY, "must be 1 to 255 visible ASCII characters (no spaces)")
    return key


def _entity_tags(request: web.Request, name: str) -> list[tuple[bool, str]] | None:
    """(weak, opaque tag) of each entity tag of the header; None for ``*``; BadRequest if neither."""
    raw = request.headers.getone(name)
    if raw == "*":
        return None
    tags: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(raw) or not tags:
        m = _ETAG.match(raw, pos)
        if m is None:
            raise _header_problem(name, 'must be "*" or a list of entity tags such as "7"')
        tags.append((m[1] is not None, m[2]))
        pos = m.end()
    return tags


def if_match(request: web.Request) -> str:
    """If-Match for the update script: "" (absent), "*", or the versions it names as ",3,4,". Strong
    comparison (RFC 9110, 13.1.1): a weak tag never matches, nor does a tag this service never makes, nor
    a value that is not a list of entity tags."""
    if "If-Match" not in request.headers:
        return ""
    try:
        tags = _entity_tags(request, "If-Match")
    except BadRequest:
        return ","  # names no entity tag, so it matches nothing: 412, and the session stays as it is
    if tags is None:
        return "*"
    return "," + "".join(f"{tag}," for weak, tag in tags if not weak and tag.isdigit())


def if_none_match(request: web.Request) -> frozenset[str] | None:
    """If-None-Match of a read, as the entity tags it names (weak comparison: ``W/"7"`` is ``"7"``),
    ``{"*"}`` for any; None when absent or malformed."""
    if "If-None-Match" not in request.headers:
        return None
    try:
        tags = _entity_tags(request, "If-None-Match")
    except BadRequest:
        return None  # a read is always safe to answer in full: ignore what cannot be understood
    return frozenset({"*"}) if tags is None else frozenset(f'"{tag}"' for _, tag in tags)
