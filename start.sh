#!/usr/bin/env bash
# Bring up edgecache (+ mock origin, + nginx for gzip) and print a URL to try. See --help.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./start.sh [--native] [--no-nginx] [--help]

Brings up edgecache and prints a URL to try.

With a running Docker engine (and docker compose v2):
  docker compose -f docker/docker-compose.yml up -d --build
  nginx (gzip) on :8080 -> edgecache -> UPSTREAM_URL, or the bundled mock origin.
  Stop it with: docker compose -f docker/docker-compose.yml down

Otherwise, natively (needs cargo; nginx is optional):
  builds with cargo build --release --bins, then runs in the foreground until Ctrl-C:
    mock-origin  on 127.0.0.1:3006, only when UPSTREAM_URL is empty
    edgecache    on LISTEN_ADDR (default 127.0.0.1:8000)
    nginx        on NGINX_PORT (default 8080) if nginx is installed; without it, no gzip
  Logs go to run/*.log (nginx's access log: run/nginx/logs/access.log).

Options:
  --native     run natively even when Docker is available
  --no-nginx   (native) do not start nginx
  -h, --help   show this help

Settings come from the environment and ./.env (see .env.example); the environment wins.
Used here: UPSTREAM_URL, LISTEN_ADDR, NGINX_PORT, CLEAR_CACHE_KEY, and
STARTUP_TIMEOUT (seconds each piece may take to accept connections, default 30).
EOF
}

force_native=0
use_nginx=1
for arg in "$@"; do
    case $arg in
        -h | --help) usage; exit 0 ;;
        --native) force_native=1 ;;
        --no-nginx) use_nginx=0 ;;
        *) echo "start.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")"

die() { echo "start.sh: $*" >&2; exit 1; }

# Read ./.env (KEY=VALUE lines, optional quotes and comments) into the environment.
# Variables that are already set win, as they do for the daemon.
load_dotenv() {
    local line key val
    local re='^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=[[:space:]]*(.*)$'
    local dq='^"(.*)"[[:space:]]*(#.*)?$' sq="^'(.*)'[[:space:]]*(#.*)?$"
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        [[ $line =~ $re ]] || continue
        key=${BASH_REMATCH[2]}
        val=${BASH_REMATCH[3]}
        if [[ $val =~ $dq || $val =~ $sq ]]; then
            val=${BASH_REMATCH[1]}
        else
            val=${val%%[[:space:]]#*}                 # trailing " # comment"
            val=${val%"${val##*[![:space:]]}"}        # trailing blanks
        fi
        [[ -v $key ]] || export "$key=$val"
    done <.env
}
if [[ -f .env ]]; then
    load_dotenv
fi

NGINX_PORT=${NGINX_PORT:-8080}
[[ $NGINX_PORT =~ ^[0-9]+$ ]] || die "NGINX_PORT must be a port number, got '$NGINX_PORT'"
export NGINX_PORT

admin_example() { # base URL
    echo "Admin: curl -X POST '$1/data?id=1' -H 'Clear-Cache: true' -H \"Clear-Cache-Key: \$CLEAR_CACHE_KEY\""
    if [[ -z ${CLEAR_CACHE_KEY:-} ]]; then
        echo "       (CLEAR_CACHE_KEY is empty, so admin requests get 403: set it in .env)"
    fi
}

# ---------------------------------------------------------------- Docker
if ((!force_native)) && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    if docker compose version >/dev/null 2>&1; then
        case ${UPSTREAM_URL:-} in
            *://localhost* | *://127.* | *://\[::1\]*)
                echo "Note: UPSTREAM_URL=$UPSTREAM_URL is the edgecache container itself inside Docker;" \
                    "for a service on this host use http://host.docker.internal:PORT." >&2 ;;
        esac
        docker compose -f docker/docker-compose.yml up -d --build
        base="http://localhost:$NGINX_PORT"
        echo
        echo "Running in Docker: nginx (gzip) $base -> edgecache -> ${UPSTREAM_URL:-mock-origin (bundled)}"
        echo "Try: curl -i '$base/data?id=1'"
        admin_example "$base"
        echo "Logs: docker compose -f docker/docker-compose.yml logs -f"
        echo "Stop: docker compose -f docker/docker-compose.yml down"
        exit 0
    fi
    echo "Note: Docker is running but 'docker compose' (v2) is missing; starting natively." >&2
fi

# ---------------------------------------------------------------- Native
command -v cargo >/dev/null 2>&1 || die "neither a running Docker engine nor cargo was found"

STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-30}
mkdir -p run

pids=() names=() logs=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((${#pids[@]})); then
        echo "Stopping ${names[*]} ..."
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_bg() { # name log command...
    local name=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 &
    pids+=("$!") names+=("$name") logs+=("$log")
}

# Report child $1 (index) as dead or stuck, show its log, and exit non-zero (cleanup stops the rest).
fail_child() { # index reason
    local i=$1 name=${names[$1]} state="still running"
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
        local status=0
        wait "${pids[$i]}" 2>/dev/null || status=$?
        state="exit status $status"
        unset "pids[$i]" "names[$i]"
    fi
    echo "start.sh: $name $2 ($state). Last lines of ${logs[$i]}:" >&2
    tail -n 25 "${logs[$i]}" >&2 || true
    exit 1
}

accepts() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_accepting() { # index host port
    local i=$1 host=$2 port=$3 deadline=$((SECONDS + STARTUP_TIMEOUT))
    until accepts "$host" "$port"; do
        kill -0 "${pids[$i]}" 2>/dev/null || fail_child "$i" "exited during startup"
        ((SECONDS < deadline)) || fail_child "$i" "did not accept connections on $host:$port within ${STARTUP_TIMEOUT}s"
        sleep 0.2
    done
    kill -0 "${pids[$i]}" 2>/dev/null || fail_child "$i" "exited during startup"
}

ensure_free() { # what host port
    if accepts "$2" "$3"; then
        die "$1: something already listens on $2:$3 (stop it, or change the address)"
    fi
}

# "host:port" or "[v6]:port" -> globals addr_host addr_port
split_addr() {
    local v6='^\[([^]]+)\]:([0-9]+)$' v4='^([^:]*):([0-9]+)$'
    if [[ $1 =~ $v6 || $1 =~ $v4 ]]; then
        addr_host=${BASH_REMATCH[1]} addr_port=${BASH_REMATCH[2]}
    else
        die "cannot parse address '$1' (expected host:port)"
    fi
}
# Where to connect for a listen host (wildcards -> loopback), and how to write it in a URL.
connect_host() { case $1 in '' | 0.0.0.0) echo 127.0.0.1 ;; '::') echo ::1 ;; *) echo "$1" ;; esac; }
url_host() { case $1 in 127.0.0.1) echo localhost ;; *:*) echo "[$1]" ;; *) echo "$1" ;; esac; }

echo "Building (cargo build --release --bins) ..."
cargo build --release --bins

# Upstream: the configured one, or the bundled mock origin.
if [[ -z ${UPSTREAM_URL:-} ]]; then
    mock_addr=127.0.0.1:3006
    split_addr "$mock_addr"
    ensure_free mock-origin "$addr_host" "$addr_port"
    start_bg mock-origin run/mock-origin.log target/release/mock-origin --listen "$mock_addr"
    wait_accepting $((${#pids[@]} - 1)) "$addr_host" "$addr_port"
    export UPSTREAM_URL="http://$mock_addr"
    upstream_desc="mock-origin $UPSTREAM_URL (bundled; set UPSTREAM_URL to use your own)"
else
    upstream_desc="$UPSTREAM_URL"
fi

# edgecache
export LISTEN_ADDR=${LISTEN_ADDR:-127.0.0.1:8000}
split_addr "$LISTEN_ADDR"
ec_host=$(connect_host "$addr_host") ec_port=$addr_port
ensure_free edgecache "$ec_host" "$ec_port"
start_bg edgecache run/edgecache.log target/release/edgecache
wait_accepting $((${#pids[@]} - 1)) "$ec_host" "$ec_port"
ec_url="http://$(url_host "$ec_host"):$ec_port"

# nginx (optional): gzip in front of edgecache
nginx_bin=
if ((use_nginx)); then
    nginx_bin=$(command -v nginx || true)
    if [[ -z $nginx_bin && -x /usr/sbin/nginx ]]; then
        nginx_bin=/usr/sbin/nginx
    fi
fi
if [[ -n $nginx_bin ]]; then
    prefix="$PWD/run/nginx"
    mkdir -p "$prefix/logs"
    ec_upstream="$ec_host:$ec_port"
    if [[ $ec_host == *:* ]]; then
        ec_upstream="[$ec_host]:$ec_port"
    fi
    # shellcheck disable=SC2016  # ${...} are literal placeholders here
    sed -e 's|\${NGINX_PORT}|'"$NGINX_PORT"'|g' \
        -e 's|\${EDGECACHE_UPSTREAM}|'"$ec_upstream"'|g' nginx.conf >"$prefix/nginx.conf"
    nginx_args=(-p "$prefix" -c "$prefix/nginx.conf" -g 'daemon off;')
    # Keep nginx away from its built-in error log path (not writable unprivileged), if it can.
    nginx_help=$("$nginx_bin" -h 2>&1 || true)
    if [[ $nginx_help == *'-e filename'* ]]; then
        nginx_args+=(-e stderr)
    fi
    ensure_free nginx 127.0.0.1 "$NGINX_PORT"
    start_bg nginx run/nginx.log "$nginx_bin" "${nginx_args[@]}"
    wait_accepting $((${#pids[@]} - 1)) 127.0.0.1 "$NGINX_PORT"
    try_url="http://localhost:$NGINX_PORT"
else
    try_url=$ec_url
fi

echo
echo "Running (logs in run/):"
for i in "${!pids[@]}"; do
    printf '  %-12s pid %-7s %s\n' "${names[$i]}" "${pids[$i]}" "${logs[$i]}"
done
echo "  upstream:    $upstream_desc"
echo "  edgecache:   $ec_url"
if [[ -n $nginx_bin ]]; then
    echo "  nginx:       $try_url (gzip) -> edgecache"
elif ((use_nginx)); then
    echo "Note: nginx is not installed, so responses are not gzipped; talking to edgecache directly."
fi
echo
echo "Try: curl -i '$try_url/data?id=1'"
admin_example "$ec_url"
echo "Ctrl-C stops everything."

# Stay in the foreground; if any piece exits, report it and stop the others.
while true; do
    wait -n || true
    for i in "${!pids[@]}"; do
        kill -0 "${pids[$i]}" 2>/dev/null || fail_child "$i" "exited unexpectedly"
    done
done
