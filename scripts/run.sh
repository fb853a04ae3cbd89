#!/usr/bin/env bash
# The one command that runs the service: set up the venv, make sure Redis and PostgreSQL answer,
# migrate, then run the write-through worker and the API. Settings come from the environment
# (REDIS_URL, DATABASE_URL, SERVICE_PORT, ...; see config/session_svc.env.example) and pass through.
#
# The worker does not exit on Redis or Postgres errors (it reconnects, and restarts its own arq loop);
# should it still die (a bug, the OOM killer, a kill -9), it is started again here within
# RUN_WORKER_RESTART_SECONDS (default 2), so the API never acknowledges writes with nothing behind it
# for longer than that. The outbox keeps those writes meanwhile: nothing acknowledged is lost.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/services.sh ensure
export PATH="$PWD/.venv/bin:$PATH"
python -m session_svc.migrate

restart_after=${RUN_WORKER_RESTART_SECONDS:-2}

# Supervises the worker: runs it, and runs it again whenever it exits, until told to stop.
supervise_worker() {
    local worker=""
    trap 'if [[ -n $worker ]]; then kill -TERM "$worker" 2>/dev/null || true; wait "$worker" || true; fi; exit 0' TERM INT
    while :; do
        python -m workers &
        worker=$!
        local status=0
        wait "$worker" || status=$?
        echo "run: worker exited (status $status); starting it again in ${restart_after}s" >&2
        sleep "$restart_after" &
        wait $! || true
    done
}

# Both run as children we wait on (not the API in the shell's foreground): bash defers traps while a
# foreground command runs, so a SIGTERM to this script would otherwise never reach the API.
supervise_worker &
supervisor=$!
python -m session_svc &
api=$!
trap 'kill -TERM "$api" "$supervisor" 2>/dev/null || true' INT TERM
# However we leave, stop the other process too and wait for both to finish shutting down.
trap 'kill -TERM "$api" "$supervisor" 2>/dev/null || true; wait' EXIT

# Stop when the API exits (the worker supervisor only ends when told to).
status=0
wait -n "$api" "$supervisor" || status=$?
echo "run: stopping (exit status $status)" >&2
exit "$status"
