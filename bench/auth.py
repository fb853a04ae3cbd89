"""``scripts/bench.sh auth``: what authentication costs on the hot path. The append route with
AUTH_MODE none, api_key, jwt HS256 and jwt ES256 (keys from a JWKS served by this process), the JWT
rows with and without the cache of verified tokens; a fresh API process per variant, interleaved round
by round, medians, each as a ratio of ``none`` measured in the same run. Then the cost of one
verification alone (PyJWT in this process), which is what the cache saves."""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from bench.common import PORT, POST_LUA, PY, ROOT, http, stop, wait_http, wrk

USER = "bench"


def _jwks_server(jwk: dict[str, Any]) -> tuple[ThreadingHTTPServer, str]:
    body = json.dumps({"keys": [jwk]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", PORT + 5), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{PORT + 5}/jwks.json"


def _verify_cost(token: str, key: Any, algorithm: str, n: int = 2000) -> float:
    """Microseconds per ``jwt.decode`` of ``token`` (median of 5 batches)."""
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            jwt.decode(token, key, algorithms=[algorithm], options={"require": ["exp", "sub"]})
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def auth_table(env: dict[str, str]) -> None:
    rounds = int(os.environ.get("BENCH_REPEATS", "3"))
    duration = os.environ.get("BENCH_ROW_DURATION", "5s")
    key = secrets.token_urlsafe(32)
    secret = secrets.token_urlsafe(48)
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = {**ECAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "bench", "alg": "ES256"}
    exp = int(time.time()) + 24 * 3600
    hs = jwt.encode({"sub": USER, "exp": exp}, secret, algorithm="HS256")
    es = jwt.encode({"sub": USER, "exp": exp}, private, algorithm="ES256", headers={"kid": "bench"})
    server, jwks_url = _jwks_server(jwk)
    hs_env = {"AUTH_MODE": "jwt", "AUTH_JWT_SECRET": secret}
    es_env = {"AUTH_MODE": "jwt", "AUTH_JWKS_URL": jwks_url}
    variants: dict[str, tuple[dict[str, str], str | None]] = {
        "AUTH_MODE=none": ({}, None),
        "api_key": ({"AUTH_MODE": "api_key", "AUTH_API_KEYS": key}, key),
        "jwt HS256 (cache of verified tokens)": (hs_env, hs),
        "jwt HS256, AUTH_JWT_CACHE_SIZE=0": ({**hs_env, "AUTH_JWT_CACHE_SIZE": "0"}, hs),
        "jwt ES256 from a JWKS (cache)": (es_env, es),
        "jwt ES256, AUTH_JWT_CACHE_SIZE=0": ({**es_env, "AUTH_JWT_CACHE_SIZE": "0"}, es),
    }
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    print(
        f"\n# authentication: POST message, wrk -t1 -c64 -d{duration}, one API process per variant, "
        f"median of {rounds} interleaved rounds"
    )
    try:
        for _ in range(rounds):
            for name, (extra, token) in variants.items():
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                lua = POST_LUA + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
                with tempfile.TemporaryFile() as log:
                    api = subprocess.Popen(
                        [PY, "-m", "session_svc"], env={**env, **extra}, cwd=ROOT, stderr=log
                    )
                    try:
                        wait_http()
                        sid = http("POST", "/api/v1/sessions", {"user_id": USER}, headers=headers)[
                            "session_id"
                        ]
                        path = f"/api/v1/sessions/{sid}/messages?user_id={USER}"
                        wrk(path, lua, duration="2s")  # warm-up
                        results[name].append(wrk(path, lua, duration=duration))
                    finally:
                        stop([api])
    finally:
        server.shutdown()
    base = statistics.median(r[0] for r in results["AUTH_MODE=none"])
    base_p99 = statistics.median(r[2] for r in results["AUTH_MODE=none"])
    print(f"{'variant':40} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs none':>8} {'p99 vs':>8}")
    for name, runs in results.items():
        rps, p50, p99 = (statistics.median(x[i] for x in runs) for i in range(3))
        print(f"{name:40} {rps:8.0f} {p50:8.2f} {p99:8.2f} {rps / base:7.2f}x {p99 / base_p99:7.2f}x")
    public = private.public_key()
    print("\none verification, PyJWT in this process (what the cache saves per request):")
    print(
        f"  HS256: {_verify_cost(hs, secret, 'HS256'):.1f} µs; ES256: {_verify_cost(es, public, 'ES256'):.1f} µs"
    )
