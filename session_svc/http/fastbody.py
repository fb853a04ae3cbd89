"""The common, well-formed message body validated by hand: the same rules as the pydantic model, or
``None`` for anything the hand-written check does not take for certain.

``validation.parse_body`` parses a body once with orjson and offers the document to ``FAST[model]``. A
``None`` (a wrong type, a value out of range, a field the check does not know, anything unusual) sends
the raw body to the pydantic model, as before: every refusal, and every error document, is still
pydantic's own. So the check may refuse more than the model does, never less, and what it accepts is the
very model instance pydantic would have built (same values, same types, same fields set), so the store,
the idempotency fingerprint and the stored record cannot tell the two paths apart.

The limits and the custom validators are read from the model's own field declarations (``MinLen``,
``MaxLen``, ``Ge``, ``Le``, the ``AfterValidator`` functions), so they cannot drift from it; if the
model gains, loses or re-declares a field, the fast path switches itself off (``FAST`` is empty) rather
than guess. ``tests/test_fast_body.py`` checks that both paths agree on a set of bodies.

Why: pydantic's ``model_validate_json`` of a chat-sized message was 5.6 µs; orjson plus this check
plus building the instance is about 2 µs (docs/decisions.md, "Hot path").
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import annotated_types
from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo

from session_svc.record import models
from session_svc.record.models import MessageCreate, MessageType, Role

# orjson reads an integer beyond 64 bits as a float, where pydantic's parser keeps an int (which the
# JSON fields then refuse): a float this large may have been such an integer, so it is left to pydantic.
_FLOAT_MAYBE_BIG_INT = 2.0**63


def _meta(info: FieldInfo, kind: type[Any]) -> Any:
    found = [m for m in info.metadata if isinstance(m, kind)]
    if len(found) != 1:
        raise LookupError(f"{kind.__name__} declared {len(found)} times")
    return found[0]


def _after(info: FieldInfo) -> list[Callable[..., Any]]:
    return [m.func for m in info.metadata if isinstance(m, AfterValidator)]


def _plain_json(value: Any) -> bool:
    """No float that may have been an integer beyond 64 bits (iterative: any depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        t = type(item)
        if t is float:
            if not -_FLOAT_MAYBE_BIG_INT < item < _FLOAT_MAYBE_BIG_INT:
                return False
        elif t is dict:
            stack.extend(item.values())
        elif t is list:
            stack.extend(item)
    return True


# pydantic's parser refuses a whole body nested 200 levels deep, in any field (unknown ones too): a
# body nested deeper than this, far below, is left to it.
_PARSER_SAFE_DEPTH = 128


_new = object.__new__
_set = object.__setattr__


def _build(model: type[BaseModel], values: dict[str, Any], fields_set: set[str]) -> Any:
    """The instance ``model_validate`` makes (``__dict__``, fields set, no extra, no private), without
    validating again (``model_construct`` costs more than the validation it skips)."""
    m = _new(model)
    _set(m, "__dict__", values)
    _set(m, "__pydantic_fields_set__", fields_set)
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


def _message_create() -> Callable[[Any, bytes], MessageCreate | None]:
    fields = MessageCreate.model_fields
    if set(fields) != {"role", "content", "message_type", "tokens_used", "cost_usd", "metadata"}:
        raise LookupError(f"MessageCreate has the fields {sorted(fields)}")
    if MessageCreate.model_config.get("extra") != "ignore" or not MessageCreate.model_config.get("strict"):
        raise LookupError("MessageCreate is no longer strict with extra fields ignored")
    content = fields["content"]
    min_chars = _meta(content, annotated_types.MinLen).min_length
    max_chars = _meta(content, annotated_types.MaxLen).max_length
    # The checks inlined below are these very functions (not blank, no NUL), in this order.
    if _after(content) != [models._non_blank, models._no_nul]:
        raise LookupError("the content's validators changed")
    tokens = fields["tokens_used"]
    min_tokens = _meta(tokens, annotated_types.Ge).ge
    max_tokens = _meta(tokens, annotated_types.Le).le
    (cost,) = _after(fields["cost_usd"])
    (capped_metadata,) = _after(fields["metadata"])
    metadata_limit = inspect.getclosurevars(capped_metadata).nonlocals["limit"]
    roles = {r.value: r for r in Role}
    types = {t.value: t for t in MessageType}
    default_type = fields["message_type"].default
    default_tokens = fields["tokens_used"].default
    # validate_default: the default 0 goes through the float validator (0.0) and then _cost.
    default_cost = cost(float(fields["cost_usd"].default))
    if not (
        isinstance(default_type, MessageType)
        and type(default_tokens) is int
        and isinstance(default_cost, Decimal)
        and fields["metadata"].default_factory is dict
    ):
        raise LookupError("MessageCreate's defaults changed")
    costs: dict[float, Decimal] = {}  # amounts already validated: a client sends the same few prices

    def check(doc: Any, raw: bytes) -> MessageCreate | None:
        if type(doc) is not dict:
            return None
        # Only that many brackets (in strings too) can nest that deep: the walk is for the rare body.
        if raw.count(b"[") + raw.count(b"{") > _PARSER_SAFE_DEPTH and models._deeper_than(
            doc, _PARSER_SAFE_DEPTH
        ):
            return None
        r = doc.get("role")
        role = roles.get(r) if type(r) is str else None
        c = doc.get("content")
        if role is None or type(c) is not str or not min_chars <= len(c) <= max_chars:
            return None
        # orjson refuses a raw NUL byte in JSON text: a NUL in any string or key of the body was sent as
        # the escape \u0000, so without one, no string of the document holds a NUL.
        no_nul = b"\\u0000" not in raw
        if not c.strip() or not (no_nul or "\x00" not in c):
            return None
        fields_set = {"role", "content"}
        mtype: MessageType | None = default_type
        if "message_type" in doc:
            t = doc["message_type"]
            mtype = types.get(t) if type(t) is str else None
            if mtype is None:
                return None
            fields_set.add("message_type")
        n = default_tokens
        if "tokens_used" in doc:
            n = doc["tokens_used"]
            # An integral float (5.0) is an int to the model too; rare enough to leave to it.
            if type(n) is not int or not min_tokens <= n <= max_tokens:
                return None
            fields_set.add("tokens_used")
        amount = default_cost
        if "cost_usd" in doc:
            usd = doc["cost_usd"]
            if type(usd) is int:  # strict float takes a JSON integer, as a float
                usd = float(usd)
            elif type(usd) is not float:
                return None
            known = costs.get(usd) if usd > 0 else None  # 0.0 == -0.0, yet their Decimals differ
            if known is None:
                try:
                    known = cost(usd)
                except ValueError:
                    return None
                if usd > 0:
                    if len(costs) >= _COSTS_CACHED:
                        costs.clear()
                    costs[usd] = known
            amount = known
            fields_set.add("cost_usd")
        if "metadata" in doc:
            meta = doc["metadata"]
            if type(meta) is not dict:
                return None
            # The common case: an object of strings, integers, booleans and nulls. orjson never writes
            # such a value back longer than it was sent, and never reads an integer beyond 64 bits as
            # an int, so the model's check would pass it: no NUL, no float, nothing nested.
            if not (
                no_nul and len(raw) <= metadata_limit and all(type(v) in _SCALARS for v in meta.values())
            ):
                if not _plain_json(meta):
                    return None
                try:
                    capped_metadata(meta)
                except ValueError:  # pydantic's PydanticCustomError is a ValueError too
                    return None
            fields_set.add("metadata")
        else:
            meta = {}
        values = {
            "role": role,
            "content": c,
            "message_type": mtype,
            "tokens_used": n,
            "cost_usd": amount,
            "metadata": meta,
        }
        result: MessageCreate = _build(MessageCreate, values, fields_set)
        return result

    return check


_SCALARS = frozenset({str, int, bool, type(None)})
_COSTS_CACHED = 1024


def _fast_paths() -> dict[type[BaseModel], Callable[[Any, bytes], BaseModel | None]]:
    try:
        return {MessageCreate: _message_create()}
    except (LookupError, KeyError, TypeError, ValueError):  # the model changed: pydantic for all
        return {}


FAST = _fast_paths()
