"""The OpenAPI document says what the service accepts: it is valid OpenAPI 3.1, it carries every limit
the validators enforce that JSON Schema can express, and its patterns accept exactly what the
validators accept."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from pydantic import TypeAdapter, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from session_svc.http import openapi
from session_svc.record import models
from session_svc.record.fields import MemoryType
from tests.helpers import SESSIONS, ok_json

LISTING = "/api/v1/users/{user_id}/sessions"
SESSION = f"{SESSIONS}/{{session_id}}"


@pytest.fixture
async def doc(client: Any) -> dict[str, Any]:
    return await ok_json(await client.get("/openapi.json"))


def body_schema(doc: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    ref = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def prop(doc: dict[str, Any], path: str, method: str, name: str) -> dict[str, Any]:
    """A body property, the non-null branch of an optional one."""
    node: dict[str, Any] = body_schema(doc, path, method)["properties"][name]
    branches = [b for b in node.get("anyOf", []) if b != {"type": "null"}]
    return branches[0] if branches else node


def params(doc: dict[str, Any], name: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (method, path, parameter) named ``name``."""
    return [
        (method, path, p)
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        for p in op["parameters"]
        if p["name"] == name
    ]


async def test_served_document_is_valid_openapi(doc: dict[str, Any]) -> None:
    validate(doc)  # raises on the first problem, e.g. a $ref that points nowhere
    assert doc["openapi"] == "3.1.0"


async def test_memory_type_filters_name_the_enum(doc: dict[str, Any]) -> None:
    found = params(doc, "memory_type")
    assert {(m, p) for m, p, _ in found} == {("get", f"{SESSION}/memory"), ("get", f"{SESSION}/memories")}
    for _, _, p in found:
        assert (p["in"], p["required"]) == ("query", False)
        ref = p["schema"]["$ref"]
        assert set(doc["components"]["schemas"][ref.rsplit("/", 1)[1]]["enum"]) == set(MemoryType)


def _user_id_rules(schema: dict[str, Any]) -> None:
    assert schema["type"] == "string"
    assert (schema["minLength"], schema["maxLength"]) == (1, 255)
    assert schema["pattern"] == models.USER_ID_PATTERN
    assert schema["not"] == {"enum": [".", ".."]}
    assert "control" in schema["description"]


async def test_user_id_rules_are_documented_everywhere(doc: dict[str, Any]) -> None:
    _user_id_rules(prop(doc, SESSIONS, "post", "user_id"))
    found = params(doc, "user_id")
    documented = {(m, p): param for m, p, param in found}
    assert documented[("get", LISTING)]["in"] == "path"
    assert len(found) == 10  # the listing's path parameter and every session route's ?user_id=
    for param in documented.values():
        assert param["required"] is True
        _user_id_rules(param["schema"])


async def test_session_id_is_documented_as_the_uuid_the_service_issued(doc: dict[str, Any]) -> None:
    found = params(doc, "session_id")
    assert len(found) == 9
    for _, _, p in found:
        assert (p["in"], p["schema"]["format"]) == ("path", "uuid")
        assert "404" in p["schema"]["description"]


async def test_body_limits_are_documented(doc: dict[str, Any]) -> None:
    # docs/api.md's "Limits" table, field by field.
    message, memory = f"{SESSION}/messages", f"{SESSION}/memory"
    for path, method in ((SESSIONS, "post"), (SESSION, "put")):
        title = prop(doc, path, method, "title")
        assert (title["maxLength"], title["pattern"]) == (500, models.NO_NUL_PATTERN)
        summary = prop(doc, path, method, "session_summary")
        assert (summary["maxLength"], summary["pattern"]) == (65536, models.NO_NUL_PATTERN)
        assert "16384 bytes" in prop(doc, path, method, "metadata")["description"]
        assert "262144 bytes" in prop(doc, path, method, "conversation_data")["description"]
    for path, cap in ((message, 262144), (memory, 65536)):
        content = prop(doc, path, "post", "content")
        assert (content["minLength"], content["maxLength"]) == (1, cap)
        assert content["pattern"] == models.NON_BLANK_PATTERN
        metadata = prop(doc, path, "post", "metadata")
        assert "16384 bytes" in metadata["description"] and "NUL" in metadata["description"]
    tokens = prop(doc, message, "post", "tokens_used")
    assert (tokens["type"], tokens["minimum"], tokens["maximum"]) == ("integer", 0, 2**31 - 1)
    cost = prop(doc, message, "post", "cost_usd")
    assert (cost["minimum"], cost["maximum"], cost["multipleOf"]) == (0, 1_000_000, 0.000001)


async def test_delete_says_the_session_stays_readable(doc: dict[str, Any]) -> None:
    """The docs page shows this description (tests/test_docs_ui.py)."""
    op = doc["paths"][SESSION]["delete"]
    assert "ended" in op["description"] and "not 404" in op["description"]


async def test_request_bodies_state_the_size_limit(doc: dict[str, Any]) -> None:
    bodies = [
        op["requestBody"] for ops in doc["paths"].values() for op in ops.values() if "requestBody" in op
    ]
    assert len(bodies) == 4  # create, update, message, memory
    assert all("MAX_BODY_BYTES" in b["description"] and "413" in b["description"] for b in bodies)


# The patterns against the validators ------------------------------------------------------------------


def ecma_search(pattern: str, value: str) -> bool:
    """JSON Schema's ``pattern`` (ECMA-262): ``$`` is the end of the input, never before a final newline
    as in Python, so it is read as ``\\Z`` here."""
    assert pattern.endswith("$")
    return re.search(pattern[:-1] + r"\Z", value) is not None


def accepts(adapter: TypeAdapter[Any], value: Any) -> bool:
    try:
        adapter.validate_python(value)
    except ValidationError:
        return False
    return True


USER_ID = TypeAdapter(models.UserId)
CONTENT = TypeAdapter(models.MemoryContent)


def user_id_schema_accepts(value: str) -> bool:
    return 1 <= len(value) <= 255 and value not in (".", "..") and ecma_search(models.USER_ID_PATTERN, value)


def content_schema_accepts(value: str) -> bool:
    return 1 <= len(value) <= 65536 and ecma_search(models.NON_BLANK_PATTERN, value)


def test_patterns_agree_with_the_validators_on_every_character() -> None:
    for code in range(0x3100):  # every character str.isspace() knows lies below U+3100
        c = chr(code)
        for value in (c, c * 2, f"a{c}", f"{c}a", f"{c}\n"):
            assert user_id_schema_accepts(value) == accepts(USER_ID, value), repr(value)
            assert content_schema_accepts(value) == accepts(CONTENT, value), repr(value)


TRICKY = st.sampled_from(["\x00", "\x01", "\x1f", "\x7f", "\x85", "\xa0", "\u2028", "\u3000", "\ufeff", "\n"])
TEXT = st.text(
    alphabet=st.one_of(TRICKY, st.sampled_from(" \t./a{}é"), st.characters(codec="utf-8")), max_size=12
)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_patterns_agree_with_the_validators(value: str) -> None:
    assert user_id_schema_accepts(value) == accepts(USER_ID, value)
    assert content_schema_accepts(value) == accepts(CONTENT, value)
    no_nul = ecma_search(models.NO_NUL_PATTERN, value)
    assert no_nul == accepts(TypeAdapter(models.Title), value)


def _json_objects() -> st.SearchStrategy[dict[str, Any]]:
    keys = st.text(alphabet=st.sampled_from("ab\x00\n "), max_size=3)
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**65), max_value=2**65),
        st.sampled_from([models.INT64_MIN, models.INT64_MIN - 1, models.UINT64_MAX, models.UINT64_MAX + 1]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(alphabet=st.sampled_from("x\x00\n\u2028é"), max_size=4),
    )
    values = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3)
    )
    return st.dictionaries(keys, values, max_size=4)


def _integral_float_beyond_64_bits(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer() and not models.INT64_MIN <= value <= models.UINT64_MAX
    if isinstance(value, dict):
        return any(_integral_float_beyond_64_bits(v) for v in value.values())
    if isinstance(value, list):
        return any(_integral_float_beyond_64_bits(v) for v in value)
    return False


METADATA = TypeAdapter(models.Metadata)
# The served document's schema of a message's metadata, its references resolved within the document.
METADATA_SCHEMA = Draft202012Validator(
    {"$ref": "urn:doc#/components/schemas/MessageCreate/properties/metadata"},
    registry=Registry().with_resource("urn:doc", Resource.from_contents(openapi.document(), DRAFT202012)),
)


@settings(max_examples=300, deadline=None)
@given(_json_objects())
def test_json_object_schema_agrees_with_the_validator(value: dict[str, Any]) -> None:
    """What the documented schema of ``metadata`` accepts, the service accepts, and the other way round
    except for a float such as 1e20 (an integer to JSON Schema, a float to the service)."""
    documented = METADATA_SCHEMA.is_valid(value)
    if documented or not _integral_float_beyond_64_bits(value):
        assert accepts(METADATA, value) == documented, value
