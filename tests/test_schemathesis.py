"""schemathesis against ``python -m session_svc``: every phase (examples, coverage, fuzzing, stateful)
and every check, bounded by ``schemathesis.toml`` to about 20-30 s here. The intended behaviours it
would report are dropped, each in its exact case, by ``tests/schemathesis_hooks.py``.

The service runs as in production (its own runner, so aiohttp's own errors are JSON too), on a free
port with its own key prefix and schema (migrated with ``python -m session_svc.migrate``, dropped after),
once per AUTH_MODE: with an API key, and with an admin JWT (it may act for the random user ids that
schemathesis makes up). With credentials, its ``ignored_auth`` check also sends each operation that
declares the bearer scheme without them, and expects a 401.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests import servers, support

ROOT = Path(__file__).resolve().parent.parent
ST = Path(sys.executable).with_name("st")


@dataclass(frozen=True)
class Service:
    url: str
    port: int
    log: Path
    token: str | None


API_KEY = "st-key-" + "k" * 24
JWT_SECRET = "st-secret-" + "s" * 32


def _auth(mode: str) -> tuple[dict[str, str], str | None]:
    """The service's settings for ``mode`` and the bearer token schemathesis sends."""
    if mode == "api_key":
        return {"AUTH_MODE": mode, "AUTH_API_KEYS": API_KEY}, API_KEY
    if mode == "jwt":
        admin = {"sub": "schemathesis", "scope": "sessions:admin", "exp": int(time.time()) + 3600}
        return {"AUTH_MODE": mode, "AUTH_JWT_SECRET": JWT_SECRET}, jwt.encode(admin, JWT_SECRET)
    return {}, None


@pytest.fixture(scope="module", params=["none", "api_key", "jwt"])
def service(
    request: pytest.FixtureRequest, test_urls: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    prefix, schema, port = support.new_name("st"), support.new_name("st_"), servers.free_port()
    settings = support.api_settings(test_urls.redis_url, test_urls.database_url, schema, prefix, port)
    extra, token = _auth(request.param)
    settings.update(extra)
    env = support.service_env(**settings)
    log = tmp_path_factory.mktemp("schemathesis") / "service.log"
    try:
        subprocess.run(
            [sys.executable, "-m", "session_svc.migrate"],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        with servers.running_api(settings, log.parent, log.stem) as api:
            yield Service(api.url, port, api.log, token)
    finally:
        support.delete_prefix(test_urls.redis_url, prefix)
        support.drop_schema(test_urls.database_url, schema)


def server_errors(log: Path) -> list[str]:
    return re.findall(r".* (?:ERROR|CRITICAL) .*|Traceback.*", log.read_text())


def test_schemathesis_finds_nothing(service: Service) -> None:
    command = [
        str(ST),
        "--config-file",
        str(ROOT / "schemathesis.toml"),
        "run",
        f"{service.url}/openapi.json",
    ]
    command += ["--checks", "all", "--phases", "examples,coverage,fuzzing,stateful", "--no-color"]
    if service.token is not None:
        command += ["-H", f"Authorization: Bearer {service.token}"]
    # From the repository root: the config names its hooks file relative to it.
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    # Every answer was right, and nothing it sent was logged as a server error either.
    assert server_errors(service.log) == []


def test_the_entry_point_answers_unparsable_requests_as_json(service: Service) -> None:
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"400", raw
    assert b"Content-Type: application/json" in head, raw
    assert json.loads(body)["detail"].startswith("Bad request: ")
    assert server_errors(service.log) == []
