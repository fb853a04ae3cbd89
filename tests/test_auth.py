"""AUTH_MODE api_key and jwt against the real Redis and Postgres: who gets in (401), who may do what
(403, and then nothing was written), and the RFC 6750 challenge; JWKS keys served by a tiny aiohttp
server of the test (RS256 and ES256 keys made with cryptography), rotated while the service runs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from session_svc import migrate
from session_svc.http import auth, openapi
from session_svc.settings import Settings
from tests.helpers import SESSIONS, Client, error_json, new_user, ok_object, session_url
from tests.servers import free_port, running_api
from tests.support import api_settings, delete_prefix, drop_schema, eventually, new_name

KEY = "key-" + uuid.uuid4().hex  # 36 characters
OTHER_KEY = "key-" + uuid.uuid4().hex
SECRET = "s" * 16 + uuid.uuid4().hex  # 48 bytes
AUDIENCE = "session-svc"
ISSUER = "https://idp.example"
CHALLENGE = 'Bearer realm="session_svc"'


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims(sub: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "exp": now + 600, "iat": now, "aud": AUDIENCE, "iss": ISSUER, **extra}


def hs256(sub: str, key: str = SECRET, **extra: Any) -> str:
    return jwt.encode(claims(sub, **extra), key, algorithm="HS256")


def admin_hs256(sub: str = "ops-console") -> str:
    return hs256(sub, scope="openid sessions:admin")


async def refused(resp: Any, status: int, error: str | None) -> str:
    """Asserts a JSON 401/403 with its challenge; returns the detail."""
    body = await error_json(resp, status)
    header = resp.headers["WWW-Authenticate"]
    if error is None:
        assert header == CHALLENGE
    else:
        assert header.startswith(f'{CHALLENGE}, error="{error}", error_description="'), header
    assert isinstance(body["detail"], str)
    return str(body["detail"])


async def redis_keys(redis: Any, prefix: str) -> set[str]:
    return {k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)}


# api_key --------------------------------------------------------------------------------------------


@pytest.fixture
async def keyed(make_client: Callable[..., Awaitable[Client]]) -> Client:
    return await make_client(auth_mode="api_key", auth_api_keys=f" {KEY} , {OTHER_KEY},")


async def test_every_route_class_needs_a_key(keyed: Client) -> None:
    """Session routes, the user listing, stats and a new session: 401 without credentials, with the bare
    challenge (no error: none were sent), before anything is parsed (a bad body or id is not a 400/404)."""
    sid = str(uuid.uuid4())
    user = new_user()
    requests = [
        keyed.post(SESSIONS, json={"user_id": user}),
        keyed.post(SESSIONS, data=b"not json"),
        keyed.get(session_url(sid), params={"user_id": user}),
        keyed.get(session_url("not-a-uuid")),
        keyed.put(session_url(sid), params={"user_id": user}, json={"title": "t"}),
        keyed.delete(session_url(sid), params={"user_id": user}),
        keyed.post(session_url(sid, "/messages"), params={"user_id": user}, json={"role": "user"}),
        keyed.get(session_url(sid, "/messages"), params={"user_id": user}),
        keyed.post(session_url(sid, "/memory"), params={"user_id": user}, json={}),
        keyed.get(session_url(sid, "/memories"), params={"user_id": user}),
        keyed.get(session_url(sid, "/summary"), params={"user_id": user}),
        keyed.get(f"/api/v1/users/{user}/sessions"),
        keyed.get(f"{SESSIONS}/stats"),
    ]
    for request in requests:
        detail = await refused(await request, 401, None)
        assert "Authorization: Bearer" in detail
    # Another scheme is no bearer credentials either.
    basic = {"Authorization": "Basic " + KEY}
    await refused(await keyed.get(f"{SESSIONS}/stats", headers=basic), 401, None)


async def test_a_wrong_key_is_401_invalid_token(keyed: Client) -> None:
    for token in (KEY[:-1], KEY + "x", "key-" + uuid.uuid4().hex, "\u00e9" * 20):
        resp = await keyed.get(f"{SESSIONS}/stats", headers=bearer(token))
        assert await refused(resp, 401, "invalid_token") == "The API key is not valid"
    resp = await keyed.get(f"{SESSIONS}/stats", headers={"Authorization": "Bearer "})
    await refused(resp, 401, "invalid_token")


async def test_a_key_is_a_trusted_backend_for_any_user(keyed: Client) -> None:
    """Both configured keys work, for any user_id, stats included."""
    alice, bob = new_user(), new_user()
    a = await ok_object(await keyed.post(SESSIONS, json={"user_id": alice}, headers=bearer(KEY)))
    b = await ok_object(await keyed.post(SESSIONS, json={"user_id": bob}, headers=bearer(OTHER_KEY)))
    resp = await keyed.post(
        session_url(b["session_id"], "/messages"),
        params={"user_id": bob},
        json={"role": "user", "content": "hi"},
        headers=bearer(KEY),
    )
    assert (await ok_object(resp))["sequence"] == 1
    listing = await ok_object(await keyed.get(f"/api/v1/users/{alice}/sessions", headers=bearer(KEY)))
    assert [s["session_id"] for s in listing["sessions"]] == [a["session_id"]]
    await ok_object(await keyed.get(f"{SESSIONS}/stats", headers=bearer(OTHER_KEY)))
    # The key acts for the user it names; ownership still holds: bob's session is not alice's.
    resp = await keyed.get(session_url(b["session_id"]), params={"user_id": alice}, headers=bearer(KEY))
    await error_json(resp, 404)


async def test_keys_from_a_file_with_comments_and_digests(
    make_client: Callable[..., Awaitable[Client]], tmp_path: Path
) -> None:
    hashed = "key-" + uuid.uuid4().hex
    path = tmp_path / "keys"
    digest = hashlib.sha256(hashed.encode()).hexdigest()
    path.write_text(f"# backends of the chat frontend\n{KEY}  # web\n\nsha256:{digest}\n")
    client = await make_client(auth_mode="api_key", auth_api_keys_file=str(path))
    for good in (KEY, hashed):
        await ok_object(await client.get(f"{SESSIONS}/stats", headers=bearer(good)))
    for bad in (
        OTHER_KEY,
        "# backends of the chat frontend",
        f"sha256:{hashlib.sha256(hashed.encode()).hexdigest()}",
    ):
        await refused(await client.get(f"{SESSIONS}/stats", headers=bearer(bad)), 401, "invalid_token")


def test_start_up_refuses_what_cannot_work(tmp_path: Path) -> None:
    for bad, why in (
        ({"auth_mode": "basic"}, "AUTH_MODE must be one of"),
        ({"auth_mode": "api_key"}, "needs AUTH_API_KEYS or AUTH_API_KEYS_FILE"),
        ({"auth_mode": "api_key", "auth_api_keys": " , "}, "needs AUTH_API_KEYS or AUTH_API_KEYS_FILE"),
        ({"auth_mode": "jwt"}, "exactly one of AUTH_JWT_SECRET"),
        ({"auth_mode": "jwt", "auth_jwt_secret": SECRET, "auth_jwks_url": "https://x/"}, "exactly one of"),
        ({"auth_mode": "jwt", "auth_jwt_secret": "short"}, "at least 32 bytes"),
        ({"auth_mode": "jwt", "auth_jwks_url": "file:///etc/keys"}, "http(s) URL"),
        ({"auth_ops_open": False}, "AUTH_OPS_OPEN=false needs AUTH_MODE"),
    ):
        with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
            Settings(**bad)
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="hold no key"):
        auth.key_digests("", str(empty))
    with pytest.raises(ValueError, match="No such file"):
        auth.key_digests("", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="shorter than 16"):
        auth.key_digests("abc123", "")


async def test_ops_endpoints_are_open_by_default_and_health_always(keyed: Client) -> None:
    for path in ("/health", "/health/detailed", "/metrics", "/docs", "/openapi.json"):
        resp = await keyed.get(path)
        assert resp.status in (200, 503), (path, resp.status)  # /health/detailed: 503 without a worker


async def test_closed_ops_endpoints_need_a_key_or_an_admin_token(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    keyed = await make_client(auth_mode="api_key", auth_api_keys=KEY, auth_ops_open=False)
    signed = await make_client(auth_mode="jwt", auth_jwt_secret=SECRET, auth_ops_open=False,
                               auth_jwt_audience=AUDIENCE, auth_jwt_issuer=ISSUER)  # fmt: skip
    assert (await keyed.get("/health")).status == 200
    assert (await signed.get("/health")).status == 200
    for path in ("/health/detailed", "/metrics", "/docs", "/openapi.json"):
        await refused(await keyed.get(path), 401, None)
        await refused(await keyed.get(path, headers=bearer(OTHER_KEY)), 401, "invalid_token")
        assert (await keyed.get(path, headers=bearer(KEY))).status in (200, 503), path
        await refused(await signed.get(path, headers=bearer(hs256(new_user()))), 403, "insufficient_scope")
        assert (await signed.get(path, headers=bearer(admin_hs256()))).status in (200, 503), path
    resp = await keyed.get("/openapi.json", headers=bearer(KEY))
    doc = await resp.json()
    assert doc["paths"]["/health/detailed"]["get"]["security"] == [{"bearer": []}]


# jwt HS256 ----------------------------------------------------------------------------------------------


@pytest.fixture
async def signed(make_client: Callable[..., Awaitable[Client]]) -> Client:
    return await make_client(
        auth_mode="jwt", auth_jwt_secret=SECRET, auth_jwt_audience=AUDIENCE, auth_jwt_issuer=ISSUER
    )


async def test_a_user_token_acts_for_its_subject_only(signed: Client) -> None:
    alice, bob = new_user(), new_user()
    a, b = bearer(hs256(alice)), bearer(hs256(bob))
    s = await ok_object(await signed.post(SESSIONS, json={"user_id": alice}, headers=a))
    sid = s["session_id"]
    msg = {"role": "user", "content": "hello"}
    await ok_object(
        await signed.post(session_url(sid, "/messages"), params={"user_id": alice}, json=msg, headers=a)
    )
    await ok_object(await signed.get(f"/api/v1/users/{alice}/sessions", headers=a))
    # bob's token naming alice: 403; naming himself on alice's session: the session is not his (404).
    for request in (
        signed.get(session_url(sid), params={"user_id": alice}, headers=b),
        signed.get(f"/api/v1/users/{alice}/sessions", headers=b),
        signed.post(SESSIONS, json={"user_id": alice}, headers=b),
    ):
        detail = await refused(await request, 403, "insufficient_scope")
        assert detail == "user_id must be the token's subject (sub)"
    await error_json(await signed.get(session_url(sid), params={"user_id": bob}, headers=b), 404)
    # Stats are for admins only.
    await refused(await signed.get(f"{SESSIONS}/stats", headers=a), 403, "insufficient_scope")
    # A bad user_id is still a 400 for the authenticated caller (parsing comes before authorization).
    await error_json(await signed.get(session_url(sid), params={"user_id": ""}, headers=a), 400)


async def test_a_forbidden_request_writes_nothing(signed: Client, redis: Any, settings: Settings) -> None:
    alice, mallory = new_user(), new_user()
    a, m = bearer(hs256(alice)), bearer(hs256(mallory))
    sid = (await ok_object(await signed.post(SESSIONS, json={"user_id": alice}, headers=a)))["session_id"]
    before = await redis_keys(redis, settings.key_prefix)
    stats = await ok_object(await signed.get(f"{SESSIONS}/stats", headers=bearer(admin_hs256())))
    q = {"user_id": alice}
    for request in (
        signed.post(
            session_url(sid, "/messages"), params=q, json={"role": "user", "content": "x"}, headers=m
        ),
        signed.post(
            session_url(sid, "/memory"), params=q, json={"memory_type": "custom", "content": "x"}, headers=m
        ),
        signed.put(session_url(sid), params=q, json={"title": "owned"}, headers=m),
        signed.delete(session_url(sid), params=q, headers=m),
        signed.post(SESSIONS, json={"user_id": alice, "title": "planted"}, headers=m),
    ):
        await refused(await request, 403, "insufficient_scope")
    assert await redis_keys(redis, settings.key_prefix) == before
    assert await ok_object(await signed.get(f"{SESSIONS}/stats", headers=bearer(admin_hs256()))) == stats
    session = await ok_object(await signed.get(session_url(sid), params=q, headers=a))
    assert (session["status"], session["title"], session["message_count"]) == ("active", "", 0)
    listing = await ok_object(await signed.get(f"/api/v1/users/{alice}/sessions", headers=a))
    assert listing["total"] == 1


async def test_an_admin_token_acts_for_any_user(signed: Client) -> None:
    alice = new_user()
    admin = bearer(admin_hs256())
    sid = (await ok_object(await signed.post(SESSIONS, json={"user_id": alice}, headers=admin)))["session_id"]
    resp = await signed.post(
        session_url(sid, "/messages"), params={"user_id": alice}, json={"role": "user", "content": "hi"},
        headers=admin,
    )  # fmt: skip
    assert (await ok_object(resp))["sequence"] == 1
    await ok_object(await signed.get(f"{SESSIONS}/stats", headers=admin))
    # sessions:admin must be a whole word of a space-separated scope.
    for scope in ("sessions:administrator", "sessions:admin-read", ["sessions:admin"]):
        token = bearer(hs256(new_user(), scope=scope))
        await refused(await signed.get(f"{SESSIONS}/stats", headers=token), 403, "insufficient_scope")


async def test_bad_tokens_are_401_invalid_token(signed: Client) -> None:
    user = new_user()
    now = int(time.time())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "The token has expired": hs256(user, exp=now - 60),  # beyond the 30 s leeway
        "The token is not valid yet (nbf)": hs256(user, nbf=now + 120),
        "The token is not meant for this service (aud)": hs256(user, aud="another-service"),
        "The token's issuer is not trusted (iss)": hs256(user, iss="https://evil.example"),
        "The token's signature does not verify": hs256(user, key="x" * 32 + "another secret"),
        "The token has no exp claim": jwt.encode(
            {k: v for k, v in claims(user).items() if k != "exp"}, SECRET
        ),
        "The token has no sub claim": jwt.encode(
            {k: v for k, v in claims(user).items() if k != "sub"}, SECRET
        ),
        "The token has no aud claim": jwt.encode(
            {k: v for k, v in claims(user).items() if k != "aud"}, SECRET
        ),
        "The token's algorithm is not accepted": jwt.encode(claims(user), rsa_key, algorithm="RS256"),
        "The token is malformed": "not.a.jwt",
    }
    # alg "none": an unsigned token must never pass.
    cases["The token's algorithm is not accepted "] = jwt.encode(claims(user), "", algorithm="none")
    for why, token in cases.items():
        resp = await signed.get(f"/api/v1/users/{user}/sessions", headers=bearer(token))
        assert await refused(resp, 401, "invalid_token") == why.strip(), why


async def test_the_leeway_allows_a_little_clock_skew(signed: Client) -> None:
    user = new_user()
    now = int(time.time())
    for token in (hs256(user, exp=now - 10), hs256(user, nbf=now + 10)):
        await ok_object(await signed.get(f"/api/v1/users/{user}/sessions", headers=bearer(token)))


async def test_a_remembered_token_still_expires(make_client: Callable[..., Awaitable[Client]]) -> None:
    """Verified tokens are cached, but only until their exp: the same token is refused afterwards."""
    client = await make_client(auth_mode="jwt", auth_jwt_secret=SECRET, auth_jwt_leeway=0)
    user = new_user()
    token = jwt.encode({"sub": user, "exp": int(time.time()) + 2}, SECRET)
    url = f"/api/v1/users/{user}/sessions"
    await ok_object(await client.get(url, headers=bearer(token)))
    await ok_object(await client.get(url, headers=bearer(token)))  # from the cache

    async def refused_now() -> bool:
        return (await client.get(url, headers=bearer(token))).status == 401

    await eventually(refused_now, "the cached token to expire", within=15)


def test_the_document_declares_the_bearer_scheme_when_auth_is_on() -> None:
    from openapi_spec_validator import validate

    assert "securitySchemes" not in openapi.document()["components"]
    for ops_open in (True, False):
        doc = openapi.document("jwt", ops_open)
        validate(doc)
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        paths = doc["paths"]
        assert paths["/health"]["get"]["security"] == []
        assert "401" not in paths["/health"]["get"]["responses"]
        stats = paths["/api/v1/sessions/stats"]["get"]
        assert stats["security"] == [{"bearer": []}] and {"401", "403"} <= set(stats["responses"])
        append = paths["/api/v1/sessions/{session_id}/messages"]["post"]
        assert {"401", "403"} <= set(append["responses"])
        detailed = paths["/health/detailed"]["get"]
        assert detailed["security"] == ([] if ops_open else [{"bearer": []}])


# jwt with a JWKS (RS256, ES256) --------------------------------------------------------------------------


@dataclass
class JwksServer:
    """What the identity provider publishes; ``keys`` can change while the service runs."""

    url: str = ""
    keys: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0


def public_jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    to_jwk = ECAlgorithm.to_jwk if alg == "ES256" else RSAAlgorithm.to_jwk
    return {**to_jwk(private.public_key(), as_dict=True), "kid": kid, "alg": alg, "use": "sig"}


def signed_by(private: Any, kid: str, alg: str, sub: str, **extra: Any) -> str:
    return jwt.encode(claims(sub, **extra), private, algorithm=alg, headers={"kid": kid})


def pem(private: Any) -> bytes:
    return bytes(private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


def hmac_signed(secret: bytes, payload: dict[str, Any], kid: str) -> str:
    """An HS256 token made by hand (PyJWT refuses to sign with a public key's PEM, as an attacker would)."""

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    signing_input = head + b"." + b64(json.dumps(payload).encode())
    return (signing_input + b"." + b64(hmac.new(secret, signing_input, hashlib.sha256).digest())).decode()


@pytest.fixture
async def jwks(aiohttp_server: Any) -> JwksServer:
    served = JwksServer()

    async def keys(request: web.Request) -> web.Response:
        served.requests += 1
        return web.json_response({"keys": served.keys})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", keys)
    server = await aiohttp_server(app)
    served.url = str(server.make_url("/.well-known/jwks.json"))
    return served


EC1 = ec.generate_private_key(ec.SECP256R1())
EC2 = ec.generate_private_key(ec.SECP256R1())
RSA1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def test_rs256_and_es256_tokens_from_the_jwks(
    jwks: JwksServer, make_client: Callable[..., Awaitable[Client]]
) -> None:
    oct_secret = b"o" * 32  # a symmetric key in the JWKS must never enable HS256
    oct_key = {"kty": "oct", "kid": "oct1", "k": base64.urlsafe_b64encode(oct_secret).rstrip(b"=").decode()}
    jwks.keys = [public_jwk(EC1, "ec1", "ES256"), public_jwk(RSA1, "rsa1", "RS256"), oct_key]
    client = await make_client(auth_mode="jwt", auth_jwks_url=jwks.url, auth_jwt_audience=AUDIENCE)
    user = new_user()
    url = f"/api/v1/users/{user}/sessions"
    for token in (signed_by(EC1, "ec1", "ES256", user), signed_by(RSA1, "rsa1", "RS256", user)):
        await ok_object(await client.get(url, headers=bearer(token)))
    forged = {
        # the EC key's kid on an RSA-signed token, and the reverse: the key decides the algorithm
        "The token's algorithm is not accepted": signed_by(RSA1, "ec1", "RS256", user),
        "The token's algorithm is not accepted ": signed_by(EC1, "rsa1", "ES256", user),
        # HS/RS confusion: an HMAC made with the public key's PEM as the secret
        "The token's algorithm is not accepted  ": hmac_signed(pem(RSA1), claims(user), kid="rsa1"),
        "The token's signature does not verify": signed_by(EC2, "ec1", "ES256", user),
        "The token names no signing key (kid)": jwt.encode(claims(user), EC1, algorithm="ES256"),
        "The token's signing key (kid) is not known": hmac_signed(oct_secret, claims(user), kid="oct1"),
    }
    for why, token in forged.items():
        assert (
            await refused(await client.get(url, headers=bearer(token)), 401, "invalid_token") == why.strip()
        )


async def test_an_unknown_kid_fetches_the_rotated_jwks_at_most_once_per_interval(
    jwks: JwksServer, make_client: Callable[..., Awaitable[Client]]
) -> None:
    jwks.keys = [public_jwk(EC1, "ec1", "ES256")]
    client = await make_client(auth_mode="jwt", auth_jwks_url=jwks.url, auth_jwks_min_fetch_interval=2)
    assert jwks.requests == 1  # at start-up
    user = new_user()
    url = f"/api/v1/users/{user}/sessions"
    rotated = signed_by(EC2, "ec2", "ES256", user)
    # A client sending random key ids, at once and one after the other: at most one fetch per interval.
    started = time.monotonic()
    answers = await asyncio.gather(
        *(client.get(url, headers=bearer(signed_by(EC2, uuid.uuid4().hex, "ES256", user))) for _ in range(20))
    )
    for _ in range(20):
        answers.append(await client.get(url, headers=bearer(signed_by(EC2, uuid.uuid4().hex, "ES256", user))))
    for a in answers:
        assert a.status == 401
        assert a.headers["WWW-Authenticate"].endswith(
            'error_description="The token\'s signing key (kid) is not known"'
        )
    assert jwks.requests <= 2 + int((time.monotonic() - started) / 2), jwks.requests
    # The identity provider rotates to ec2: the service finds it once the interval has passed.
    jwks.keys = [public_jwk(EC2, "ec2", "ES256")]

    async def accepted() -> bool:
        return (await client.get(url, headers=bearer(rotated))).status == 200

    await eventually(accepted, "the rotated key to be fetched", within=20, interval=0.2)
    # ec1 was withdrawn with that fetch.
    old = signed_by(EC1, "ec1", "ES256", new_user())
    await refused(await client.get(url, headers=bearer(old)), 401, "invalid_token")


async def test_an_unreachable_jwks_is_503_not_401(make_client: Callable[..., Awaitable[Client]]) -> None:
    """The service starts without its identity provider; tokens cannot be judged meanwhile: 503."""
    client = await make_client(
        auth_mode="jwt",
        auth_jwks_url=f"http://127.0.0.1:{free_port()}/jwks",
        auth_jwks_min_fetch_interval=0.1,
    )
    assert (await client.get("/health")).status == 200
    user = new_user()
    resp = await client.get(
        f"/api/v1/users/{user}/sessions", headers=bearer(signed_by(EC1, "ec1", "ES256", user))
    )
    body = await error_json(resp, 503)
    assert "JWKS" in body["detail"]


# The real process: nothing secret in its logs --------------------------------------------------------------


def _call(base: str, method: str, path: str, token: str | None, body: dict[str, Any] | None = None) -> int:
    headers = {"Content-Type": "application/json", **(bearer(token) if token is not None else {})}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.parametrize("mode", ["api_key", "jwt"])
def test_the_process_never_logs_a_key_or_a_token(mode: str, test_urls: Any, tmp_path: Path) -> None:
    """``python -m session_svc`` with every log on (ACCESS_LOG, DEBUG's aiohttp access log, LOG_LEVEL
    DEBUG): a good and a bad credential, on good and bad requests; neither appears in its output."""
    prefix, schema, port = new_name("tauth"), new_name("tauth_"), free_port()
    user = new_user()
    good = KEY if mode == "api_key" else hs256(user)
    bad = OTHER_KEY if mode == "api_key" else hs256(user, key="y" * 40)
    settings = api_settings(test_urls.redis_url, test_urls.database_url, schema, prefix, port)
    settings.update(ACCESS_LOG="true", DEBUG="true", LOG_LEVEL="DEBUG", AUTH_MODE=mode)
    settings.update(
        {"AUTH_API_KEYS": KEY}
        if mode == "api_key"
        else {"AUTH_JWT_SECRET": SECRET, "AUTH_JWT_AUDIENCE": AUDIENCE, "AUTH_JWT_ISSUER": ISSUER}
    )
    try:
        migrate.upgrade(Settings(database_url=test_urls.database_url, db_schema=schema))
        with running_api(settings, tmp_path) as api:
            assert _call(api.url, "POST", SESSIONS, None, {"user_id": user}) == 401
            assert _call(api.url, "POST", SESSIONS, bad, {"user_id": user}) == 401
            assert _call(api.url, "POST", SESSIONS, good, {"user_id": user}) == 200
            assert _call(api.url, "POST", SESSIONS, good, {"user_id": ""}) == 400
            assert _call(api.url, "GET", session_url(str(uuid.uuid4())) + f"?user_id={user}", good) == 404
            assert _call(api.url, "GET", f"/api/v1/users/{user}/sessions", bad) == 401
        log = api.log.read_text()
    finally:
        delete_prefix(test_urls.redis_url, prefix)
        drop_schema(test_urls.database_url, schema)
    assert '"status":401' in log and '"status":200' in log, log[-2000:]  # the access log was on
    for secret in (good, bad, *good.split("."), *bad.split("."), SECRET):
        assert secret not in log, f"{secret[:8]}... in the log"


def test_check_config_masks_keys_and_secrets() -> None:
    from session_svc.cli import effective_settings

    shown = dict(effective_settings(Settings(auth_mode="api_key", auth_api_keys=KEY, auth_jwt_secret=SECRET)))
    assert shown["AUTH_API_KEYS"] == "***" and shown["AUTH_JWT_SECRET"] == "***"
    assert KEY not in str(shown) and SECRET not in str(shown)
    assert shown["AUTH_MODE"] == "api_key"


async def test_an_old_jwks_is_fetched_again_in_the_background(
    jwks: JwksServer, make_client: Callable[..., Awaitable[Client]]
) -> None:
    """Once older than AUTH_JWKS_CACHE_SECONDS, the set is fetched again while requests go on with the
    keys they have; a key the identity provider withdrew then stops working."""
    jwks.keys = [public_jwk(EC1, "ec1", "ES256")]
    client = await make_client(
        auth_mode="jwt", auth_jwks_url=jwks.url, auth_jwks_cache_seconds=0.5, auth_jwks_min_fetch_interval=0.1
    )
    user = new_user()
    url = f"/api/v1/users/{user}/sessions"
    jwks.keys = [public_jwk(EC2, "ec2", "ES256")]  # ec1 withdrawn; the service does not know yet

    async def ec1_refused() -> bool:
        # A new token each time (jti), so the cache of verified tokens does not answer.
        token = signed_by(EC1, "ec1", "ES256", user, jti=uuid.uuid4().hex)
        resp = await client.get(url, headers=bearer(token))
        assert resp.status in (200, 401), resp.status
        return resp.status == 401

    await eventually(ec1_refused, "the withdrawn key to be dropped", within=20, interval=0.2)
    assert jwks.requests >= 2
    await ok_object(await client.get(url, headers=bearer(signed_by(EC2, "ec2", "ES256", user))))
