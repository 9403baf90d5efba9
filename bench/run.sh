#!/usr/bin/env bash
# Benchmark suite: edgecache beside nginx (proxy_cache + proxy_cache_lock), Varnish and a bare
# hyper server, all on loopback in front of the same mock origin. See bench/README.md.
#
#   bench/run.sh [--smoke] [--rounds N] [--duration S] [--no-build]
#                [--concurrency C] [--objects N] [--out DIR] [--only SECTIONS]
#
#   --smoke          quick check that the suite still works (CI): 1 round of 1 s, herd of 200,
#                    2,000 objects; the table goes to stdout only; exits 1 when edgecache's
#                    own numbers are broken (errors, more than one upstream call in the herd,
#                    cached objects not served from cache)
#   --rounds N       rounds of the interleaved throughput and herd runs (default 3); medians
#   --duration S     seconds per throughput run (default 10)
#   --no-build       do not run `cargo build --release --bins --examples` first
#   --concurrency C  herd size (default 1000; smoke 200)
#   --objects N      objects for the memory run (default 100000; smoke 2000)
#   --out DIR        where latest.md, the dated copy and latest.raw go (default bench/results)
#   --only SECTIONS  run only these sections, comma-separated: throughput, herd, memory (e.g.
#                    `--only memory` with BENCH_WITHOUT=nginx,varnish: edgecache's memory row
#                    alone, ~1 min); the partial table goes to stdout only
#
# nginx, varnishd and wrk are optional: missing ones are skipped with a note (the apt-get line
# to install them is printed). Without wrk the throughput runs use `herd --load` instead, a
# closed-loop keep-alive client with the same 64 connections; the table says so.
# Exit status: 0 = ran (and, with --smoke, edgecache's checks passed); 1 = a smoke check
# failed; 2 = setup problem (build, a server that does not start, bad arguments).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

say() { printf 'bench: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

smoke=0 rounds='' duration='' build=1 herd_c='' objects='' outdir=$here/results only=''
while [ $# -gt 0 ]; do
    case $1 in
        --smoke) smoke=1 ;;
        --rounds) [ $# -ge 2 ] || die "--rounds needs a number"; rounds=$2; shift ;;
        --rounds=*) rounds=${1#*=} ;;
        --duration) [ $# -ge 2 ] || die "--duration needs seconds"; duration=$2; shift ;;
        --duration=*) duration=${1#*=} ;;
        --concurrency) [ $# -ge 2 ] || die "--concurrency needs a number"; herd_c=$2; shift ;;
        --concurrency=*) herd_c=${1#*=} ;;
        --objects) [ $# -ge 2 ] || die "--objects needs a number"; objects=$2; shift ;;
        --objects=*) objects=${1#*=} ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; outdir=$2; shift ;;
        --out=*) outdir=${1#*=} ;;
        --only) [ $# -ge 2 ] || die "--only needs sections"; only=$2; shift ;;
        --only=*) only=${1#*=} ;;
        --no-build) build=0 ;;
        -h | --help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
if [ "$smoke" = 1 ]; then
    : "${rounds:=1}" "${duration:=1}" "${herd_c:=200}" "${objects:=2000}"
else
    : "${rounds:=3}" "${duration:=10}" "${herd_c:=1000}" "${objects:=100000}"
fi
for v in rounds duration herd_c objects; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, got '${!v}'"
done
declare -A run_section=([throughput]=1 [herd]=1 [memory]=1)
if [ -n "$only" ]; then
    run_section=()
    for s in ${only//,/ }; do
        case $s in
            throughput | herd | memory) run_section[$s]=1 ;;
            *) die "--only: unknown section '$s' (throughput, herd, memory)" ;;
        esac
    done
    [ ${#run_section[@]} -gt 0 ] || die "--only needs at least one section"
fi
section() { [ -n "${run_section[$1]:-}" ]; }

SIZES=(1024 102400)
HERD_DELAY_MS=200
CONNS=64
CC='cc=max-age%3D3600'
start_time=$SECONDS

# --- tools -----------------------------------------------------------------------------------
find_tool() { # name -> path or nothing
    local p
    p=$(command -v "$1" 2>/dev/null) && { echo "$p"; return; }
    for p in /usr/sbin/$1 /usr/local/sbin/$1; do
        [ -x "$p" ] && { echo "$p"; return; }
    done
    true
}
nginx_bin=$(find_tool nginx)
varnishd_bin=$(find_tool varnishd)
wrk_bin=$(find_tool wrk)
# BENCH_WITHOUT="nginx varnish wrk" (any of them) treats those as not installed, to try the
# fallbacks on a machine that has them.
without=${BENCH_WITHOUT:-}
for t in ${without//,/ }; do
    case $t in
        nginx) nginx_bin='' ;;
        varnish | varnishd) varnishd_bin='' ;;
        wrk) wrk_bin='' ;;
        *) die "BENCH_WITHOUT: unknown tool '$t' (nginx, varnish, wrk)" ;;
    esac
done
missing=() notes=()
[ -n "$nginx_bin" ] || missing+=(nginx)
[ -n "$varnishd_bin" ] || missing+=(varnish)
[ -n "$wrk_bin" ] || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
    say "not installed: ${missing[*]} (skipped). For the full comparison: apt-get install -y nginx varnish wrk"
fi
if [ -z "$wrk_bin" ]; then
    notes+=("wrk is not installed: throughput and latency come from \`herd --load\`, which costs more CPU than wrk on the shared cores.")
    loadgen="herd --load (wrk not installed; not comparable with wrk numbers)"
else
    loadgen="wrk -t2 -c$CONNS --latency"
fi

# --- build -----------------------------------------------------------------------------------
target=${CARGO_TARGET_DIR:-$root/target}
[[ $target = /* ]] || target=$root/$target
if [ "$build" = 1 ]; then
    say "cargo build --release --bins --examples"
    (cd "$root" && cargo build --release --bins --examples) || die "cargo build failed"
fi
edgecache_bin=$target/release/edgecache
origin_bin=$target/release/mock-origin
herd_bin=$target/release/examples/herd
for b in "$edgecache_bin" "$origin_bin" "$herd_bin"; do
    [ -x "$b" ] || die "missing $b (run without --no-build)"
done
start_time=$SECONDS # durations reported below exclude the build

# 1,000 herd connections on both sides, plus upstream connections: raise the fd limit.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then ulimit -n 65536; else ulimit -n "$hard"; fi
[ "$(ulimit -n)" -ge $((herd_c + 200)) ] || say "warning: open-file limit $(ulimit -n) is low for a herd of $herd_c"

# --- processes -------------------------------------------------------------------------------
rundir=$(mktemp -d "${TMPDIR:-/tmp}/edgecache-bench.XXXXXX")
chmod 755 "$rundir" # nginx workers and the Varnish child may run as another user
raw=$rundir/raw.log
: >"$raw"
pids=()        # everything we started, stopped in reverse order on exit
keep_logs=0

# shellcheck disable=SC2317 # called from traps
stop() { # pid: TERM, then KILL after 5 s
    local pid=$1 _
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
# shellcheck disable=SC2317
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop "${pids[i]}"; done
    if [ "$rc" -ne 0 ] || [ "$keep_logs" = 1 ]; then
        local logs=${TMPDIR:-/tmp}/edgecache-bench-last-logs
        rm -rf "$logs"
        mkdir -p "$logs"
        cp "$rundir"/*.log "$logs/" 2>/dev/null || true
        cp "$rundir"/nginx/*.log "$logs/" 2>/dev/null || true
        say "logs of this run: $logs"
    fi
    rm -rf "$rundir"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 2' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { "$herd_bin" --free-port; }
tail_log() { say "last lines of $1:"; tail -n 20 "$1" >&2 || true; }

wait_port() { # pid port log name
    local pid=$1 port=$2 log=$3 name=$4 deadline=$((SECONDS + 20))
    until port_open "$port"; do
        kill -0 "$pid" 2>/dev/null || { tail_log "$log"; return 1; }
        [ "$SECONDS" -lt "$deadline" ] || { tail_log "$log"; die "$name did not listen on 127.0.0.1:$port"; }
        sleep 0.05
    done
}

wait_line() { # pid log regex -> first capture group of the first matching line
    local pid=$1 log=$2 re=$3 deadline=$((SECONDS + 20)) got=''
    while [ -z "$got" ]; do
        kill -0 "$pid" 2>/dev/null || { tail_log "$log"; die "$(basename "$log" .log) exited at start"; }
        [ "$SECONDS" -lt "$deadline" ] || { tail_log "$log"; die "$(basename "$log" .log) did not start"; }
        got=$(sed -n "s|$re|\1|p" "$log" | head -n 1)
        [ -n "$got" ] || sleep 0.05
    done
    echo "$got"
}

# mock origin and the bare server pick their own ports (port 0) and print them.
"$origin_bin" --listen 127.0.0.1:0 >"$rundir/origin.log" 2>&1 &
origin_pid=$!
pids+=("$origin_pid")
origin_port=$(wait_line "$origin_pid" "$rundir/origin.log" '^mock-origin listening on http://127\.0\.0\.1:\([0-9]*\).*')

"$herd_bin" --serve 127.0.0.1:0 >"$rundir/bare.log" 2>&1 &
bare_pid=$!
pids+=("$bare_pid")
bare_port=$(wait_line "$bare_pid" "$rundir/bare.log" '^herd-bare listening on http://127\.0\.0\.1:\([0-9]*\).*')

# The others get a free port; a port taken in between is retried.
start_edgecache() {
    edge_port=$(free_port)
    (cd "$rundir" && exec env -i PATH="$PATH" \
        UPSTREAM_URL="http://127.0.0.1:$origin_port" \
        LISTEN_ADDR="127.0.0.1:$edge_port" \
        OPS_LISTEN_ADDR=off \
        DEFAULT_CACHE_EXPIRY_TIME_SECS=0 \
        DEFAULT_REFRESH_WINDOW_SECS=0 \
        CACHE_MAX_BYTES=2GiB \
        RUST_LOG=warn \
        NO_COLOR=1 \
        "$edgecache_bin") >"$rundir/edgecache.log" 2>&1 &
    edge_pid=$!
    pids+=("$edge_pid")
    wait_port "$edge_pid" "$edge_port" "$rundir/edgecache.log" edgecache
}

start_nginx() {
    nginx_port=$(free_port)
    local d=$rundir/nginx
    mkdir -p "$d"
    local user_line=''
    [ "$(id -u)" -ne 0 ] || user_line='user nobody nogroup;'
    getent group nogroup >/dev/null 2>&1 || user_line=${user_line/nogroup/nobody}
    cat >"$d/nginx.conf" <<EOF
# Written by bench/run.sh: a caching nginx as commonly deployed in front of an origin.
$user_line
worker_processes auto;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    sendfile on;
    # tcp_nopush stays off (nginx's default): with it, 100 KiB hits stall ~40 ms each on
    # loopback (TCP_CORK + delayed ACK), which would make nginx look 7x slower than it is.
    tcp_nodelay on;
    keepalive_timeout 65s;
    keepalive_requests 1000000;   # no reconnects in the middle of a run (default 1000)
    client_body_temp_path $d/client_body_temp;
    proxy_temp_path       $d/proxy_temp;
    fastcgi_temp_path     $d/fastcgi_temp;
    uwsgi_temp_path       $d/uwsgi_temp;
    scgi_temp_path        $d/scgi_temp;
    # Freshness comes from the origin's Cache-Control (no proxy_cache_valid: nginx honours
    # X-Accel-Expires, Cache-Control and Expires from the upstream by default).
    proxy_cache_path $d/cache levels=1:2 keys_zone=bench:64m max_size=4g inactive=1h use_temp_path=off;
    upstream origin {
        server 127.0.0.1:$origin_port;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$nginx_port backlog=4096;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 5s;
            proxy_cache_lock_age 5s;
            add_header X-Cache-Status \$upstream_cache_status;
        }
    }
}
EOF
    "$nginx_bin" -p "$d" -c "$d/nginx.conf" -e "$d/error.log" -g 'daemon off;' >"$rundir/nginx.log" 2>&1 &
    nginx_pid=$!
    pids+=("$nginx_pid")
    wait_port "$nginx_pid" "$nginx_port" "$rundir/nginx.log" nginx
}

start_varnish() {
    varnish_port=$(free_port)
    local jail=()
    # As root varnishd would drop to the 'varnish'/'vcache' users (unix jail); a benchmark on
    # a throw-away workdir runs it without privilege separation instead.
    [ "$(id -u)" -ne 0 ] || jail=(-j none)
    "$varnishd_bin" "${jail[@]}" -F -a "127.0.0.1:$varnish_port" -b "127.0.0.1:$origin_port" \
        -s malloc,1G -n "$rundir/varnish" >"$rundir/varnish.log" 2>&1 &
    varnish_pid=$!
    pids+=("$varnish_pid")
    wait_port "$varnish_pid" "$varnish_port" "$rundir/varnish.log" varnishd
}

systems=(bare edgecache)
declare -A port=([bare]=$bare_port)
started=0
for _ in 1 2 3; do
    if start_edgecache; then started=1; break; fi
done
[ "$started" = 1 ] || die "edgecache exited at start"
port[edgecache]=$edge_port
if [ -n "$nginx_bin" ]; then
    started=0
    for _ in 1 2 3; do
        if start_nginx; then started=1; break; fi
    done
    [ "$started" = 1 ] || die "nginx exited at start"
    systems+=(nginx)
    port[nginx]=$nginx_port
else
    notes+=("nginx is not installed: its rows are skipped.")
fi
if [ -n "$varnishd_bin" ]; then
    started=0
    for _ in 1 2 3; do
        if start_varnish; then started=1; break; fi
    done
    [ "$started" = 1 ] || die "varnishd exited at start"
    systems+=(varnish)
    port[varnish]=$varnish_port
else
    notes+=("Varnish is not installed: its rows are skipped.")
fi
caches=("${systems[@]:1}")
say "origin :$origin_port, bare :$bare_port, $(for s in "${caches[@]}"; do printf '%s :%s, ' "$s" "${port[$s]}"; done | sed 's/, $//')"

# --- helpers ---------------------------------------------------------------------------------
urlencode() {
    local s=$1 out='' c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
            [a-zA-Z0-9.~_-]) out+=$c ;;
            *) printf -v c '%%%02X' "'$c"; out+=$c ;;
        esac
    done
    printf '%s' "$out"
}
http_get() { # port path -> body (tiny HTTP/1.1 client on bash's /dev/tcp; no curl needed)
    local resp
    exec 3<>"/dev/tcp/127.0.0.1/$1"
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3
    resp=$(timeout 10 cat <&3) || true
    exec 3<&-
    printf '%s' "${resp#*$'\r\n\r\n'}"
}
origin_count() { # path?query as the origin sees it -> its request count
    local n
    n=$(http_get "$origin_port" "/stats?path=$(urlencode "$1")")
    [[ $n =~ ^[0-9]+$ ]] || die "mock-origin /stats answered '$n'"
    echo "$n"
}
json_get() { # json key -> value
    sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<<"$1"
}
median() { # "n1 n2 ..." -> median (mean of the middle two for an even count); '' if none
    tr ' ' '\n' <<<"$*" | sort -g | awk '/^-?[0-9.]+$/ {v[++n] = $1} END {
        if (n == 0) exit; if (n % 2) printf "%g", v[(n+1)/2]; else printf "%g", (v[n/2]+v[n/2+1])/2 }'
}
fmt() { # number [decimals] -> formatted, or – when empty
    if [ -z "$1" ]; then printf '–'; else LC_ALL=C printf "%.${2:-2}f" "$1"; fi
}
ratio() { # a b -> a/b with 2 decimals, or –
    if [ -z "$1" ] || [ -z "$2" ]; then printf '–'; else awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) printf "–"; else printf "%.2f", a / b }'; fi
}
thousands() { # integer-ish -> 12,345
    if [ -z "$1" ]; then printf '–'; return; fi
    LC_ALL=C printf '%.0f' "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'
}
rotate() { # k items... -> items rotated left by k
    local k=$1
    shift
    local n=$# i
    local a=("$@")
    for ((i = 0; i < n; i++)); do printf '%s\n' "${a[(i + k) % n]}"; done
}
children() { # pid -> its child pids, from /proc (no pgrep needed)
    local f stat fields
    for f in /proc/[0-9]*/stat; do
        { read -r stat <"$f"; } 2>/dev/null || continue
        read -ra fields <<<"${stat##*) }" # state ppid ...
        [ "${fields[1]}" != "$1" ] || { f=${f#/proc/}; echo "${f%/stat}"; }
    done
}
mem_kb() { # system -> kB: VmRSS of edgecache / the Varnish child, PSS sum of nginx's processes
    local sys=$1 p total=0 kb
    case $sys in
        edgecache) awk '/^VmRSS:/ {print $2}' "/proc/$edge_pid/status" 2>/dev/null || true ;;
        varnish)
            p=$(children "$varnish_pid" | head -n 1)
            [ -z "$p" ] || awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true
            ;;
        nginx)
            for p in "$nginx_pid" $(children "$nginx_pid"); do
                kb=$(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || true)
                total=$((total + ${kb:-0}))
            done
            echo "$total"
            ;;
    esac
}
origin_path() { # system size tag -> path?query for the throughput key
    if [ "$1" = bare ]; then echo "/bytes?size=$2"; else echo "/bytes?size=$2&$CC&tp=$1"; fi
}

# --- 1. hit throughput -----------------------------------------------------------------------
declare -A tp_rps tp_p50 tp_p99 tp_err tp_origin
run_load() { # system size -> "rps p50_ms p99_ms errors"
    local sys=$1 size=$2 url out
    url="http://127.0.0.1:${port[$sys]}$(origin_path "$sys" "$size")"
    if [ -n "$wrk_bin" ]; then
        out=$(timeout $((duration + 60)) "$wrk_bin" -t2 -c"$CONNS" -d"${duration}s" --latency "$url" 2>&1) || true
        printf '== wrk %s size=%s\n%s\n' "$sys" "$size" "$out" >>"$raw"
        awk -f "$here/wrk_summary.awk" <<<"$out" ||
            { say "wrk against $sys failed:"; printf '%s\n' "$out" >&2; echo "- - - 1"; }
    else
        out=$(timeout $((duration + 60)) "$herd_bin" --load --url "$url" --connections "$CONNS" --duration "$duration" 2>&1) || true
        printf '== herd --load %s size=%s\n%s\n' "$sys" "$size" "$out" >>"$raw"
        local line
        line=$(grep '^{' <<<"$out" | tail -n 1)
        if [ -n "$line" ]; then
            echo "$(json_get "$line" rps) $(json_get "$line" p50_ms) $(json_get "$line" p99_ms) $(json_get "$line" errors)"
        else
            say "herd --load against $sys failed: $out"
            echo "- - - 1"
        fi
    fi
}

if section throughput; then
say "warming the throughput keys"
for sys in "${systems[@]}"; do
    for size in "${SIZES[@]}"; do
        for _ in 1 2; do
            "$herd_bin" --sequence 1 --url "http://127.0.0.1:${port[$sys]}$(origin_path "$sys" "$size")" >>"$raw" 2>&1 ||
                die "warming $sys failed"
        done
    done
done
for sys in "${caches[@]}"; do
    for size in "${SIZES[@]}"; do
        tp_origin[$sys,$size]=$(origin_count "$(origin_path "$sys" "$size")")
    done
done

for ((r = 1; r <= rounds; r++)); do
    for size in "${SIZES[@]}"; do
        mapfile -t order < <(rotate $((r - 1)) "${systems[@]}")
        for sys in "${order[@]}"; do
            say "round $r/$rounds: throughput, $sys, $size B, ${duration}s"
            read -r rps p50 p99 err < <(run_load "$sys" "$size")
            tp_rps[$sys,$size]+=" $rps"
            tp_p50[$sys,$size]+=" $p50"
            tp_p99[$sys,$size]+=" $p99"
            tp_err[$sys,$size]=$((${tp_err[$sys,$size]:-0} + err))
        done
    done
done
# Origin calls for the hit keys during the runs (after warming): 0 = every request was a hit.
for sys in "${caches[@]}"; do
    for size in "${SIZES[@]}"; do
        tp_origin[$sys,$size]=$(($(origin_count "$(origin_path "$sys" "$size")") - ${tp_origin[$sys,$size]}))
    done
done
fi

# --- 2. thundering herd ----------------------------------------------------------------------
declare -A h_up h_min h_p50 h_p99 h_max h_gap h_sent h_err
if section herd; then
for ((r = 1; r <= rounds; r++)); do
    mapfile -t order < <(rotate $((r - 1)) "${systems[@]}")
    for sys in "${order[@]}"; do
        say "round $r/$rounds: herd of $herd_c, $sys"
        args=()
        if [ "$sys" = bare ]; then
            path="/bytes?size=1024&delay_ms=$HERD_DELAY_MS&herd=$r"
        else
            path="/bytes?size=1024&$CC&delay_ms=$HERD_DELAY_MS&herd=$sys-$r"
            args=(--stats-url "http://127.0.0.1:$origin_port/stats?path=$(urlencode "$path")")
        fi
        out=$(timeout 120 "$herd_bin" --url "http://127.0.0.1:${port[$sys]}$path" \
            --concurrency "$herd_c" "${args[@]}" 2>&1) || true
        printf '== herd %s round %s\n%s\n' "$sys" "$r" "$out" >>"$raw"
        line=$(grep '^{' <<<"$out" | tail -n 1 || true)
        if [ -z "$line" ]; then
            say "herd against $sys failed: $out"
            h_err[$sys]=$((${h_err[$sys]:-0} + herd_c))
            continue
        fi
        h_up[$sys]+=" $(json_get "$line" upstream_calls)"
        h_min[$sys]+=" $(json_get "$line" min_ms)"
        h_p50[$sys]+=" $(json_get "$line" p50_ms)"
        h_p99[$sys]+=" $(json_get "$line" p99_ms)"
        h_max[$sys]+=" $(json_get "$line" max_ms)"
        h_gap[$sys]+=" $(json_get "$line" p99_minus_min_ms)"
        h_sent[$sys]+=" $(json_get "$line" last_sent_ms)"
        h_err[$sys]=$((${h_err[$sys]:-0} + $(json_get "$line" errors)))
        sleep 0.5 # let the herd's connections close before the next system
    done
done
fi

# --- 3. memory per cached object -------------------------------------------------------------
declare -A m_before m_mid m_after m_rate m_err m_check m_disk
if section memory; then
for sys in "${caches[@]}"; do
    say "memory: $objects distinct 1 KiB objects into $sys"
    # Two halves, the RSS read after each: the second half's growth is what one more object
    # costs once the process is loaded (the first pays for the connections' buffers, the
    # allocator's first pages and the code paged in, whatever the count).
    half=$((objects / 2))
    tmpl1="/bytes?size=1024&$CC&mem=$sys&k={i}"
    tmpl2="/bytes?size=1024&$CC&mem=$sys&half=2&k={i}"
    sleep 1
    m_before[$sys]=$(mem_kb "$sys")
    m_rate[$sys]='' m_err[$sys]=0
    for part in 1 2; do
        if [ "$part" = 1 ]; then tmpl=$tmpl1 n=$half; else tmpl=$tmpl2 n=$((objects - half)); fi
        out=$(timeout 600 "$herd_bin" --sequence "$n" --inflight "$CONNS" \
            --url "http://127.0.0.1:${port[$sys]}$tmpl" 2>&1) || true
        printf '== sequence %s part %s\n%s\n' "$sys" "$part" "$out" >>"$raw"
        line=$(grep '^{' <<<"$out" | tail -n 1 || true)
        [ -n "${m_rate[$sys]}" ] || m_rate[$sys]=$(json_get "$line" rps)
        err=$(json_get "$line" errors)
        m_err[$sys]=$((${m_err[$sys]} + ${err:-$n}))
        sleep 1
        if [ "$part" = 1 ]; then m_mid[$sys]=$(mem_kb "$sys"); else m_after[$sys]=$(mem_kb "$sys"); fi
    done
    # Still cached? Fetch the first and last object of each half again: the origin must
    # have seen each exactly once.
    check=ok
    for p in "${tmpl1/\{i\}/0}" "${tmpl1/\{i\}/$((half - 1))}" "${tmpl2/\{i\}/0}" \
        "${tmpl2/\{i\}/$((objects - half - 1))}"; do
        "$herd_bin" --sequence 1 --url "http://127.0.0.1:${port[$sys]}$p" >>"$raw" 2>&1 || check="refetch failed"
        n=$(origin_count "$p")
        [ "$n" = 1 ] || check="${p##*&} fetched $n× from origin"
    done
    m_check[$sys]=$check
    if [ "$sys" = nginx ]; then
        # Cache files only (not the levels=1:2 directories): size, and blocks allocated.
        read -r files apparent allocated < <(find "$rundir/nginx/cache" -type f -printf '%s %b\n' |
            awk '{n++; s += $1; b += $2 * 512} END {printf "%d %d %d\n", n, s, b}')
        m_disk[$sys]="+ $((apparent / objects)) B per file on disk ($((allocated / objects)) B allocated; $files files)"
    fi
done
fi

# --- the report --------------------------------------------------------------------------------
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
mem_total=$(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git -C "$root" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ] || rev="$rev + uncommitted changes"
ver() { "$@" 2>&1 | head -n 1 | tr -d '\r' || true; }
versions="edgecache $rev; $(ver rustc --version 2>/dev/null || echo 'rustc ?')"
[ -z "$nginx_bin" ] || versions+="; $(ver "$nginx_bin" -v | sed 's/^nginx version: //')"
[ -z "$varnishd_bin" ] || versions+="; $(ver "$varnishd_bin" -V | sed 's/^varnishd (\(varnish-[^ ]*\).*/\1/')"
[ -z "$wrk_bin" ] || versions+="; wrk $(ver "$wrk_bin" -v | awk '{print $2}')"
now=$(date -u '+%Y-%m-%d %H:%M UTC')

report=$rundir/report.md
{
    if [ "$smoke" = 1 ]; then echo "# edgecache benchmark — SMOKE run (numbers meaningless)"; else echo "# edgecache benchmark"; fi
    echo
    echo "$now · \`bench/run.sh$([ "$smoke" = 1 ] && printf ' --smoke')$([ -z "$only" ] || printf ' --only %s' "$only") --rounds $rounds --duration $duration\` · $((SECONDS - start_time)) s after the build"
    echo
    echo "| machine | |"
    echo "|---|---|"
    echo "| CPUs (nproc) | $(nproc) × $cpu |"
    echo "| memory | $mem_total |"
    echo "| kernel | $(uname -sr) |"
    echo "| versions | $versions |"
    echo "| load generator | $loadgen, on the same CPUs as the servers |"
    echo
    echo "All servers on 127.0.0.1 in front of one mock-origin. **bare** is a minimal hyper server answering"
    echo "from memory (\`herd --serve\`): the ceiling for a hyper-based server on this machine."
    echo "Medians of $rounds round(s); within a round the systems run interleaved, in rotated order."
    echo
    if section throughput; then
    echo "## 1. Hit throughput (keep-alive, $CONNS connections, ${duration} s per run)"
    echo
    echo "| body | system | req/s | p50 ms | p99 ms | req/s ÷ bare | edgecache req/s ÷ this | errors | origin calls |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    for size in "${SIZES[@]}"; do
        label="$((size / 1024)) KiB"
        bare_rps=$(median "${tp_rps[bare,$size]}")
        edge_rps=$(median "${tp_rps[edgecache,$size]}")
        for sys in "${systems[@]}"; do
            rps=$(median "${tp_rps[$sys,$size]}")
            name=$sys
            [ "$sys" != edgecache ] || name="**edgecache**"
            origin=${tp_origin[$sys,$size]:-–}
            echo "| $label | $name | $(thousands "$rps") | $(fmt "$(median "${tp_p50[$sys,$size]}")") | $(fmt "$(median "${tp_p99[$sys,$size]}")") | $(ratio "$rps" "$bare_rps") | $(ratio "$edge_rps" "$rps") | ${tp_err[$sys,$size]:-–} | $origin |"
        done
    done
    echo
    echo "origin calls: requests that reached the origin for the benchmarked key during the runs (0 = all hits)."
    echo
    fi
    if section herd; then
    echo "## 2. Thundering herd ($herd_c simultaneous requests, one cold key, ${HERD_DELAY_MS} ms upstream)"
    echo
    echo "| system | upstream calls (per round) | leader ms | followers p50 ms | p99 ms | max ms | p99 − leader ms | p99 ÷ edgecache's | errors | last request sent at ms |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    edge_p99=$(median "${h_p99[edgecache]:-}")
    for sys in "${systems[@]}"; do
        ups=${h_up[$sys]:-}
        ups=${ups# }
        ups=${ups// /, }
        [ "$sys" != bare ] || ups="n/a (no cache: each request sleeps itself)"
        name=$sys
        [ "$sys" != edgecache ] || name="**edgecache**"
        p99=$(median "${h_p99[$sys]:-}")
        echo "| $name | ${ups:-–} | $(fmt "$(median "${h_min[$sys]:-}")" 1) | $(fmt "$(median "${h_p50[$sys]:-}")" 1) | $(fmt "$p99" 1) | $(fmt "$(median "${h_max[$sys]:-}")" 1) | $(fmt "$(median "${h_gap[$sys]:-}")" 1) | $(ratio "$p99" "$edge_p99") | ${h_err[$sys]:-–} | $(fmt "$(median "${h_sent[$sys]:-}")" 1) |"
    done
    echo
    echo "All $herd_c requests are released at once on already open connections; each one's latency runs"
    echo "from that instant to its last body byte. The leader is the first to finish (≈ the request that"
    echo "went upstream); p50/p99/max are the followers'. bare has no cache: every request sleeps its own"
    echo "${HERD_DELAY_MS} ms, so its p99 − leader is what finishing $herd_c requests at once costs on this machine"
    echo "(client included). last request sent at: when the client had written its last request — the"
    echo "client's own share of the spread."
    echo
    fi
    if section memory; then
    echo "## 3. Memory per cached object ($(thousands "$objects") distinct 1 KiB bodies)"
    echo
    echo "| system | measured | before MiB | after MiB | growth per object | second half, per object | also | load req/s | still cached |"
    echo "|---|---|---:|---:|---:|---:|---|---:|---|"
    for sys in "${caches[@]}"; do
        case $sys in
            edgecache) what="RSS" ;;
            varnish) what="RSS of the cache child" ;;
            nginx) what="PSS, all processes" ;;
        esac
        mb=${m_before[$sys]:-} mm=${m_mid[$sys]:-} ma=${m_after[$sys]:-}
        per=– marginal=–
        if [ -n "$mb" ] && [ -n "$ma" ]; then per="$(((ma - mb) * 1024 / objects)) B"; fi
        if [ -n "$mm" ] && [ -n "$ma" ]; then
            marginal="$(((ma - mm) * 1024 / (objects - objects / 2))) B"
        fi
        also=${m_disk[$sys]:-}
        [ "${m_err[$sys]:-0}" = 0 ] || also+=" ${m_err[$sys]} errors"
        name=$sys
        [ "$sys" != edgecache ] || name="**edgecache**"
        echo "| $name | $what | $(fmt "$(awk -v k="$mb" 'BEGIN{print k/1024}')" 1) | $(fmt "$(awk -v k="$ma" 'BEGIN{print k/1024}')" 1) | $per | $marginal | ${also:-} | $(thousands "${m_rate[$sys]:-}") | ${m_check[$sys]:-–} |"
    done
    echo
    echo "growth per object = (after − before) / objects, including the index and allocator overhead;"
    echo "second half = the growth while the second half of the objects was loaded, per object: what"
    echo "one more object costs, without what loading costs whatever the count (connection buffers,"
    echo "the upstream pool, the allocator's first pages). The body itself is 1,024 B."
    if [ -n "$nginx_bin" ]; then
        echo "nginx keeps bodies in files, which live in the kernel's page cache, not in nginx's memory:"
        echo "its row is the shared key zone and the workers only, plus the files' size."
    fi
    fi
    if [ -z "$only" ] && [ -f "$here/results/eviction.md" ]; then
        echo
        echo "## 4. Eviction hit ratio"
        echo
        echo "From \`bench/results/eviction.md\`:"
        echo
        sed '1{/^# /d}; s/^#/##/' "$here/results/eviction.md" # its title is ours; demote the rest
    fi
    if [ ${#notes[@]} -gt 0 ] || [ ${#missing[@]} -gt 0 ]; then
        echo
        echo "## Notes"
        echo
        for n in "${notes[@]}"; do echo "- $n"; done
        [ ${#missing[@]} -eq 0 ] || echo "- Install the missing tools with \`apt-get install -y nginx varnish wrk\`."
    fi
} >"$report"

cat "$report"
if [ "$smoke" = 0 ] && [ -z "$only" ]; then
    mkdir -p "$outdir"
    stamp=$(date -u '+%Y-%m-%d-%H%M%S')
    cp "$report" "$outdir/latest.md"
    cp "$report" "$outdir/$stamp.md"
    cp "$raw" "$outdir/latest.raw"
    say "wrote ${outdir#"$root"/}/latest.md and ${outdir#"$root"/}/$stamp.md (raw tool output: latest.raw)"
fi

# --- smoke checks: edgecache's own numbers must make sense ----------------------------------------
if [ "$smoke" = 1 ]; then
    failed=()
    section throughput && for size in "${SIZES[@]}"; do
        rps=$(median "${tp_rps[edgecache,$size]}")
        awk -v r="${rps:-0}" 'BEGIN { exit !(r > 0) }' || failed+=("throughput $size B: no requests completed")
        [ "${tp_err[edgecache,$size]:-1}" = 0 ] || failed+=("throughput $size B: ${tp_err[edgecache,$size]} errors")
        [ "${tp_origin[edgecache,$size]:-1}" = 0 ] || failed+=("throughput $size B: ${tp_origin[edgecache,$size]} origin calls during the hit runs")
    done
    if section herd; then
        for u in ${h_up[edgecache]:-none}; do
            [ "$u" = 1 ] || failed+=("herd: $u upstream calls (want 1)")
        done
        [ "${h_err[edgecache]:-1}" = 0 ] || failed+=("herd: ${h_err[edgecache]:-?} errors")
    fi
    if section memory; then
        [ "${m_err[edgecache]:-1}" = 0 ] || failed+=("memory run: ${m_err[edgecache]:-?} errors")
        [ "${m_check[edgecache]:-}" = ok ] || failed+=("memory run: ${m_check[edgecache]:-not run}")
    fi
    if [ ${#failed[@]} -gt 0 ]; then
        for f in "${failed[@]}"; do say "SMOKE FAILED: edgecache $f"; done
        exit 1
    fi
    say "smoke OK in $((SECONDS - start_time)) s"
fi
