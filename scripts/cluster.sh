#!/usr/bin/env bash
# A local Redis Cluster (3 masters, 3 replicas) from the Debian redis-server, for tests and for
# scripts/run.sh users who want one:
#   scripts/cluster.sh up            start it (idempotent: what runs is kept, what is missing is started)
#   scripts/cluster.sh down          stop the nodes this script started (by their recorded pids)
#   scripts/cluster.sh down --purge  ... and delete their data
#   scripts/cluster.sh status        print each node's pid and role
# Settings: CLUSTER_PORT (first port, default 7400; the nodes use CLUSTER_PORT..CLUSTER_PORT+5 and
# their cluster bus ports 10000 above), CLUSTER_NODE_TIMEOUT (ms, default 2000: a dead master is
# replaced by its replica within a few seconds), CLUSTER_HOST (127.0.0.1).
# Data, logs and pidfiles live under var/cluster-<port>/<node port>/ (SESSION_SVC_VAR_DIR moves var/).
# Then: REDIS_CLUSTER=true REDIS_URL=redis://127.0.0.1:<CLUSTER_PORT>/0 (printed by `up`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VAR_DIR="${SESSION_SVC_VAR_DIR:-$ROOT/var}"
BASE="${CLUSTER_PORT:-7400}"
HOST="${CLUSTER_HOST:-127.0.0.1}"
NODE_TIMEOUT="${CLUSTER_NODE_TIMEOUT:-2000}"
WAIT_SECONDS="${CLUSTER_WAIT_SECONDS:-30}"
DIR="$VAR_DIR/cluster-$BASE"
PORTS=()
for i in 0 1 2 3 4 5; do PORTS+=($((BASE + i))); done

die() { echo "cluster: $*" >&2; exit 1; }
[[ $BASE =~ ^[0-9]+$ ]] && ((BASE > 0 && BASE + 5 + 10000 < 65536)) \
    || die "CLUSTER_PORT must leave room for 6 ports and their bus ports (+10000), got $BASE"
command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
    || die "redis-server and redis-cli are required (apt-get install redis-server)"

cli() { timeout 5 redis-cli -h "$HOST" -p "$1" "${@:2}" 2>/dev/null; }

# The pid recorded for a node, if that process is still the redis-server started for that port.
live_pid() {
    local port=$1 pidfile="$DIR/$1/redis.pid" pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    # A recycled pid must not be killed: the process must be redis-server on this node's port.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "redis-server.*:$port" || return 1
    echo "$pid"
}

start_node() {
    local port=$1 d="$DIR/$1"
    mkdir -p "$d"
    if live_pid "$port" >/dev/null; then return 0; fi
    if timeout 1 bash -c ">/dev/tcp/$HOST/$port" 2>/dev/null; then
        die "port $port is taken by a process this script did not start; choose another CLUSTER_PORT"
    fi
    # The settings of config/redis.conf (AOF everysec, noeviction), plus cluster mode.
    redis-server --port "$port" --bind "$HOST" --dir "$d" --daemonize yes \
        --pidfile "$d/redis.pid" --logfile "$d/redis.log" \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout "$NODE_TIMEOUT" \
        --cluster-require-full-coverage no --cluster-replica-validity-factor 0 \
        --appendonly yes --appendfsync everysec --maxmemory-policy noeviction --save ""
}

wait_until() {  # wait_until WHAT COMMAND...
    local what=$1 end=$((SECONDS + WAIT_SECONDS))
    shift
    until "$@"; do
        ((SECONDS < end)) || die "$what within ${WAIT_SECONDS}s (logs: $DIR/*/redis.log)"
        sleep 0.2
    done
}

all_answer() {
    local p
    for p in "${PORTS[@]}"; do [[ $(cli "$p" ping) == PONG ]] || return 1; done
}

all_ok() {  # every node sees the cluster as ok, with 3 masters and 3 replicas known
    local p info
    for p in "${PORTS[@]}"; do
        info=$(cli "$p" cluster info | tr -d '\r')
        grep -q '^cluster_state:ok' <<<"$info" && grep -q '^cluster_known_nodes:6' <<<"$info" \
            && grep -q '^cluster_slots_assigned:16384' <<<"$info" || return 1
    done
    # three masters, and every replica's link to its master is up (in sync)
    [[ $(for p in "${PORTS[@]}"; do cli "$p" role | head -1; done | grep -c master) == 3 ]] || return 1
    for p in "${PORTS[@]}"; do
        info=$(cli "$p" info replication | tr -d '\r')
        grep -q '^role:slave' <<<"$info" || continue
        grep -q '^master_link_status:up' <<<"$info" || return 1
    done
}

up() {
    local p
    for p in "${PORTS[@]}"; do start_node "$p"; done
    wait_until "nodes did not answer" all_answer
    if [[ $(cli "$BASE" cluster info | tr -d '\r' | grep '^cluster_slots_assigned:') == "cluster_slots_assigned:0" ]]; then
        local addrs=()
        for p in "${PORTS[@]}"; do addrs+=("$HOST:$p"); done
        # The first three ports become masters, the last three their replicas.
        redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/create.log" 2>&1 \
            || die "redis-cli --cluster create failed (see $DIR/create.log)"
    fi
    wait_until "the cluster did not become ok" all_ok
    echo "cluster: up on $HOST:$BASE-$((BASE + 5)) (data in $DIR)"
    echo "REDIS_CLUSTER=true REDIS_URL=redis://$HOST:$BASE/0"
}

down() {
    local p pid pids=()
    for p in "${PORTS[@]}"; do
        if pid=$(live_pid "$p"); then
            kill "$pid"
            pids+=("$pid")
        fi
    done
    local end=$((SECONDS + WAIT_SECONDS))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            ((SECONDS < end)) || { kill -9 "$pid" 2>/dev/null || true; break; }
            sleep 0.1
        done
    done
    if [[ ${1:-} == --purge ]]; then rm -rf "$DIR"; fi
    echo "cluster: stopped ${#pids[@]} nodes on $HOST:$BASE-$((BASE + 5))"
}

status() {
    local p pid
    for p in "${PORTS[@]}"; do
        pid=$(live_pid "$p") || pid="-"
        echo "$HOST:$p pid=$pid role=$(cli "$p" role | head -1 || echo down)"
    done
}

case "${1:-}" in
up) up ;;
down) down "${2:-}" ;;
status) status ;;
*) die "usage: scripts/cluster.sh up|down [--purge]|status" ;;
esac
