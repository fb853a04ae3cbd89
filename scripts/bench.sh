#!/usr/bin/env bash
# Benchmark the hot paths and the write-through on this machine; prints figures, asserts nothing.
# Uses its own key prefix and schema on the configured Redis/PostgreSQL and removes them afterwards.
# `scripts/bench.sh rediscost [--ref GITREF] [--conf config/redis.conf]`: a private Redis, the code of GITREF.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The Redis clients compared by `clients` (valkey-glide, coredis) are the optional extra `bench`, installed
# here only (setup.sh, and so CI, does without them); same stamp scheme as setup.sh.
stamp=.venv/.session_svc-bench-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -VV | tr -s ' ' _)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    if .venv/bin/pip install -q --disable-pip-version-check -e '.[dev,bench]'; then
        echo "$want" >"$stamp"
    else
        echo "bench: could not install the extra 'bench' (valkey-glide, coredis): their rows are skipped" >&2
    fi
fi
scripts/services.sh ensure
command -v wrk >/dev/null || { echo "bench: installing wrk" >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
exec .venv/bin/python -m bench.run "$@"
