"""``session-svc``: one command-line entry point for the API, the worker, migrations and operators.

    session-svc api            serve the HTTP API (same as ``python -m session_svc``)
    session-svc worker         run the write-through worker (same as ``python -m workers``)
    session-svc migrate        apply the PostgreSQL migrations (idempotent)
    session-svc health         exit 0 if the API answers GET /health with 200, else 1
    session-svc check-config   validate the environment and print the effective settings

Every command reads its settings from the environment (``config/session_svc.env.example`` lists them
all). The worker is started as its own module rather than imported: the service package never imports
``workers``.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import fields
from urllib.parse import urlsplit, urlunsplit

from session_svc.settings import Settings

HEALTH_TIMEOUT_S = 5.0
# Settings whose whole value is a secret (CONSUL_TOKEN, AUTH_JWT_SECRET, AUTH_API_KEYS), printed as
# ``***`` when set.
_SECRETS = ("_token", "_password", "_secret", "_api_keys")


def _masked(value: str) -> str:
    """A URL with its password replaced by ``***`` (anything else unchanged)."""
    parts = urlsplit(value)
    if not parts.password:
        return value
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def effective_settings(settings: Settings) -> list[tuple[str, str]]:
    out = []
    for f in fields(settings):
        value = str(getattr(settings, f.name))
        secret = f.name.endswith(_SECRETS) and value
        out.append((f.name.upper(), "***" if secret else _masked(value)))
    return out


def _check_config() -> int:
    try:
        settings = Settings.from_env()
    except (ValueError, TypeError) as exc:
        print(f"session-svc: invalid configuration: {exc}", file=sys.stderr)
        return 2
    width = max(len(name) for name, _ in effective_settings(settings))
    for name, value in effective_settings(settings):
        print(f"{name.ljust(width)}  {value}")
    return 0


def _health(url: str | None) -> int:
    if url is None:
        settings = Settings.from_env()
        host = "127.0.0.1" if settings.service_host in ("0.0.0.0", "::", "") else settings.service_host
        url = f"http://{host}:{settings.service_port}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as resp:
            healthy = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"session-svc: {url}/health: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


def _exec_module(module: str) -> int:
    """Replace this process with ``python -m module`` (signals then reach it directly)."""
    os.execv(sys.executable, [sys.executable, "-m", module])
    return 1  # not reached


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="session-svc",
        description="Redis-first session service. Settings come from the environment; "
        "`session-svc check-config` prints them.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "api",
        help="serve the HTTP API",
        description="Serve the HTTP API on SERVICE_HOST:SERVICE_PORT with SERVICE_PROCESSES processes "
        "(0: one per core; above 1, this process supervises them) (REDIS_URL, DATABASE_URL, ...).",
    )
    sub.add_parser(
        "worker",
        help="run the write-through worker",
        description="Drain the Redis outbox into PostgreSQL and run the periodic jobs "
        "(REDIS_URL, ARQ_REDIS_URL, DATABASE_URL, FLUSH_*, SWEEP_EVERY_SECONDS, ...).",
    )
    sub.add_parser(
        "migrate",
        help="apply the PostgreSQL migrations (idempotent)",
        description="Bring DB_SCHEMA of DATABASE_URL to the latest revision; running it again is a no-op.",
    )
    health = sub.add_parser(
        "health",
        help="exit 0 if the API answers /health, else 1 (for container health checks)",
        description="GET /health of the API (SERVICE_HOST/SERVICE_PORT, or --url) within "
        f"{HEALTH_TIMEOUT_S:g} s: exit 0 on 200, 1 otherwise.",
    )
    health.add_argument("--url", help="base URL of the API (default: from SERVICE_HOST/SERVICE_PORT)")
    sub.add_parser(
        "check-config",
        help="validate the environment and print the effective settings (passwords and tokens masked)",
        description="Read every setting from the environment, validate it, and print the values in effect "
        "with passwords in URLs and tokens masked. Exit 2 if the configuration is invalid.",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "api":
        from session_svc.__main__ import main as api

        api()
        return 0
    if args.command == "worker":
        return _exec_module("workers")
    if args.command == "migrate":
        from session_svc.migrate import main as migrate

        migrate()
        return 0
    if args.command == "health":
        return _health(args.url)
    return _check_config()


def run() -> None:
    """The console script."""
    sys.exit(main())
