#!/usr/bin/env bash
# The one command that runs every check, in CI's order, stopping at the first failure:
# setup, services, lint, formatting, types, the documentation site, tests. Extra arguments go to pytest (e.g. -x -k store).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

step() {  # step NAME COMMAND...: run it, and name the step if it fails
    local name=$1
    shift
    echo "==> $name"
    "$@" || { local rc=$?; echo "FAILED: $name (exit $rc)" >&2; exit "$rc"; }
}

step setup scripts/setup.sh
step services scripts/services.sh ensure
step tools scripts/tools.sh
step "ruff check" ruff check session_svc workers tests
# ruff is pinned, so its formatting is deterministic: run `ruff format session_svc workers tests` to fix.
step "ruff format" ruff format --check session_svc workers tests
step mypy mypy --strict session_svc workers
# The tests too: helpers and fixtures strictly, test bodies with the relaxations in pyproject.toml.
step "mypy tests" mypy tests
# The site (mkdocs.yml) builds with no warning: every internal link and #anchor of docs/ resolves.
step docs env NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir var/site
step pytest pytest -q "$@"
