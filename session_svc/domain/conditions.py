"""What a write request says besides its body, and how a write's reply becomes an answer or an error.

Writes take the request's ``Conditions``. With an Idempotency-Key or a rate limit they run the guarded
variant of their script (``storage/scripts/call.guarded``): the record of the first answer is checked,
the user's token bucket charged and the answer recorded in the same script as the write. A record holds
the request's fingerprint and what Python made for the first request (ids, times) plus what the script
made (the sequence number; for PUT/DELETE the session hash), so a replay rebuilds the first answer byte
for byte from the retry's own body, which the fingerprint proves is the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, NamedTuple

import orjson
from pydantic import BaseModel

from session_svc.errors import (
    SESSION_NOT_FOUND,
    Conflict,
    KeyReused,
    NotFound,
    PreconditionFailed,
    TooManyWrites,
)
from session_svc.record.keys import UserKeys
from session_svc.record.shapes import Row, dumps
from session_svc.storage.resources import Backend
from session_svc.storage.scripts import FINGERPRINT_LEN, Guard, Reply

# Idempotency, preconditions, rate limits ---------------------------------------------------------------


class Conditions(NamedTuple):
    """What a write request says besides its body (read by ``views._adapt``)."""

    idempotency_key: str | None = None
    # If-Match: "" (none), "*", or the versions the session may have, as ",3,4," (``validation``).
    if_match: str = ""


NO_CONDITIONS = Conditions()


class Written(NamedTuple):
    """A write's answer: the JSON, the session's ETag when it has one, and whether it was replayed.
    (Named tuples: one is built on every write, and a frozen dataclass costs several times more.)"""

    row: Row
    etag: str | None = None
    replayed: bool = False


def etag(version: str | int) -> str:
    """The session's strong entity tag: its version ``v``, which every write bumps."""
    return f'"{version}"'


def _canonical(value: Any) -> Any:
    if isinstance(value, Decimal):  # cost_usd: 0.00010 and 0.0001 are one amount
        return str(value.normalize())
    raise TypeError(type(value).__name__)


def fingerprint(op: str, uid: str, sid: str, body: BaseModel | None, if_match: str = "") -> str:
    """The request as validated, keys sorted: a client that re-serialises the same body is the same
    request, a different value is another one."""
    # ``__dict__``: the validated fields (extra ones are ignored), without ``dict(body)``'s per-field copy.
    doc = [op, uid, sid, if_match, body.__dict__ if body is not None else None]
    raw = orjson.dumps(doc, default=_canonical, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(raw, digest_size=FINGERPRINT_LEN // 2).hexdigest()


def guard_of(
    b: Backend,
    uk: UserKeys,
    cond: Conditions,
    request: tuple[str, str, BaseModel | None],
    made: Sequence[Any],
    now: int,
) -> Guard | None:
    """The guarded script's extra arguments, or None (the plain script) with neither an Idempotency-Key
    nor a rate limit. ``request``: (operation, session id, validated body), fingerprinted with the user
    and If-Match when a key was sent; ``made``: what Python made for this request (ids, times)."""
    if cond.idempotency_key is None and not b.rate_per_minute:
        return None
    op, sid, body = request
    fp = "" if cond.idempotency_key is None else fingerprint(op, uk.user_id, sid, body, cond.if_match)
    return Guard(
        uk.idempotency(cond.idempotency_key or ""), fp, dumps(made) + "\n", b.idempotency_ttl,
        uk.rate_limit, b.rate_per_minute, b.rate_burst, now,
    )  # fmt: skip


def replayed_record(rec: str) -> tuple[list[Any], str]:
    """A replayed record: what Python made for the first request, and what its script made."""
    made, _, extra = rec[FINGERPRINT_LEN:].partition("\n")
    return orjson.loads(made), extra


def as_json(value: Any, sort: bool) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode() if sort else dumps(value)


def check(reply: Sequence[Any], what: str) -> None:
    """Raise the error a failed write's reply stands for; return for ``OK``."""
    state = reply[0]
    if state in (Reply.missing, Reply.cold):
        raise NotFound(SESSION_NOT_FOUND)
    if state == Reply.conflict:
        raise Conflict(f"Session is {reply[1]}: {what}")
    if state == Reply.precondition:
        tag = etag(reply[1])
        raise PreconditionFailed(
            f"Precondition failed: If-Match does not match the session's current ETag {tag}; "
            "read it again and redo the change",
            {"ETag": tag},
        )
    if state == Reply.mismatch:
        raise KeyReused(
            "Idempotency-Key was already used for a different request (another method, path, session, "
            "If-Match or body); send a new key for a new request"
        )
    if state == Reply.limited:
        raise TooManyWrites(
            f"Too many writes for this user; retry after {reply[1]} s", {"Retry-After": str(reply[1])}
        )
