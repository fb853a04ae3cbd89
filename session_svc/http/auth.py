"""Who is calling, and whether they may do what they ask (``AUTH_MODE``).

- ``none`` (default): nobody is asked for anything; a gateway in front authenticates.
- ``api_key``: ``Authorization: Bearer <key>``, a key of ``AUTH_API_KEYS`` / ``AUTH_API_KEYS_FILE``. A key
  is a trusted backend: it may act for any user and read everything (an admin ``Principal``). Keys are
  kept only as SHA-256 digests and compared with ``hmac.compare_digest``, each against all.
- ``jwt``: ``Authorization: Bearer <JWT>``, verified with PyJWT: HS256 with ``AUTH_JWT_SECRET``, or
  RS256/ES256 with the keys published at ``AUTH_JWKS_URL``. ``exp`` and ``sub`` are required; ``nbf``
  is checked when present; ``aud``/``iss`` when configured; leeway ``AUTH_JWT_LEEWAY``. The user is
  ``sub``; a ``scope`` containing ``sessions:admin`` makes it an admin.

``views._adapt`` calls ``Guard.authenticate`` before it parses anything (so a 401 comes before a 400 or
a 404), and ``Guard.authorize`` once the request is parsed and before any Redis call (so a 403 changes
nothing). Refusals are ``Denied`` errors, answered by the middleware: JSON ``{"detail": ...}`` with the
RFC 6750 ``WWW-Authenticate`` challenge. A token or key is never logged, nor put in an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import aiohttp
from aiohttp import web

from session_svc.errors import ServiceError, Unavailable
from session_svc.http.appkeys import SETTINGS
from session_svc.settings import Settings

if TYPE_CHECKING:
    # PyJWT (and cryptography under it) is imported only with AUTH_MODE=jwt: a third of a second more
    # at every process start otherwise, on this machine.
    import jwt

log = logging.getLogger("session_svc.http.auth")

ADMIN_SCOPE = "sessions:admin"
REALM = "session_svc"
# What a route asks of the caller: nothing (``public``: /health); an admin when AUTH_OPS_OPEN is false
# (``ops``); an admin always (``admin``: stats); or to act only for the caller's own user (``user``).
Access = Literal["public", "ops", "admin", "user"]
# The algorithms each kind of key verifies. Fixed per key, never taken from the token: no ``none``, and
# an RSA/EC public key can never be used as an HMAC secret (the HS/RS confusion).
SECRET_ALGORITHMS = ("HS256",)
JWKS_ALGORITHMS = frozenset({"RS256", "ES256"})
# An API key shorter than this is refused at start-up: it could be guessed.
MIN_API_KEY_CHARS = 16
JWKS_FETCH_TIMEOUT_S = 3.0
_DIGEST_ENTRY = re.compile(r"sha256:([0-9a-fA-F]{64})")


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: the one user it may act for (None: any user), and whether it may read service-wide
    figures and the operations endpoints."""

    user: str | None
    admin: bool


TRUSTED_BACKEND = Principal(None, admin=True)


class Denied(ServiceError):
    """401 (no or bad credentials) or 403 (not allowed), answered by the middleware like every
    ``ServiceError``, with the RFC 6750 challenge: ``error`` is absent when no credentials were sent at
    all (section 3.1)."""

    def __init__(self, status: Literal[401, 403], detail: str, error: str | None = None) -> None:
        challenge = f'Bearer realm="{REALM}"'
        if error:
            # error_description allows no '"' nor '\' (RFC 6750, 3): the details here are fixed texts.
            challenge += f', error="{error}", error_description="{detail}"'
        super().__init__(detail, {"WWW-Authenticate": challenge})
        self.status = status
        self.error = error


def _invalid(detail: str) -> Denied:
    return Denied(401, detail, "invalid_token")


def _forbidden(detail: str) -> Denied:
    return Denied(403, detail, "insufficient_scope")


def bearer_token(request: web.Request) -> str:
    """The bearer credentials of ``request`` (RFC 6750, 2.1; never a query parameter), or 401."""
    header = request.headers.get("Authorization")
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        raise Denied(401, "Authentication required: send Authorization: Bearer <token>")
    token = token.strip()
    if not token:
        raise _invalid("The bearer token is empty")
    return token


# API keys ----------------------------------------------------------------------------------------------


def _digest(key: str) -> bytes:
    # surrogatepass: a header aiohttp could not decode must still hash (and fail), never raise.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def key_digests(keys: str, path: str = "") -> list[bytes]:
    """The SHA-256 digests of the keys in ``keys`` (comma-separated) and in the file at ``path`` (one a
    line, ``#`` comments). An entry ``sha256:<64 hex digits>`` is a key's digest already, so a keys file
    need not hold the keys themselves. Raises ValueError for a short key or when there is none."""
    entries = [k.strip() for k in keys.split(",")]
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"AUTH_API_KEYS_FILE {path}: {exc.strerror or exc}") from None
        entries += [line.split("#", 1)[0].strip() for line in text.splitlines()]
    digests: list[bytes] = []
    for entry in filter(None, entries):
        if m := _DIGEST_ENTRY.fullmatch(entry):
            digests.append(bytes.fromhex(m.group(1)))
        elif len(entry) < MIN_API_KEY_CHARS:
            raise ValueError(f"an API key is shorter than {MIN_API_KEY_CHARS} characters (too easy to guess)")
        else:
            digests.append(_digest(entry))
    if not digests:
        raise ValueError("AUTH_MODE=api_key but AUTH_API_KEYS and AUTH_API_KEYS_FILE hold no key")
    return digests


class ApiKeys:
    def __init__(self, digests: Iterable[bytes]) -> None:
        self.digests = tuple(dict.fromkeys(digests))

    async def verify(self, token: str) -> Principal:
        digest = _digest(token)
        found = False
        for known in self.digests:  # every one, whatever matched: the time says nothing about which
            found |= hmac.compare_digest(known, digest)
        if not found:
            raise _invalid("The API key is not valid")
        return TRUSTED_BACKEND


# JWT ---------------------------------------------------------------------------------------------------


class Jwks:
    """The signing keys published at ``AUTH_JWKS_URL``, fetched with aiohttp (never blocking the loop).

    Fetched at start-up (a failure there is logged, not fatal: the next token asks again), again in the
    background once older than ``max_age``, and at once for a token whose ``kid`` is unknown (a key
    rotation). Never more than one fetch at a time, nor one per ``min_interval`` seconds: a client
    sending random key ids cannot make the service hammer the endpoint. Keys whose algorithm is not
    RS256/ES256 are ignored. A successful fetch replaces the whole set (a withdrawn key stops working).
    """

    def __init__(self, url: str, max_age: float, min_interval: float) -> None:
        self.url = url
        self.max_age = max_age
        self.min_interval = min_interval
        self.keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -math.inf  # monotonic time of the last successful fetch
        self._tried_at = -math.inf  # ... of the last attempt
        self._running: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=JWKS_FETCH_TIMEOUT_S))
        await self.refresh()

    async def close(self) -> None:
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running
        if self._session is not None:
            await self._session.close()

    async def key_for(self, token: str) -> jwt.PyJWK:
        import jwt

        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            raise _invalid("The token is malformed") from None
        if not isinstance(kid, str):
            raise _invalid("The token names no signing key (kid)")
        key = self.keys.get(kid)
        if key is None:
            await self.refresh()
            key = self.keys.get(kid)
            if key is None:
                if self._fetched_at == -math.inf:
                    raise Unavailable("Cannot verify tokens now: the JWKS could not be fetched")
                raise _invalid("The token's signing key (kid) is not known")
        elif time.monotonic() - self._fetched_at > self.max_age:
            self._start_refresh()  # in the background: this request goes on with the key it has
        return key

    async def refresh(self) -> None:
        """Fetch the set now, unless a fetch is running (then wait for it) or one started less than
        ``min_interval`` ago (then do nothing)."""
        task = self._start_refresh()
        if task is not None:
            await asyncio.shield(task)

    def _start_refresh(self) -> asyncio.Task[None] | None:
        if self._running is None:
            if time.monotonic() - self._tried_at < self.min_interval:
                return None
            self._tried_at = time.monotonic()
            self._running = asyncio.create_task(self._fetch())
            self._running.add_done_callback(self._done)
        return self._running

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running = None

    async def _fetch(self) -> None:
        import jwt

        assert self._session is not None, "Jwks.start() first"
        try:
            async with self._session.get(self.url) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
            keys = {
                k.key_id: k
                for k in jwt.PyJWKSet.from_dict(data)
                if k.key_id and k.algorithm_name in JWKS_ALGORITHMS and k.public_key_use in (None, "sig")
            }
        except Exception as exc:  # whatever the endpoint answers, requests get a 401 or 503, never a 500
            log.warning("auth: fetching the JWKS at %s failed: %s", self.url, str(exc) or type(exc).__name__)
            return
        if not keys:
            log.warning("auth: the JWKS at %s holds no RS256/ES256 signing key with a kid", self.url)
        self.keys = keys
        self._fetched_at = time.monotonic()


def _why(exc: jwt.InvalidTokenError) -> str:
    """The ``detail`` (and ``error_description``) of a token PyJWT refused."""
    import jwt

    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"The token has no {exc.claim} claim"
    for kind, text in (
        (jwt.ExpiredSignatureError, "The token has expired"),
        (jwt.ImmatureSignatureError, "The token is not valid yet (nbf)"),
        (jwt.InvalidAudienceError, "The token is not meant for this service (aud)"),
        (jwt.InvalidIssuerError, "The token's issuer is not trusted (iss)"),
        (jwt.InvalidSignatureError, "The token's signature does not verify"),
        (jwt.InvalidAlgorithmError, "The token's algorithm is not accepted"),
    ):
        if isinstance(exc, kind):
            return text
    return "The token is malformed"


class JwtVerifier:
    """Verifies tokens, and remembers the verified ones until they expire (``AUTH_JWT_CACHE_SIZE``
    entries at most, emptied when full): an ES256 verification costs more than the rest of a request."""

    def __init__(self, settings: Settings, jwks: Jwks | None) -> None:
        self.jwks = jwks
        self.secret = settings.auth_jwt_secret.encode()
        self.audience = settings.auth_jwt_audience or None
        self.issuer = settings.auth_jwt_issuer or None
        self.leeway = settings.auth_jwt_leeway
        self.cache_size = settings.auth_jwt_cache_size
        self.options: jwt.types.Options = {"require": ["exp", "sub"], "verify_aud": self.audience is not None}
        self._verified: dict[str, tuple[Principal, float]] = {}

    async def verify(self, token: str) -> Principal:
        import jwt

        known = self._verified.get(token)
        if known is not None:
            if time.time() < known[1]:
                return known[0]
            del self._verified[token]
        key: jwt.PyJWK | bytes
        if self.jwks is None:
            key, algorithms = self.secret, SECRET_ALGORITHMS
        else:
            key = await self.jwks.key_for(token)
            algorithms = (key.algorithm_name,)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                options=self.options,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
            )
        except jwt.InvalidTokenError as exc:
            raise _invalid(_why(exc)) from None
        sub = claims["sub"]
        if not sub:
            raise _invalid("The token's subject (sub) is empty")
        scope = claims.get("scope")
        principal = Principal(sub, isinstance(scope, str) and ADMIN_SCOPE in scope.split())
        if self.cache_size:
            if len(self._verified) >= self.cache_size:
                self._verified.clear()
            self._verified[token] = (principal, float(claims["exp"]) + self.leeway)
        return principal


# The guard ---------------------------------------------------------------------------------------------


class Guard:
    def __init__(self, verifier: ApiKeys | JwtVerifier, ops_open: bool) -> None:
        self.verifier = verifier
        self.ops_open = ops_open

    async def authenticate(self, request: web.Request) -> Principal:
        return await self.verifier.verify(bearer_token(request))

    @staticmethod
    def authorize(principal: Principal, access: Access, user: str | None) -> None:
        """403 unless ``principal`` may do a request of ``access`` for ``user`` (None: no user)."""
        if principal.admin:
            return
        if access != "user":
            raise _forbidden(f"This needs an API key or a token with the {ADMIN_SCOPE} scope")
        if user != principal.user:  # a route of no user is closed to users (fail closed)
            raise _forbidden("user_id must be the token's subject (sub)")


AUTH = web.AppKey("auth", Guard)


def checks(settings: Settings, access: Access) -> bool:
    """Whether a route of ``access`` asks for credentials under ``settings``."""
    return asks(settings.auth_mode, settings.auth_ops_open, access)


def asks(auth_mode: str, ops_open: bool, access: Access) -> bool:
    if auth_mode == "none" or access == "public":
        return False
    return not (access == "ops" and ops_open)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ops(settings: Settings, handler: Handler) -> Handler:
    """``handler`` of an operations endpoint (/metrics, /docs, /openapi.json) as AUTH_OPS_OPEN says:
    itself when open, else behind an API key or an admin token."""
    if not checks(settings, "ops"):
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        guard = request.app[AUTH]
        guard.authorize(await guard.authenticate(request), "ops", None)
        return await handler(request)

    return guarded


async def _guard_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    jwks: Jwks | None = None
    verifier: ApiKeys | JwtVerifier
    if settings.auth_mode == "api_key":
        verifier = ApiKeys(key_digests(settings.auth_api_keys, settings.auth_api_keys_file))
    else:
        if settings.auth_jwks_url:
            s = settings
            jwks = Jwks(s.auth_jwks_url, s.auth_jwks_cache_seconds, s.auth_jwks_min_fetch_interval)
            await jwks.start()
        verifier = JwtVerifier(settings, jwks)
    app[AUTH] = Guard(verifier, settings.auth_ops_open)
    try:
        yield
    finally:
        if jwks is not None:
            await jwks.close()


def setup(app: web.Application) -> None:
    if app[SETTINGS].auth_mode != "none":
        # Before Redis and Postgres: a bad keys file stops the start at once.
        app.cleanup_ctx.insert(0, _guard_ctx)
