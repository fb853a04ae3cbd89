#!/usr/bin/env bash
# The one command that runs the service: set up the venv, make sure Redis and PostgreSQL answer,
# migrate, then run the write-through worker and the API. Settings come from the environment
# (REDIS_URL, DATABASE_URL, SERVICE_PORT, ...; see config/session_svc.env.example) and pass through.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/services.sh ensure
export PATH="$PWD/.venv/bin:$PATH"
python -m session_svc.migrate

# Both run as children we wait on (not the API in the shell's foreground): bash defers traps while a
# foreground command runs, so a SIGTERM to this script would otherwise never reach the API.
python -m workers &
worker=$!
python -m session_svc &
api=$!
trap 'kill -TERM "$api" "$worker" 2>/dev/null || true' INT TERM
# However we leave, stop the other process too and wait for both to finish shutting down.
trap 'kill -TERM "$api" "$worker" 2>/dev/null || true; wait' EXIT

# Stop when the API exits, and also when the worker dies: an API without its worker would accept
# writes that never reach PostgreSQL.
status=0
wait -n "$api" "$worker" || status=$?
echo "run: stopping (exit status $status)" >&2
exit "$status"
