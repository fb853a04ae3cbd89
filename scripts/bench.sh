#!/usr/bin/env bash
# Benchmark the hot paths and the write-through on this machine; prints figures, asserts nothing.
# Uses its own key prefix and schema on the configured Redis/PostgreSQL and removes them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/services.sh ensure
command -v wrk >/dev/null || { echo "bench: installing wrk" >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
exec .venv/bin/python -m bench.run "$@"
