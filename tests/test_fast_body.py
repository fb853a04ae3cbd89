"""The hand-written fast path of the message body (``http/fastbody.py``) and the pydantic model agree:
what the fast path accepts, the model accepts, as the very same instance (values, types, fields set), so
the stored record and the idempotency fingerprint are the same; what the model refuses, the fast path
leaves to it, so the 400 and its detail are the model's. Checked on bodies chosen at every boundary the
model declares, and over HTTP with the fast path switched off."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from session_svc.domain import store
from session_svc.domain.conditions import fingerprint
from session_svc.http import fastbody
from session_svc.record.models import (
    MAX_CONTENT_CHARS,
    MAX_JSON_DEPTH,
    MAX_METADATA_BYTES,
    MAX_TOKENS_PER_MESSAGE,
    MessageCreate,
    MessageType,
    Role,
)
from tests.helpers import make_session

FAST = fastbody.FAST.get(MessageCreate)


def _nested(depth: int) -> Any:
    """An object ``depth`` levels deep (its own level included), lists and objects alternating."""
    value: Any = "x"
    for i in range(depth):
        value = {"k": value} if (depth - i) % 2 else [value]
    return value


def _body(**fields: Any) -> bytes:
    return orjson.dumps({"role": "user", "content": "hello", **fields})


_PAD = MAX_METADATA_BYTES - len(b'{"p":""}')
VALID: list[bytes] = [
    b'{"role":"user","content":"Hello"}',
    b'{"role":"user","content":"Hello, this is a benchmark message.","tokens_used":12,"cost_usd":0.0001,'
    b'"metadata":{"model":"gpt-4"}}',
    *(_body(role=r.value) for r in Role),
    *(_body(message_type=t.value) for t in MessageType),
    _body(tokens_used=0),
    _body(tokens_used=MAX_TOKENS_PER_MESSAGE),
    _body(cost_usd=0),
    _body(cost_usd=1),
    b'{"role":"user","content":"x","cost_usd":0.0}',
    b'{"role":"user","content":"x","cost_usd":-0.0}',
    b'{"role":"user","content":"x","cost_usd":1e-6}',
    b'{"role":"user","content":"x","cost_usd":1000000}',
    b'{"role":"user","content":"x","cost_usd":1000000.0}',
    b'{"role":"user","content":"x","cost_usd":0.123456}',
    b'{"role":"user","content":"x","cost_usd":5e-1}',
    _body(content="x" * MAX_CONTENT_CHARS),
    _body(content="é" * MAX_CONTENT_CHARS),
    _body(content=" a "),
    _body(content="日本語 \U0001f600"),
    b'{"role":"user","content":"\\u00e9\\ud83d\\ude00 escaped"}',
    b'{"role":"user","content":"tab\\tnewline\\n\\u001f"}',
    _body(metadata={}),
    _body(metadata={"a": 1, "b": True, "c": None, "d": "s", "e": -(2**63), "f": 2**64 - 1}),
    _body(metadata={"f": 1.5, "g": -0.0, "h": 1e300, "i": [1, 2, {"j": "k"}]}),
    _body(metadata={"p": "x" * _PAD}),
    _body(metadata={"p": "x" * _PAD}, unknown="y" * 100),
    _body(metadata=_nested(MAX_JSON_DEPTH)),
    _body(metadata={"s": "NaN Infinity"}),
    _body(extra_field=[1, 2, 3], another={"x": None}),
    _body(extra=_nested(150)),
    _body(content="[{" * 200),
    b'{"role":"system","content":"first","content":"last"}',
    b' \n{ "role" : "assistant" , "content" : "spaced" } \n',
    b'{"role":"user","content":"x","metadata":{"\\u00e9":"\\u00e9"}}',
    b'{"role":"user","content":"backslash-u \\\\u0000 is not a NUL"}',
    b'{"role":"user","content":"x","metadata":{"big":1e19}}',
    b'{"role":"user","content":"x","tokens_used":5.0}',
]
INVALID: list[bytes] = [
    b"",
    b"null",
    b"[]",
    b'"role"',
    b"{",
    b"{}",
    b'{"content":"x"}',
    b'{"role":"user"}',
    b'{"role":"nobody","content":"x"}',
    b'{"role":"User","content":"x"}',
    b'{"role":null,"content":"x"}',
    b'{"role":["user"],"content":"x"}',
    b'{"role":{"a":1},"content":"x"}',
    b'{"role":"user","content":""}',
    b'{"role":"user","content":"   "}',
    b'{"role":"user","content":"\\u3000\\u2028"}',
    b'{"role":"user","content":"a\\u0000b"}',
    b'{"role":"user","content":5}',
    b'{"role":"user","content":null}',
    _body(content="x" * (MAX_CONTENT_CHARS + 1)),
    _body(message_type="Chat"),
    _body(message_type=None),
    _body(message_type=1),
    _body(tokens_used=-1),
    _body(tokens_used=MAX_TOKENS_PER_MESSAGE + 1),
    _body(tokens_used=True),
    _body(tokens_used="5"),
    _body(tokens_used=5.5),
    _body(tokens_used=None),
    b'{"role":"user","content":"x","tokens_used":18446744073709551616}',
    _body(cost_usd=-0.000001),
    _body(cost_usd=1000000.000001),
    _body(cost_usd=0.0000001),
    _body(cost_usd="0.1"),
    _body(cost_usd=True),
    _body(cost_usd=None),
    b'{"role":"user","content":"x","cost_usd":1e400}',
    b'{"role":"user","content":"x","cost_usd":NaN}',
    b'{"role":"user","content":"x","cost_usd":Infinity}',
    b'{"role":"user","content":"x","cost_usd":18446744073709551616}',
    _body(metadata=None),
    _body(metadata=[]),
    _body(metadata="{}"),
    _body(metadata={"p": "x" * (_PAD + 1)}),
    _body(metadata={"p": "é" * (_PAD // 2 + 1)}),
    _body(metadata={"f": 1.5, "p": "x" * _PAD}),
    _body(metadata=_nested(MAX_JSON_DEPTH + 1)),
    b'{"role":"user","content":"x","metadata":{"k":' + b"[" * 300 + b"]" * 300 + b"}}",
    b'{"role":"user","content":"x","metadata":{"k":"a\\u0000"}}',
    # The model's check reads the dumped JSON: a backslash before "u0000" is refused too.
    b'{"role":"user","content":"x","metadata":{"k":"\\\\u0000"}}',
    b'{"role":"user","content":"x","metadata":{"a\\u0000":1}}',
    b'{"role":"user","content":"x","metadata":{"big":18446744073709551616}}',
    b'{"role":"user","content":"x","metadata":{"small":-9223372036854775809}}',
    b'{"role":"user","content":"x","metadata":{"n":[1,{"m":99999999999999999999}]}}',
    b'{"role":"user","content":"x","metadata":{"inf":1e400}}',
    b'{"role":"user","content":"x","metadata":{"nan":NaN}}',
    b'{"role":"user","content":"\\ud800"}',
    b'{"role":"user","content":"\xff"}',
    b'{"role":"user","content":"x"} trailing',
    b'{"role":"user","content":"x",}',
    b'{"role":"user","content":"raw\ncontrol"}',
    b'{"role":"user","content":"x","role":"nobody"}',
    # pydantic's parser stops a body 200 levels deep in any field, unknown ones too.
    b'{"role":"user","content":"x","extra":' + b"[" * 250 + b"]" * 250 + b"}",
]


def _validated(raw: bytes) -> MessageCreate | list[dict[str, Any]]:
    try:
        return MessageCreate.model_validate_json(raw)
    except ValidationError as exc:
        return exc.errors(include_url=False, include_context=False, include_input=False)  # type: ignore[return-value]


def _fast(raw: bytes) -> MessageCreate | None:
    assert FAST is not None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    got = FAST(doc, raw)
    assert got is None or isinstance(got, MessageCreate)
    return got


def _typed(m: MessageCreate) -> list[tuple[str, type, str]]:
    return [(k, type(v), repr(v)) for k, v in m.__dict__.items()]


def test_the_fast_path_is_on() -> None:
    # It switches itself off if the model's declarations change: then this test says so.
    assert FAST is not None


@pytest.mark.parametrize("raw", VALID, ids=range(len(VALID)))
def test_the_fast_path_builds_what_the_model_builds(raw: bytes) -> None:
    model = _validated(raw)
    assert isinstance(model, MessageCreate), model
    fast = _fast(raw)
    if fast is None:  # left to pydantic (allowed: rare shapes), nothing more to compare
        return
    assert _typed(fast) == _typed(model)
    assert fast == model
    assert fast.model_fields_set == model.model_fields_set
    for sort in (False, True):
        assert store._message("id", 1, fast, sort) == store._message("id", 1, model, sort)
    fp = fingerprint("append_message", "u", "s", model, "")
    assert fingerprint("append_message", "u", "s", fast, "") == fp


@pytest.mark.parametrize("raw", INVALID, ids=range(len(INVALID)))
def test_the_fast_path_refuses_what_the_model_refuses(raw: bytes) -> None:
    assert not isinstance(_validated(raw), MessageCreate)
    assert _fast(raw) is None


def test_the_common_bodies_take_the_fast_path() -> None:
    taken = [raw for raw in VALID if _fast(raw) is not None]
    # Left to pydantic: an integral float for tokens_used, floats beyond 2**63 in metadata (two), and a
    # body nested more than 128 levels deep.
    assert len(taken) == len(VALID) - 4
    assert _fast(VALID[1]) is not None


def test_defaults_match() -> None:
    fast = _fast(b'{"role":"user","content":"x"}')
    assert fast is not None
    assert fast.cost_usd == Decimal("0.0") and str(fast.cost_usd) == "0.0"
    assert fast.metadata == {} and fast.metadata is not _fast(b'{"role":"user","content":"y"}').metadata


async def _answers(client: Any, sid: str, bodies: list[bytes]) -> list[tuple[int, Any]]:
    out = []
    for raw in bodies:
        resp = await client.post(
            f"/api/v1/sessions/{sid}/messages?user_id=u1",
            data=raw,
            headers={"Content-Type": "application/json"},
        )
        doc = await resp.json()
        if resp.status == 200:  # ids and times are new each time: the rest must be the same
            doc = {k: v for k, v in doc.items() if k not in ("message_id", "created_at", "sequence")}
        out.append((resp.status, doc))
    return out


async def test_http_answers_are_the_same_without_the_fast_path(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = (await make_session(client, "u1"))["session_id"]
    bodies = VALID[:8] + INVALID
    fast = await _answers(client, sid, bodies)
    monkeypatch.setattr(fastbody, "FAST", {})
    slow = await _answers(client, sid, bodies)
    assert fast == slow
    assert [s for s, _ in fast].count(200) == 8
