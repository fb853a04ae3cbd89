#!/usr/bin/env bash
# The programs the test suite runs besides Python: promtool and prometheus (the monitoring config and a
# real scrape), chromium (the API docs page, headless). Installed from Debian's packages when absent;
# never upgraded or touched when present.
set -euo pipefail

need=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
[[ ${#need[@]} -eq 0 ]] && exit 0

if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "tools: missing ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
    exit 1
fi
echo "tools: installing ${need[*]} from Debian's packages"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
