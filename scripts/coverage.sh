#!/usr/bin/env bash
# Branch coverage of session_svc/ and workers/ over the pytest suite, subprocesses included: the worker
# processes of the fault tests, the API processes some tests start, and what scripts/run.sh runs. The
# settings are in pyproject.toml ([tool.coverage.*]; `patch = subprocess` makes every Python process the
# tests start measure itself). Slower than scripts/test.sh and not part of it. Extra arguments go to
# pytest (e.g. -m "not fault"); pytest's exit status is this script's.
# Output: a report per file, branch coverage per package, HTML in var/coverage/html.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

scripts/setup.sh
scripts/services.sh ensure
rm -rf var/coverage
mkdir -p var/coverage

status=0
coverage run -m pytest -q "$@" || status=$?
coverage combine -q
coverage report
coverage html -q
coverage json -q -o var/coverage/coverage.json
python - <<'PY'
import json
from collections import defaultdict

files = json.load(open("var/coverage/coverage.json"))["files"]
totals = defaultdict(lambda: defaultdict(int))
for path, data in files.items():
    package = path.split("/", 1)[0]
    for key in ("num_statements", "covered_lines", "num_branches", "covered_branches"):
        totals[package][key] += data["summary"][key]
print()
print(f"{'package':<12} {'lines':>16} {'branches':>16} {'combined':>9}")
for package, t in sorted(totals.items()):
    lines = f"{t['covered_lines']}/{t['num_statements']} {100 * t['covered_lines'] / t['num_statements']:.1f}%"
    branches = f"{t['covered_branches']}/{t['num_branches']} {100 * t['covered_branches'] / t['num_branches']:.1f}%"
    combined = 100 * (t["covered_lines"] + t["covered_branches"]) / (t["num_statements"] + t["num_branches"])
    print(f"{package:<12} {lines:>16} {branches:>16} {combined:>8.1f}%")
PY
exit "$status"
