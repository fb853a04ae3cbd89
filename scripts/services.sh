#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL named by REDIS_URL / ARQ_REDIS_URL / DATABASE_URL answer.
#   scripts/services.sh ensure   reuse what is running; otherwise install (apt) and start local ones
#   scripts/services.sh stop     stop only the private instances this script started under var/
# A server that already answers is never restarted, reconfigured or flushed: it may be shared.
# Sourcing this file (from a `set -euo pipefail` script) only defines the functions.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VAR_DIR="${SESSION_SVC_VAR_DIR:-$ROOT/var}"   # private instances live here (git-ignored)
WAIT_SECONDS="${SERVICES_WAIT_SECONDS:-30}"

die() { echo "services: $*" >&2; exit 1; }

# parse_url URL DEFAULT_PORT -> sets U_USER U_PASS U_HOST U_PORT U_PATH U_QUERY (userinfo kept raw).
parse_url() {
    local re='^[a-z0-9+.-]+://(([^:@/]*)(:([^@/]*))?@)?(\[[^]/]+\]|[^:/?]*)(:([0-9]+))?(/([^?]*))?(\?.*)?$'
    [[ $1 =~ $re ]] || die "cannot parse URL: $1"
    U_USER=${BASH_REMATCH[2]} U_PASS=${BASH_REMATCH[4]} U_HOST=${BASH_REMATCH[5]:-127.0.0.1}
    U_PORT=${BASH_REMATCH[7]:-$2} U_PATH=${BASH_REMATCH[9]} U_QUERY=${BASH_REMATCH[10]}
    U_HOST=${U_HOST#[} U_HOST=${U_HOST%]}
}

is_local() { [[ $1 == 127.0.0.1 || $1 == localhost || $1 == ::1 ]]; }
tcp_open() { timeout 2 bash -c ">/dev/tcp/$1/$2" 2>/dev/null; }

# Only runs when something is missing; apt-get update once per run.
apt_install() {
    [[ $EUID -eq 0 ]] || die "need root to apt-get install $* (or install it yourself)"
    command -v apt-get >/dev/null || die "$* not installed and no apt-get to install it"
    [[ -n ${APT_UPDATED:-} ]] || { apt-get update -qq; APT_UPDATED=1; }
    echo "services: installing $*" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

wait_for() {  # wait_for NAME CHECK-COMMAND...
    local name=$1 end=$((SECONDS + WAIT_SECONDS))
    shift
    until "$@"; do
        ((SECONDS < end)) || die "$name did not answer within ${WAIT_SECONDS}s"
        sleep 0.5
    done
}

# ---------------------------------------------------------------- Redis

rcli() {  # rcli HOST PORT PASSWORD ARGS...; an empty REDISCLI_AUTH would still send AUTH
    local host=$1 port=$2 pass=$3
    shift 3
    if [[ -n $pass ]]; then local -x REDISCLI_AUTH=$pass; fi
    timeout 3 redis-cli -h "$host" -p "$port" "$@" 2>/dev/null
}

redis_up() {  # redis_up HOST PORT PASSWORD; LOADING (still replaying the AOF) is not up yet
    if command -v redis-cli >/dev/null; then
        [[ $(rcli "$@" ping) == PONG ]]
    else
        tcp_open "$1" "$2"
    fi
}

# A running Redis is not ours to change, but say so if it breaks the durability promise.
redis_warnings() {  # HOST PORT PASSWORD
    command -v redis-cli >/dev/null || return 0
    local aof policy
    aof=$(rcli "$@" config get appendonly | sed -n 2p) || true
    policy=$(rcli "$@" config get maxmemory-policy | sed -n 2p) || true
    [[ $aof$policy != yesnoeviction && -n $aof ]] || return 0
    echo " (warning: appendonly=$aof maxmemory-policy=$policy; config/redis.conf wants yes/noeviction)"
}

ensure_redis() {
    parse_url "$1" 6379
    local host=$U_HOST port=$U_PORT pass=$U_PASS dir
    if redis_up "$host" "$port" "$pass"; then
        echo "redis at $host:$port: already running$(redis_warnings "$host" "$port" "$pass")"
        return
    fi
    is_local "$host" || die "redis at $host:$port does not answer and is not local: not starting it"
    command -v redis-server >/dev/null || apt_install redis-server redis-tools
    # The Debian package may start its own server on 6379; if that is our port, use it.
    if redis_up "$host" "$port" "$pass"; then
        echo "redis at $host:$port: started (by the redis-server package)$(redis_warnings "$host" "$port" "$pass")"
        return
    fi
    dir="$VAR_DIR/redis-$port"
    mkdir -p "$dir"
    local bind=("$host")
    [[ $host != localhost ]] || bind=(127.0.0.1 -::1)  # "-": skip ::1 if the host has no IPv6
    redis-server "$ROOT/config/redis.conf" --port "$port" --bind "${bind[@]}" --dir "$dir" \
        --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
        ${pass:+--requirepass "$pass"}
    wait_for "redis at $host:$port (log: $dir/redis.log)" redis_up "$host" "$port" "$pass"
    echo "redis at $host:$port: started (data: $dir)"
}

# ---------------------------------------------------------------- PostgreSQL

pg_up() {  # pg_up HOST PORT
    if command -v pg_isready >/dev/null; then
        pg_isready -q -h "$1" -p "$2" -t 3
    else
        tcp_open "$1" "$2"
    fi
}

# PostgreSQL refuses to run as root; run its tools as the postgres user from a directory it can read.
as_pg() {
    if [[ $EUID -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

pg_bin() {  # dir of the newest server binaries (Debian keeps initdb/pg_ctl off PATH); empty if none
    local f
    f=$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)
    [[ -x $f ]] || f=""
    [[ -n $f ]] || f=$(command -v initdb) || return 0
    dirname "$f"
}

# Debian cluster (pg_lsclusters) configured for PORT, printed as "VERSION NAME" (split on use).
pg_cluster_on_port() {
    command -v pg_lsclusters >/dev/null || return 0
    pg_lsclusters -h | awk -v p="$1" '$3 == p {print $1, $2; exit}'
}

# A cluster created seconds ago by our own apt-get install has Debian's password auth on TCP; give it
# the same trust-on-loopback setup as the private clusters (an existing cluster is never edited).
pg_trust_loopback() {
    local hba="/etc/postgresql/$1/$2/pg_hba.conf"
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
}

# Where our private cluster for PORT keeps its data: under var/, unless PostgreSQL (which refuses to
# run as root, so it runs as the postgres user) cannot reach var/ because the clone sits in a directory
# only root may enter (root's home and anything mktemp -d makes are 0700). Then under the postgres
# user's home, in a directory named after this clone, so two clones never share a cluster.
pg_data_dir() {  # PORT
    mkdir -p "$VAR_DIR"
    if [[ $EUID -eq 0 ]] && id postgres >/dev/null 2>&1 && ! as_pg test -x "$VAR_DIR"; then
        local home clone
        home=$(getent passwd postgres | cut -d: -f6)
        clone=$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)
        echo "$home/session_svc-$clone/postgres-$1"
    else
        echo "$VAR_DIR/postgres-$1"
    fi
}

pg_start_private() {  # HOST PORT USER -> initdb (once) and start a cluster (see pg_data_dir)
    local host=$1 port=$2 user=${3:-postgres} dir bin
    dir=$(pg_data_dir "$port")
    if [[ ! -f $dir/PG_VERSION ]]; then
        bin=$(pg_bin)
        mkdir -p "$dir"
        [[ $EUID -ne 0 ]] || chown postgres: "$dir"
        chmod 700 "$dir"
        as_pg test -w "$dir" || die "postgres user cannot write $dir (set SESSION_SVC_VAR_DIR elsewhere)"
        as_pg "$bin/initdb" -D "$dir" -U "$user" --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir.initdb.log" \
            || die "initdb failed, see $dir.initdb.log"
        printf "port = %s\nlisten_addresses = '%s'\nunix_socket_directories = '%s'\n" \
            "$port" "$host" "$dir" | as_pg tee -a "$dir/postgresql.conf" >/dev/null
    fi
    bin="/usr/lib/postgresql/$(cat "$dir/PG_VERSION")/bin"
    [[ -x $bin/pg_ctl ]] || bin=$(pg_bin)
    as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t "$WAIT_SECONDS" start >/dev/null \
        || die "postgres in $dir did not start, see $dir/server.log"
}

# Create the database named in DATABASE_URL if it is missing (harmless on a shared server).
pg_ensure_db() {
    parse_url "$1" 5432
    local db=$U_PATH maint exists
    [[ -n $db ]] || return 0
    command -v psql >/dev/null || return 0
    maint="postgresql://${U_USER:+$U_USER${U_PASS:+:$U_PASS}@}"
    [[ $U_HOST == *:* ]] && maint+="[$U_HOST]" || maint+="$U_HOST"
    maint+=":$U_PORT/postgres$U_QUERY"
    exists=$(PGCONNECT_TIMEOUT=5 psql -X -q -At -d "$maint" \
        -c "SELECT 1 FROM pg_database WHERE datname = '${db//\'/\'\'}'") \
        || die "cannot connect to postgres at $U_HOST:$U_PORT as ${U_USER:-$(id -un)} (check auth / pg_hba.conf)"
    if [[ -z $exists ]]; then
        PGCONNECT_TIMEOUT=5 psql -X -q -d "$maint" -c "CREATE DATABASE \"${db//\"/\"\"}\"" >/dev/null
        echo " (created database $db)"
    fi
}

ensure_postgres() {
    parse_url "$1" 5432
    local host=$U_HOST port=$U_PORT installed="" cluster state note
    if pg_up "$host" "$port"; then
        note=$(pg_ensure_db "$1")  # separate assignment so a failure stops the script
        echo "postgres at $host:$port: already running$note"
        return
    fi
    is_local "$host" || die "postgres at $host:$port does not answer and is not local: not starting it"
    if [[ -z $(pg_bin) ]]; then
        apt_install postgresql
        installed=1
    fi
    read -r -a cluster <<<"$(pg_cluster_on_port "$port")"
    if ((${#cluster[@]})); then
        [[ -z $installed ]] || pg_trust_loopback "${cluster[@]}"
        # The package may already have started it (then only the new pg_hba.conf needs loading).
        if pg_up "$host" "$port"; then
            pg_ctlcluster --skip-systemctl-redirect "${cluster[@]}" reload
        else
            pg_ctlcluster --skip-systemctl-redirect "${cluster[@]}" start
        fi
        state="started (cluster ${cluster[*]})"
    else
        pg_start_private "$host" "$port" "${U_USER:-postgres}"
        state="started (data: $(pg_data_dir "$port"))"
    fi
    wait_for "postgres at $host:$port" pg_up "$host" "$port"
    note=$(pg_ensure_db "$1")
    echo "postgres at $host:$port: $state$note"
}

# ---------------------------------------------------------------- entry points

# REDIS_URL, plus ARQ_REDIS_URL when it names another server -> array REDIS_URLS
redis_urls() {
    REDIS_URLS=("${REDIS_URL:-redis://127.0.0.1:6379/0}")
    [[ -n ${ARQ_REDIS_URL:-} ]] || return 0
    parse_url "${REDIS_URLS[0]}" 6379
    local main="$U_HOST:$U_PORT"
    parse_url "$ARQ_REDIS_URL" 6379
    [[ "$U_HOST:$U_PORT" == "$main" ]] || REDIS_URLS+=("$ARQ_REDIS_URL")
}

ensure() {
    local url
    redis_urls
    for url in "${REDIS_URLS[@]}"; do ensure_redis "$url"; done
    ensure_postgres "${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/test}"
}

# Stop private instances under var/ for the configured ports, found by their own pid/data files,
# so a shared server on the same port can never be hit.
stop() {
    local url dir pid
    redis_urls
    for url in "${REDIS_URLS[@]}"; do
        parse_url "$url" 6379
        dir="$VAR_DIR/redis-$U_PORT"
        [[ -f $dir/redis.pid ]] || continue
        pid=$(<"$dir/redis.pid")
        # A stale pid file may name an unrelated process now: only stop a redis-server on this port.
        [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *redis-server*:"$U_PORT"* ]] || continue
        kill "$pid"  # SIGTERM: Redis finishes the AOF fsync and exits
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
        echo "redis at $U_HOST:$U_PORT: stopped (data kept in $dir)"
    done
    parse_url "${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/test}" 5432
    dir=$(pg_data_dir "$U_PORT")
    if [[ -f $dir/postmaster.pid ]] && as_pg "$(pg_bin)/pg_ctl" -D "$dir" status >/dev/null; then
        as_pg "/usr/lib/postgresql/$(cat "$dir/PG_VERSION")/bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
        echo "postgres at $U_HOST:$U_PORT: stopped (data kept in $dir)"
    fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    case "${1:-}" in
        ensure) ensure ;;
        stop) stop ;;
        *) echo "usage: $0 ensure|stop" >&2; exit 2 ;;
    esac
fi
