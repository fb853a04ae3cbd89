#!/usr/bin/env bash
# Create .venv and install the project (editable, with dev tools). Idempotent and quiet: pip only
# runs when pyproject.toml or the interpreter changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "setup: python3 >= 3.11 required, found $(python3 --version 2>&1)" >&2; exit 1; }
    # Debian ships venv's pip bootstrap separately; a fresh machine may lack it.
    if ! python3 -c 'import ensurepip' 2>/dev/null && [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv .venv
fi

stamp=.venv/.session_svc-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -VV | tr -s ' ' _)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
    echo "$want" >"$stamp"
fi
