#!/usr/bin/env bash
# Large-object herd (issue 12): C clients ask at once for one cold, large, slowly arriving
# object; how many requests reach the origin, when do the followers get their first byte, how
# long until the last one is done, how much memory does the proxy take. edgecache beside
# nginx (proxy_cache_lock) and Varnish, all on loopback in front of one mock origin. See
# bench/README.md, "Large-object herd".
#
#   bench/large_herd.sh [--sizes "6 16 64"] [--clients C] [--rounds N] [--no-build] [--out FILE]
#
#   --sizes "A B .."  object sizes in MiB (default "6 16 64": under CACHE_MAX_OBJECT_BYTES's
#                     default 8 MiB, over it, far over it)
#   --clients C       herd size (default 50)
#   --rounds N        rounds (default 3); the table shows medians, upstream requests per round
#   --no-build        do not run `cargo build --release --bins --examples` first
#   --out FILE        where the markdown table goes (default bench/results/large_herd.md)
#
# The origin sends 1 MiB every 50 ms (mock-origin `/bytes?chunk=1048576&interval_ms=50`), with
# `Cache-Control: max-age=3600`; every run asks for a key no earlier run used. nginx and
# varnishd are optional: missing ones are skipped with a note (and the apt-get line).
# Exit status: 0 = ran; 2 = setup problem (build, a server that does not start, bad arguments).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

say() { printf 'large_herd: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

sizes_mib='6 16 64' clients=50 rounds=3 build=1 out=$here/results/large_herd.md
while [ $# -gt 0 ]; do
    case $1 in
        --sizes) [ $# -ge 2 ] || die "--sizes needs a list"; sizes_mib=$2; shift ;;
        --sizes=*) sizes_mib=${1#*=} ;;
        --clients) [ $# -ge 2 ] || die "--clients needs a number"; clients=$2; shift ;;
        --clients=*) clients=${1#*=} ;;
        --rounds) [ $# -ge 2 ] || die "--rounds needs a number"; rounds=$2; shift ;;
        --rounds=*) rounds=${1#*=} ;;
        --out) [ $# -ge 2 ] || die "--out needs a file"; out=$2; shift ;;
        --out=*) out=${1#*=} ;;
        --no-build) build=0 ;;
        -h | --help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
for v in clients rounds; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--$v must be a positive whole number, got '${!v}'"
done
read -ra SIZES <<<"$sizes_mib"
[ ${#SIZES[@]} -gt 0 ] || die "--sizes is empty"
for s in "${SIZES[@]}"; do
    [[ $s =~ ^[1-9][0-9]*$ ]] && [ "$s" -le 1024 ] || die "--sizes: '$s' is not a whole number of MiB (1-1024)"
done

CHUNK=1048576
INTERVAL_MS=50
CC='cc=max-age%3D3600'
LIMIT=8388608 # edgecache's default CACHE_MAX_OBJECT_BYTES, for the limited Varnish row

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
for t in ${BENCH_WITHOUT:-}; do
    case $t in
        nginx) nginx_bin='' ;;
        varnish | varnishd) varnishd_bin='' ;;
        wrk) ;;
        *) die "BENCH_WITHOUT: unknown tool '$t' (nginx, varnish)" ;;
    esac
done
missing=() notes=()
[ -n "$nginx_bin" ] || missing+=(nginx)
[ -n "$varnishd_bin" ] || missing+=(varnish)
if [ ${#missing[@]} -gt 0 ]; then
    say "not installed: ${missing[*]} (skipped). For the full comparison: apt-get install -y ${missing[*]}"
    notes+=("Not installed, so no rows: ${missing[*]} (\`apt-get install -y ${missing[*]}\`).")
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
"$herd_bin" --help | grep -q -- --expect-bytes || die "$herd_bin has no --expect-bytes (rebuild)"
start_time=$SECONDS

hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then ulimit -n 65536; else ulimit -n "$hard"; fi

# --- processes -------------------------------------------------------------------------------
rundir=$(mktemp -d "${TMPDIR:-/tmp}/edgecache-large-herd.XXXXXX")
chmod 755 "$rundir" # nginx workers and the Varnish child may run as another user
raw=$rundir/raw.log
: >"$raw"
pids=() # everything we started, stopped in reverse order on exit

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
    if [ "$rc" -ne 0 ]; then
        local logs=${TMPDIR:-/tmp}/edgecache-large-herd-last-logs
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

"$origin_bin" --listen 127.0.0.1:0 >"$rundir/origin.log" 2>&1 &
origin_pid=$!
pids+=("$origin_pid")
origin_port=$(wait_line "$origin_pid" "$rundir/origin.log" '^mock-origin listening on http://127\.0\.0\.1:\([0-9]*\).*')

# edgecache: its defaults, plus what it needs to start here (origin, a free port, no operator
# listener on the fixed default port) and no access log.
start_edgecache() {
    edge_port=$(free_port)
    (cd "$rundir" && exec env -i PATH="$PATH" \
        UPSTREAM_URL="http://127.0.0.1:$origin_port" \
        LISTEN_ADDR="127.0.0.1:$edge_port" \
        OPS_LISTEN_ADDR=off \
        RUST_LOG=warn \
        NO_COLOR=1 \
        "$edgecache_bin") >"$rundir/edgecache.log" 2>&1 &
    edge_pid=$!
    pids+=("$edge_pid")
    wait_port "$edge_pid" "$edge_port" "$rundir/edgecache.log" edgecache
}

# nginx: bench/run.sh's caching nginx, with the lock held as long as a fill can take. Followers
# wait for the whole object to be in the cache (nginx has no streaming to lock waiters) and
# look again every 500 ms. No size limit: nginx stores every size (on disk).
start_nginx() {
    nginx_port=$(free_port)
    local d=$rundir/nginx
    mkdir -p "$d"
    local user_line=''
    [ "$(id -u)" -ne 0 ] || user_line='user nobody nogroup;'
    getent group nogroup >/dev/null 2>&1 || user_line=${user_line/nogroup/nobody}
    cat >"$d/nginx.conf" <<EOF
# Written by bench/large_herd.sh.
$user_line
worker_processes auto;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 65s;
    client_body_temp_path $d/client_body_temp;
    proxy_temp_path       $d/proxy_temp;
    fastcgi_temp_path     $d/fastcgi_temp;
    uwsgi_temp_path       $d/uwsgi_temp;
    scgi_temp_path        $d/scgi_temp;
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
            proxy_buffering on;          # the default; nginx caches only buffered responses
            proxy_cache_lock on;
            proxy_cache_lock_timeout 120s;
            proxy_cache_lock_age 120s;
            proxy_read_timeout 120s;
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

# Varnish: the builtin VCL (streaming on: beresp.do_stream defaults to true; followers wait on
# the waiting list and stream from the busy object) with -s malloc,1G: every size is stored.
# Requests marked lim=8m get edgecache's default object limit: a response over 8 MiB gets a
# 1 s TTL, so the herd shares its one fetch and the object is gone right after.
start_varnish() {
    varnish_port=$(free_port)
    cat >"$rundir/large_herd.vcl" <<EOF
vcl 4.1;
import std;
backend default { .host = "127.0.0.1"; .port = "$origin_port"; }
sub vcl_backend_response {
    if (bereq.url ~ "[?&]lim=8m(&|$)" && std.integer(beresp.http.Content-Length, 0) > $LIMIT) {
        set beresp.ttl = 1s;
        set beresp.grace = 0s;
        set beresp.keep = 0s;
    }
}
EOF
    local jail=()
    # As root varnishd would drop to the 'varnish'/'vcache' users; run without privilege
    # separation on a throw-away workdir instead.
    [ "$(id -u)" -ne 0 ] || jail=(-j none)
    "$varnishd_bin" "${jail[@]}" -F -a "127.0.0.1:$varnish_port" -f "$rundir/large_herd.vcl" \
        -s malloc,1G -n "$rundir/varnish" >"$rundir/varnish.log" 2>&1 &
    varnish_pid=$!
    pids+=("$varnish_pid")
    wait_port "$varnish_pid" "$varnish_port" "$rundir/varnish.log" varnishd
}

start_with_retries() { # name: a port taken between choosing and binding is retried
    local _
    for _ in 1 2 3; do
        if "start_$1"; then return 0; fi
    done
    die "$1 exited at start"
}

systems=(edgecache)
declare -A port
start_with_retries edgecache
port[edgecache]=$edge_port
if [ -n "$nginx_bin" ]; then
    start_with_retries nginx
    systems+=(nginx)
    port[nginx]=$nginx_port
fi
if [ -n "$varnishd_bin" ]; then
    start_with_retries varnish
    systems+=(varnish varnish-8m)
    port[varnish]=$varnish_port
    port[varnish-8m]=$varnish_port
fi
say "origin :$origin_port, $(for s in "${systems[@]}"; do printf '%s :%s, ' "$s" "${port[$s]}"; done | sed 's/, $//')"

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
json_get() { # json key -> value
    sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<<"$1"
}
median() { # "n1 n2 ..." -> median (mean of the middle two for an even count); '' if none
    tr ' ' '\n' <<<"$*" | sort -g | awk '/^-?[0-9.]+$/ {v[++n] = $1} END {
        if (n == 0) exit; if (n % 2) printf "%g", v[(n+1)/2]; else printf "%g", (v[n/2]+v[n/2+1])/2 }'
}
fmt() { # number [decimals] -> formatted, or – when empty
    if [ -z "$1" ]; then printf '–'; else LC_ALL=C printf "%.${2:-0}f" "$1"; fi
}
ratio() { # a b -> a/b with 2 decimals, or –
    if [ -z "$1" ] || [ -z "$2" ]; then printf '–'; else awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) printf "–"; else printf "%.2f", a / b }'; fi
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
procs() { # system -> every pid of its processes (nginx: master, workers, cache manager/loader;
    # varnish: manager and cache child)
    case $1 in
        edgecache) echo "$edge_pid" ;;
        nginx) echo "$nginx_pid" $(children "$nginx_pid") ;;
        varnish*) echo "$varnish_pid" $(children "$varnish_pid") ;;
    esac
}
status_kb() { # field pids... -> sum of that /proc/PID/status field, kB
    local field=$1 p total=0 kb
    shift
    for p in "$@"; do
        kb=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null || true)
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}
# Peak RSS: VmHWM (the kernel's high-water mark of the resident set), reset before each run by
# writing 5 to /proc/PID/clear_refs, summed over the system's processes. Without the right to
# reset it (not root, or an old kernel) the peak is since the process started; the table says so.
hwm_reset=1
reset_peaks() { # pids...
    local p
    for p in "$@"; do
        { echo 5 >"/proc/$p/clear_refs"; } 2>/dev/null || hwm_reset=0
    done
}

# --- the runs --------------------------------------------------------------------------------
# Warm-up: one herd of the same size per system on a small key, so no system is measured while
# it creates its first threads or connections (Varnish grows its thread pools gradually).
for sys in "${systems[@]}"; do
    say "warm-up: $clients clients, 1 KiB, $sys"
    "$herd_bin" --url "http://127.0.0.1:${port[$sys]}/bytes?size=1024&$CC&warmup=$sys" \
        --concurrency "$clients" --timeout 30 >>"$raw" 2>&1 || die "warm-up against $sys failed"
done

declare -A up ttfb_first ttfb_p50 ttfb_p99 total errs rss_before rss_peak
for ((r = 1; r <= rounds; r++)); do
    for mib in "${SIZES[@]}"; do
        bytes=$((mib * 1048576))
        mapfile -t order < <(rotate $((r - 1)) "${systems[@]}")
        for sys in "${order[@]}"; do
            path="/bytes?size=$bytes&$CC&chunk=$CHUNK&interval_ms=$INTERVAL_MS&run=$sys-$mib-$r"
            [ "$sys" != varnish-8m ] || path+="&lim=8m"
            say "round $r/$rounds: $clients clients, $mib MiB, $sys"
            read -ra ps <<<"$(procs "$sys")"
            sleep 1 # let the previous run's connections and memory settle
            reset_peaks "${ps[@]}"
            rss_before[$sys,$mib]+=" $(status_kb VmRSS "${ps[@]}")"
            line=$(timeout 300 "$herd_bin" --url "http://127.0.0.1:${port[$sys]}$path" \
                --concurrency "$clients" --timeout 120 --expect-bytes "$bytes" \
                --stats-url "http://127.0.0.1:$origin_port/stats?path=$(urlencode "$path")" 2>>"$raw") || true
            rss_peak[$sys,$mib]+=" $(status_kb VmHWM "${ps[@]}")"
            printf '== %s %s MiB round %s\n%s\n' "$sys" "$mib" "$r" "$line" >>"$raw"
            if [[ $line != '{'* ]]; then
                say "herd against $sys failed (see the raw log)"
                errs[$sys,$mib]=$((${errs[$sys,$mib]:-0} + clients))
                continue
            fi
            up[$sys,$mib]+=" $(json_get "$line" upstream_calls)"
            ttfb_first[$sys,$mib]+=" $(json_get "$line" ttfb_first_ms)"
            ttfb_p50[$sys,$mib]+=" $(json_get "$line" ttfb_p50_ms)"
            ttfb_p99[$sys,$mib]+=" $(json_get "$line" ttfb_p99_ms)"
            total[$sys,$mib]+=" $(json_get "$line" total_ms)"
            errs[$sys,$mib]=$((${errs[$sys,$mib]:-0} + $(json_get "$line" errors)))
        done
    done
done

# --- the report --------------------------------------------------------------------------------
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git -C "$root" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ] || rev="$rev + uncommitted changes"
ver() { "$@" 2>&1 | head -n 1 | tr -d '\r' || true; }
versions="edgecache $rev"
[ -z "$nginx_bin" ] || versions+="; $(ver "$nginx_bin" -v | sed 's/^nginx version: //')"
[ -z "$varnishd_bin" ] || versions+="; $(ver "$varnishd_bin" -V | sed 's/^varnishd (\(varnish-[^ ]*\).*/\1/')"
mib_of() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
peak_note="sum of VmHWM over the system's processes, reset before each
  run"
[ "$hwm_reset" = 1 ] || peak_note="sum of VmHWM over the system's processes since they
  started (could not reset it: /proc/PID/clear_refs is not writable)"

report=$rundir/report.md
{
    echo "# Large-object herd"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC') · \`bench/large_herd.sh --sizes \"${SIZES[*]}\" --clients $clients --rounds $rounds\` · $((SECONDS - start_time)) s · $(nproc) × $cpu, loopback · $versions"
    echo
    echo "$clients clients released at once on open connections, one cold key per run; the origin sends"
    echo "1 MiB every $INTERVAL_MS ms (\`Cache-Control: max-age=3600\`). Medians of $rounds round(s)."
    echo
    echo "| size | system | upstream requests (per round) | leader TTFB ms | follower TTFB p50 ms | p99 ms | p50 ÷ varnish's | total ms | errors | RSS before → peak MiB |"
    echo "|---|---|---|---:|---:|---:|---:|---:|---:|---|"
    for mib in "${SIZES[@]}"; do
        v_p50=$(median "${ttfb_p50[varnish,$mib]:-}")
        for sys in "${systems[@]}"; do
            ups=${up[$sys,$mib]:-}
            ups=${ups# }
            name=$sys
            [ "$sys" != edgecache ] || name="**edgecache**"
            [ "$sys" != varnish-8m ] || name="varnish, > 8 MiB: ttl 1 s"
            p50=$(median "${ttfb_p50[$sys,$mib]:-}")
            rb=$(median "${rss_before[$sys,$mib]:-}") rp=$(median "${rss_peak[$sys,$mib]:-}")
            echo "| $mib MiB | $name | ${ups// /, } | $(fmt "$(median "${ttfb_first[$sys,$mib]:-}")") | $(fmt "$p50") | $(fmt "$(median "${ttfb_p99[$sys,$mib]:-}")") | $(ratio "$p50" "$v_p50") | $(fmt "$(median "${total[$sys,$mib]:-}")") | ${errs[$sys,$mib]:-0} | $(mib_of "$rb") → $(mib_of "$rp") |"
        done
    done
    echo
    echo "- TTFB: from the release of all $clients requests to a request's first body byte. The"
    echo "  request whose first byte came first is counted as the leader; p50/p99 are the other $((clients - 1))'s."
    echo "  total: release to the end of the last body. Every body is checked byte for byte (length"
    echo "  and pattern); a wrong one is an error."
    echo "- upstream requests: mock-origin's count for the run's key (\`/stats?path=\`)."
    echo "- RSS peak: $peak_note; before: the summed VmRSS just before the run."
    echo "  nginx: master, workers, cache manager and loader (its cached bodies are files, in the"
    echo "  page cache, not in its RSS; VmHWM counts each worker's touched shared memory again)."
    echo "  Varnish: manager and cache child (\`-s malloc,1G\`; objects of earlier runs stay stored)."
    echo "- nginx: \`proxy_cache_lock on\`, lock timeout/age 120 s, \`proxy_buffering on\`; followers wait"
    echo "  for the complete object and poll every 500 ms. Stores every size."
    echo "- varnish: builtin VCL (streams: \`beresp.do_stream\` is true), \`-s malloc,1G\`: stores every size."
    echo "  varnish, > 8 MiB: ttl 1 s: the same varnishd, but a response over 8 MiB (edgecache's"
    echo "  default CACHE_MAX_OBJECT_BYTES) gets \`beresp.ttl = 1s\`, grace and keep 0: the herd shares"
    echo "  the fetch, the object is not kept."
    echo "- edgecache: defaults (CACHE_MAX_BYTES 256 MiB, CACHE_MAX_OBJECT_BYTES 8 MiB); only"
    echo "  UPSTREAM_URL, LISTEN_ADDR, OPS_LISTEN_ADDR=off and RUST_LOG=warn set."
    for n in "${notes[@]}"; do echo "- $n"; done
} >"$report"

cat "$report"
mkdir -p "$(dirname "$out")"
cp "$report" "$out"
say "wrote $out"
