"""Domain errors, turned into HTTP answers in one place (``middleware.py``).

ServiceError
├── NotFound      404  no such session/memory for this user (another user's session looks the same)
├── Conflict      409  the session's state forbids the change
├── BadRequest    400  input that the models cannot express (the detail is the guide's list shape)
├── PreconditionFailed  412  If-Match names another version of the session (carries its ETag)
├── KeyReused     422  an Idempotency-Key sent again with another request
├── TooManyWrites 429  the user's write rate limit (carries Retry-After)
├── Unavailable   503  Redis or PostgreSQL cannot be reached
└── auth.Denied   401/403  no or bad credentials / not allowed (carries WWW-Authenticate)

An error's ``headers`` are sent with its JSON answer.

``PG_UNAVAILABLE`` is the one definition of "PostgreSQL cannot be reached right now" (as opposed to
"this data cannot be written"): the API answers 503 for it, and the worker pauses and retries without
counting a delivery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg

PG_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    # max_connections or a role's CONNECTION LIMIT reached: the server is there but takes nobody now.
    asyncpg.TooManyConnectionsError,
)


class ServiceError(Exception):
    status = 500

    def __init__(self, detail: Any, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class BadRequest(ServiceError):
    status = 400


class PreconditionFailed(ServiceError):
    status = 412


class KeyReused(ServiceError):
    status = 422


class TooManyWrites(ServiceError):
    status = 429


class Unavailable(ServiceError):
    status = 503


SESSION_NOT_FOUND = "Session not found"
MEMORY_NOT_FOUND = "Memory not found"
