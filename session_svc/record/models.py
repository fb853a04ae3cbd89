"""Request and response models: they validate input at the edge and generate the OpenAPI document.

Bodies are parsed strictly (``"5"`` is not a token count); query strings, which are text by nature, are
parsed in lax mode (``page=2`` is an int). Unknown body fields are ignored, as the original service did.
"""

from __future__ import annotations

import math
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError
from typing_extensions import TypeAliasType

from session_svc.record.fields import MICROS, MemoryType, SessionStatus

# Size limits (documented in docs/api.md, "Limits").
MAX_ID_CHARS = 255
MAX_TITLE_CHARS = 500
MAX_CONTENT_CHARS = 256 * 1024
MAX_SUMMARY_CHARS = 64 * 1024
MAX_MEMORY_CHARS = 64 * 1024
MAX_METADATA_BYTES = 16 * 1024
MAX_CONVERSATION_BYTES = 256 * 1024
MAX_TOKENS_PER_MESSAGE = 2**31 - 1
MAX_COST_PER_MESSAGE = Decimal(1_000_000)
# Levels of arrays and objects in a JSON field, its own object being the first: far beyond real metadata,
# far below what the parsers and PostgreSQL take (pydantic's parser stops a body at 200, orjson writes
# 255 at most).
MAX_JSON_DEPTH = 64
TOO_DEEP = f"JSON nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects"


class Role(StrEnum):
    user = "user"
    assistant = "assistant"
    system = "system"
    tool_call = "tool_call"
    tool_result = "tool_result"


class MessageType(StrEnum):
    chat = "chat"
    system = "system"
    tool_call = "tool_call"
    tool_result = "tool_result"
    notification = "notification"


# The rules below as JSON Schema, for the OpenAPI document. The patterns read the same in ECMA-262 (the
# dialect JSON Schema specifies) and in Python; tests/test_openapi.py checks that each accepts exactly
# what its validator accepts. WHITESPACE is what ``str.isspace()`` (so ``str.strip()``) calls blank.
WHITESPACE = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NO_NUL_PATTERN = r"^[^\x00]*$"
NON_BLANK_PATTERN = rf"^[^\x00]*[^\x00{WHITESPACE}][^\x00]*$"
_ID_CHAR = r"[^\x00-\x1f\x7f/]"
USER_ID_PATTERN = rf"^{_ID_CHAR}*[^\x00-\x1f\x7f/{WHITESPACE}]{_ID_CHAR}*$"


INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1  # the integers orjson (so Redis and jsonb) takes
_NO_NUL_KEY = Annotated[str, WithJsonSchema({"type": "string", "not": {"pattern": "\\x00"}})]
# What _capped_json accepts inside an object, as far as JSON Schema can say it. Only documents: the
# objects are validated as dict[str, Any] and then by _capped_json.
if TYPE_CHECKING:  # mypy cannot follow this recursive alias; pydantic does
    JsonValue = Any
else:
    JsonValue = TypeAliasType(
        "JsonValue",
        Annotated[
            Annotated[str, Field(pattern=NO_NUL_PATTERN)]
            | Annotated[int, Field(ge=INT64_MIN, le=UINT64_MAX)]
            | Annotated[float, WithJsonSchema({"type": "number", "not": {"type": "integer"}})]
            | bool
            | list["JsonValue"]
            | dict[_NO_NUL_KEY, "JsonValue"]
            | None,
            Field(
                description="Any JSON value whose strings and keys have no NUL character and whose "
                "integers fit in 64 bits. A number written with a fraction or an exponent is a float, "
                "which may be larger."
            ),
        ],
    )


def _same(value: Any) -> Any:
    return value


def _json_object(limit: int) -> tuple[Any, ...]:
    return (
        BeforeValidator(_same, json_schema_input_type=dict[_NO_NUL_KEY, JsonValue]),
        Field(
            description=(
                f"A JSON object of at most {limit} bytes as compact UTF-8 JSON (JSON Schema cannot say "
                "this). No string or key in it may contain a NUL character (\\u0000), and its integers "
                "must fit in 64 bits (-2^63 .. 2^64-1)."
            )
        ),
        _capped_json(limit),
    )


def _capped_json(limit: int) -> AfterValidator:
    def check(value: dict[str, Any]) -> dict[str, Any]:
        try:
            dumped = orjson.dumps(value)
        except TypeError:  # orjson refuses what Redis/Postgres JSON could not hold either
            if _deeper_than(value, MAX_JSON_DEPTH):
                raise PydanticCustomError("json_too_deep", TOO_DEEP) from None
            raise ValueError("integers must fit in 64 bits") from None
        # Only a value with that many brackets can nest that deep: the walk is for the rare one.
        if dumped.count(b"[") + dumped.count(b"{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
            raise PydanticCustomError("json_too_deep", TOO_DEEP)
        if b"null" in dumped and _non_finite(value):  # orjson writes inf (1e400 parses as inf) as null
            raise ValueError("numbers must be finite (1e400 is beyond a double's range)")
        if b"\\u0000" in dumped:
            raise ValueError("must not contain NUL characters (PostgreSQL cannot store them)")
        if len(dumped) > limit:
            raise ValueError(f"must serialize to at most {limit} bytes of JSON")
        return value

    return AfterValidator(check)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` levels of lists and dicts; iterative, so any depth."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _non_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, (dict, list)):
            stack.extend(item.values() if isinstance(item, dict) else item)
    return False


def _no_control_chars(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value


def _addressable(value: str) -> str:
    # The user id is also a URL path segment (GET /api/v1/users/{user_id}/sessions): a "/" cannot be
    # addressed there, and clients remove "." and ".." segments before sending (RFC 3986, 5.2.4).
    if "/" in value or value in (".", ".."):
        raise ValueError('must not contain "/" nor be "." or ".."')
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (PostgreSQL cannot store them)")
    return value


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


UserId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_ID_CHARS,
        description=(
            f"1 to {MAX_ID_CHARS} characters, not blank, no control characters (U+0000-U+001F, U+007F), "
            'no "/", and not "." or "..": it is also a URL path segment of the user listing.'
        ),
        json_schema_extra={"pattern": USER_ID_PATTERN, "not": {"enum": [".", ".."]}},
    ),
    AfterValidator(_no_control_chars),
    AfterValidator(_non_blank),
    AfterValidator(_addressable),
]
_NO_NUL = "No NUL character (\\u0000): PostgreSQL cannot store it."
Title = Annotated[
    str,
    Field(max_length=MAX_TITLE_CHARS, description=_NO_NUL, json_schema_extra={"pattern": NO_NUL_PATTERN}),
    AfterValidator(_no_nul),
]
Summary = Annotated[
    str,
    Field(max_length=MAX_SUMMARY_CHARS, description=_NO_NUL, json_schema_extra={"pattern": NO_NUL_PATTERN}),
    AfterValidator(_no_nul),
]
Metadata = Annotated[dict[str, Any], *_json_object(MAX_METADATA_BYTES)]
ConversationData = Annotated[dict[str, Any], *_json_object(MAX_CONVERSATION_BYTES)]


def _content_field(max_chars: int) -> Any:
    return Field(
        min_length=1,
        max_length=max_chars,
        description="Not blank (at least one character that is not whitespace). No NUL character (\\u0000).",
        json_schema_extra={"pattern": NON_BLANK_PATTERN},
    )


MessageContent = Annotated[
    str, _content_field(MAX_CONTENT_CHARS), AfterValidator(_non_blank), AfterValidator(_no_nul)
]
MemoryContent = Annotated[
    str, _content_field(MAX_MEMORY_CHARS), AfterValidator(_non_blank), AfterValidator(_no_nul)
]


def _integral(value: Any) -> Any:
    # JSON has one kind of number: 5.0 (or 5e0) is the integer 5, as JSON Schema's "integer" says and as
    # Python's json.dumps writes a float. Fractions, strings ("5") and booleans stay refused (strict).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS_PER_MESSAGE), BeforeValidator(_integral)]


def to_micros(value: Decimal) -> int:
    micros = value * MICROS
    if micros != micros.to_integral_value():
        raise ValueError("must have at most 6 decimal places")
    return int(micros)


def _cost(value: float) -> Decimal:
    # repr of a float is the shortest string that round-trips, so 0.0001 becomes Decimal("0.0001")
    # exactly, not the binary 0.000100000000000000004792... (JSON integers arrive as floats too).
    amount = Decimal(repr(value))
    if not amount.is_finite() or amount < 0 or amount > MAX_COST_PER_MESSAGE:
        raise ValueError(f"must be a number between 0 and {MAX_COST_PER_MESSAGE}")
    to_micros(amount)
    return amount


Cost = Annotated[
    float,
    Field(
        description=f"USD, 0 to {MAX_COST_PER_MESSAGE}, at most 6 decimal places.",
        json_schema_extra={"minimum": 0, "maximum": int(MAX_COST_PER_MESSAGE), "multipleOf": 1 / MICROS},
    ),
    AfterValidator(_cost),
]


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", use_enum_values=False)


class SessionCreate(Body):
    user_id: UserId
    title: Title = ""
    metadata: Metadata = Field(default_factory=dict)
    conversation_data: ConversationData = Field(default_factory=dict)
    session_summary: Summary = ""


class SessionUpdate(Body):
    title: Title | None = None
    metadata: Metadata | None = None
    conversation_data: ConversationData | None = None
    session_summary: Summary | None = None
    status: SessionStatus | None = None


class MessageCreate(Body):
    role: Role
    content: MessageContent
    message_type: MessageType = MessageType.chat
    tokens_used: TokenCount = 0
    cost_usd: Cost = Field(default=0, validate_default=True)
    metadata: Metadata = Field(default_factory=dict)


class MemoryCreate(Body):
    memory_type: MemoryType
    content: MemoryContent
    metadata: Metadata = Field(default_factory=dict)


# Query strings --------------------------------------------------------------------------------------


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OwnerQuery(Query):
    user_id: UserId


class MessagePageQuery(OwnerQuery):
    page: Annotated[int, Field(ge=1, le=10_000_000)] = 1
    page_size: Annotated[int, Field(ge=1, le=200)] = 100


class MemoryQuery(OwnerQuery):
    memory_type: MemoryType | None = None


class MemoryPageQuery(MemoryQuery):
    page: Annotated[int, Field(ge=1, le=10_000_000)] = 1
    page_size: Annotated[int, Field(ge=1, le=200)] = 50


class UserSessionsQuery(OwnerQuery):
    active_only: bool = False
    page: Annotated[int, Field(ge=1, le=10_000_000)] = 1
    page_size: Annotated[int, Field(ge=1, le=100)] = 50


# Responses (documentation only: handlers build plain dicts in exactly these shapes) ------------------


class SessionOut(BaseModel):
    session_id: str
    user_id: str
    title: str
    status: SessionStatus
    conversation_data: dict[str, Any]
    metadata: dict[str, Any]
    is_active: bool
    message_count: int
    total_tokens: int
    total_cost: float = Field(description="USD, exact to 6 decimals")
    session_summary: str
    created_at: str
    updated_at: str
    last_activity: str


class SessionListItem(BaseModel):
    session_id: str
    user_id: str
    title: str
    status: SessionStatus
    is_active: bool
    message_count: int
    total_tokens: int
    total_cost: float
    created_at: str
    updated_at: str
    last_activity: str


class SessionList(BaseModel):
    sessions: list[SessionListItem]
    total: int
    page: int
    page_size: int


class SessionSummaryOut(BaseModel):
    session_id: str
    user_id: str
    title: str
    status: SessionStatus
    message_count: int
    total_tokens: int
    total_cost: float
    has_memory: bool
    is_active: bool
    session_summary: str
    created_at: str
    last_activity: str


class MessageOut(BaseModel):
    message_id: str
    session_id: str
    user_id: str
    sequence: int = Field(description="1, 2, 3... in the order the service accepted the messages")
    role: Role
    content: str
    message_type: MessageType
    metadata: dict[str, Any]
    tokens_used: int
    cost_usd: float
    created_at: str


class MessageList(BaseModel):
    messages: list[MessageOut]
    total: int
    page: int
    page_size: int


class MemoryOut(BaseModel):
    memory_id: str
    session_id: str
    user_id: str
    memory_type: MemoryType
    content: str
    metadata: dict[str, Any]
    created_at: str


class MemoryList(BaseModel):
    memories: list[MemoryOut]
    total: int
    page: int
    page_size: int


class StatsOut(BaseModel):
    total_sessions: int
    active_sessions: int
    total_messages: int
    total_tokens: int
    total_cost: float
    average_messages_per_session: float


class MessageText(BaseModel):
    message: str


class ErrorItem(BaseModel):
    type: str
    loc: list[str | int]
    msg: str


class ErrorOut(BaseModel):
    detail: str | list[ErrorItem]


class HealthOut(BaseModel):
    status: str
    service: str
    port: int
    version: str
    timestamp: str


class HealthDetailedOut(BaseModel):
    service: str
    status: str = Field(description="operational, or degraded when anything in `reasons` is wrong")
    reasons: list[str] = Field(description="what is wrong, empty when operational")
    accepting_writes: bool = Field(description="false (and HTTP 503) when Redis is unreachable or full")
    port: int
    version: str
    redis_connected: bool
    database_connected: bool
    redis_memory_used_bytes: int | None
    redis_memory_max_bytes: int | None = Field(description="Redis maxmemory, 0 when unlimited")
    workers_alive: int | None = Field(description="workers whose heartbeat is recent")
    last_flush_age_seconds: float | None = Field(description="since a worker last committed a batch")
    outbox_backlog: int | None = Field(description="outbox entries not yet written to Postgres")
    outbox_lag_seconds: float | None = Field(description="age of the oldest unwritten entry")
    dead_letters: int | None
    timestamp: str
