#!/usr/bin/env bash
# Fleet mode (issue 13): 3 edgecache instances sharing Redis (REDIS_URL) beside 3 independent
# ones, all on loopback in front of one mock origin and one redis-server. See bench/README.md,
# "Fleet mode (Redis)".
#
#   bench/fleet.sh [--keys N] [--purges N] [--rounds N] [--duration S] [--no-build] [--out FILE]
#
#   --keys N      keys for the cold-key-set and L2-latency runs (default 200 and 300: N for both)
#   --purges N    purges timed (default 200)
#   --rounds N    rounds of the hit-throughput runs, fleet and independent interleaved (default 3)
#   --duration S  seconds per throughput run (default 5)
#   --no-build    do not run `cargo build --release --bins --examples` first
#   --out FILE    where the markdown table goes (default bench/results/fleet.md)
#
# Measures: 1. origin requests for a cold key set asked on every instance; 2. 16 KiB GET
# latency of an L1 hit vs an L2 (Redis) hit; 3. purge round trip with acknowledgements;
# 4. 1 KiB L1-hit throughput (`herd --load`, 64 connections) with and without REDIS_URL.
# Needs redis-server, curl and jq. Exit status: 0 = ran; 1 = a check failed (errors, wrong
# cache status, missing acknowledgements); 2 = setup problem.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

say() { printf 'fleet: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

keys='' purges=200 rounds=3 duration=5 build=1 out=$here/results/fleet.md
while [ $# -gt 0 ]; do
    case $1 in
        --keys) [ $# -ge 2 ] || die "--keys needs a number"; keys=$2; shift ;;
        --keys=*) keys=${1#*=} ;;
        --purges) [ $# -ge 2 ] || die "--purges needs a number"; purges=$2; shift ;;
        --purges=*) purges=${1#*=} ;;
        --rounds) [ $# -ge 2 ] || die "--rounds needs a number"; rounds=$2; shift ;;
        --rounds=*) rounds=${1#*=} ;;
        --duration) [ $# -ge 2 ] || die "--duration needs seconds"; duration=$2; shift ;;
        --duration=*) duration=${1#*=} ;;
        --out) [ $# -ge 2 ] || die "--out needs a file"; out=$2; shift ;;
        --out=*) out=${1#*=} ;;
        --no-build) build=0 ;;
        -h | --help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
cold_keys=${keys:-200} lat_keys=${keys:-300}
for v in cold_keys lat_keys purges rounds duration; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v#*_} must be a positive whole number, got '${!v}'"
done

for t in redis-server curl jq; do
    command -v "$t" >/dev/null 2>&1 || die "needs $t (apt-get install -y redis-server curl jq)"
done
redis_bin=$(command -v redis-server)

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
grep -q -- --timed <<<"$("$herd_bin" --help)" || die "$herd_bin has no --timed (rebuild)"

hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then ulimit -n 65536; else ulimit -n "$hard"; fi

# --- processes -------------------------------------------------------------------------------
rundir=$(mktemp -d "${TMPDIR:-/tmp}/edgecache-fleet.XXXXXX")
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
        local logs=${TMPDIR:-/tmp}/edgecache-fleet-last-logs
        rm -rf "$logs"
        mkdir -p "$logs"
        cp "$rundir"/*.log "$logs/" 2>/dev/null || true
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

redis_port=$(free_port)
"$redis_bin" --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
    --dir "$rundir" --protected-mode yes >"$rundir/redis.log" 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
deadline=$((SECONDS + 20))
until port_open "$redis_port"; do
    kill -0 "$redis_pid" 2>/dev/null || { tail_log "$rundir/redis.log"; die "redis-server exited at start"; }
    [ "$SECONDS" -lt "$deadline" ] || { tail_log "$rundir/redis.log"; die "redis-server did not listen"; }
    sleep 0.05
done

: >"$rundir/origin.log"
"$origin_bin" --listen 127.0.0.1:0 >"$rundir/origin.log" 2>&1 &
origin_pid=$!
pids+=("$origin_pid")
origin_port=$(wait_line "$origin_pid" "$rundir/origin.log" '^mock-origin listening on http://127\.0\.0\.1:\([0-9]*\).*')
origin=http://127.0.0.1:$origin_port

PURGE_KEY=fleet-bench-$RANDOM$RANDOM
HOST=fleet.bench.test # every instance gets the same Host: cache keys include it
declare -A PORT OPS
start_edgecache() { # name redis_url ('' = independent)
    local name=$1 redis=$2 port ops pid
    port=$(free_port)
    ops=$(free_port)
    local extra=()
    [ -z "$redis" ] || extra=(REDIS_URL="$redis")
    : >"$rundir/$name.log"
    (cd "$rundir" && exec env -i PATH="$PATH" \
        UPSTREAM_URL="$origin" \
        LISTEN_ADDR="127.0.0.1:$port" \
        OPS_LISTEN_ADDR="127.0.0.1:$ops" \
        DEFAULT_CACHE_EXPIRY_TIME_SECS=0 \
        DEFAULT_REFRESH_WINDOW_SECS=0 \
        CLEAR_CACHE_KEY="$PURGE_KEY" \
        RUST_LOG=warn \
        NO_COLOR=1 \
        "${extra[@]}" \
        "$edgecache_bin") >"$rundir/$name.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    wait_line "$pid" "$rundir/$name.log" '^edgecache listening on http://127\.0\.0\.1:\([0-9]*\).*' >/dev/null
    PORT[$name]=$port
    OPS[$name]=$ops
}
for i in 1 2 3; do start_edgecache "fleet$i" "redis://127.0.0.1:$redis_port"; done
for i in 1 2 3; do start_edgecache "indep$i" ''; done
say "redis :$redis_port, origin :$origin_port, fleet :${PORT[fleet1]} :${PORT[fleet2]} :${PORT[fleet3]}, independent :${PORT[indep1]} :${PORT[indep2]} :${PORT[indep3]}"
sleep 1 # heartbeats: every fleet instance counts the others as live

failed=()
check() { # condition-text, then the test as arguments
    local what=$1
    shift
    if ! "$@"; then
        failed+=("$what")
        say "CHECK FAILED: $what"
    fi
}
# Origin requests for one key set (`set=NAME&` in the query): edgecache's health checks of the
# origin also count in mock-origin's total, so the total is not used.
origin_count() { curl -sf "$origin/stats" | jq --arg s "set=$1&" '[.by_path | to_entries[] | select(.key | contains($s)) | .value] | add // 0'; }
redis_metric() { # instance metric-name -> sum over its label sets
    curl -sf "http://127.0.0.1:${OPS[$1]}/metrics" | awk -v m="$2" '$1 ~ "^"m"({|$)" {s += $NF} END {print s + 0}'
}
url() { echo "http://127.0.0.1:${PORT[$1]}$2"; }
H=(--host "$HOST")
jqn() { jq -r "$1" <<<"$2"; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# --- 1. cold key set -------------------------------------------------------------------------
cold() { # set-name instance... -> cold_result: origin requests while every instance asks for every key
    local set=$1 before after name p hp=()
    shift
    before=$(origin_count "$set")
    for name in "$@"; do
        "$herd_bin" --sequence "$cold_keys" --inflight 8 "${H[@]}" \
            --url "$(url "$name" "/bytes?size=16384&cc=max-age%3D600&set=$set&k={i}")" \
            >"$rundir/cold-$name.json" 2>>"$rundir/herd.log" &
        hp+=($!)
    done
    for p in "${hp[@]}"; do wait "$p" || die "herd --sequence failed (see $rundir/herd.log)"; done
    for name in "$@"; do
        check "cold key set on $name: no errors" [ "$(jq -r .errors "$rundir/cold-$name.json")" = 0 ]
    done
    after=$(origin_count "$set")
    cold_result=$((after - before))
}
say "1. cold key set: $cold_keys keys, asked on all 3 instances at once"
waits_before=$(( $(redis_metric fleet1 edgecache_redis_lease_waits_total) + $(redis_metric fleet2 edgecache_redis_lease_waits_total) + $(redis_metric fleet3 edgecache_redis_lease_waits_total) ))
cold fleet fleet1 fleet2 fleet3
cold_fleet=$cold_result
waits=$(( $(redis_metric fleet1 edgecache_redis_lease_waits_total) + $(redis_metric fleet2 edgecache_redis_lease_waits_total) + $(redis_metric fleet3 edgecache_redis_lease_waits_total) - waits_before ))
cold indep indep1 indep2 indep3
cold_indep=$cold_result
say "   fleet: $cold_fleet origin requests ($waits lease waits), independent: $cold_indep"
check "fleet: one origin request per cold key ($cold_fleet for $cold_keys)" [ "$cold_fleet" = "$cold_keys" ]

# --- 2. L1 vs L2 hit latency -----------------------------------------------------------------
say "2. 16 KiB GET latency: L1 hit vs L2 (Redis) hit, $lat_keys keys"
lat_path="/bytes?size=16384&cc=max-age%3D600&set=lat&k={i}"
"$herd_bin" --sequence "$lat_keys" --inflight 8 "${H[@]}" --url "$(url fleet1 "$lat_path")" >/dev/null
sleep 1 # the writes to Redis happen in the background, after the response
timed() { "$herd_bin" --timed "$lat_keys" "${H[@]}" "$@"; }
l1_origin=$(timed --url "$(url fleet1 "$lat_path")" --match 'detail=redis')
l2=$(timed --url "$(url fleet2 "$lat_path")" --match 'detail=redis')
l1=$(timed --url "$(url fleet2 "$lat_path")" --match 'detail=redis')
# Baselines: an independent instance's misses (to the origin) and then its L1 hits.
miss=$(timed --url "$(url indep1 "$lat_path")")
l1_indep=$(timed --url "$(url indep1 "$lat_path")")
for r in l1_origin l2 l1 miss l1_indep; do
    check "latency run $r: no errors" [ "$(jqn .errors "${!r}")" = 0 ]
done
check "every first GET on fleet2 is an L2 hit (detail=redis)" [ "$(jqn .matched "$l2")" = "$lat_keys" ]
check "no second GET on fleet2 comes from Redis" [ "$(jqn .matched "$l1")" = 0 ]
check "no GET on fleet1 (where the keys were fetched) comes from Redis" [ "$(jqn .matched "$l1_origin")" = 0 ]
added_p50=$(awk -v a="$(jqn .p50_ms "$l2")" -v b="$(jqn .p50_ms "$l1")" 'BEGIN {printf "%.3f", a - b}')
added_p99=$(awk -v a="$(jqn .p99_ms "$l2")" -v b="$(jqn .p99_ms "$l1")" 'BEGIN {printf "%.3f", a - b}')
say "   L1 p50 $(jqn .p50_ms "$l1") ms, L2 p50 $(jqn .p50_ms "$l2") ms: +$added_p50 ms"

# --- 3. purge fan-out ------------------------------------------------------------------------
say "3. purge fan-out: $purges purges of keys warm on all 3 instances"
p_path="/bytes?size=16384&cc=max-age%3D600&set=purge&k={i}"
"$herd_bin" --sequence "$purges" --inflight 8 "${H[@]}" --url "$(url fleet1 "$p_path")" >/dev/null
sleep 1
for name in fleet2 fleet3 indep1; do
    "$herd_bin" --sequence "$purges" --inflight 8 "${H[@]}" --url "$(url "$name" "$p_path")" >/dev/null
done
PURGE=(--header 'Clear-Cache: true' --header "Clear-Cache-Key: $PURGE_KEY")
before=$(origin_count purge)
for name in fleet2 fleet3; do
    "$herd_bin" --timed "$purges" "${H[@]}" --url "$(url "$name" "$p_path")" >/dev/null
done
check "purge keys warm on fleet2 and fleet3 before the purges" [ "$(origin_count purge)" = "$before" ]
purge=$("$herd_bin" --timed "$purges" "${H[@]}" "${PURGE[@]}" --url "$(url fleet1 "$p_path")" --match '"acks":3,"instances":3')
purge_indep=$("$herd_bin" --timed "$purges" "${H[@]}" "${PURGE[@]}" --url "$(url indep1 "$p_path")" --match '"action":"cleared"')
check "purges: no errors" [ "$(jqn .errors "$purge")" = 0 ]
acked=$(jqn .matched "$purge")
check "every purge acknowledged by 3 of 3 instances ($acked of $purges)" [ "$acked" = "$purges" ]
[ "$acked" = "$purges" ] || say "   a reply without 3/3: $(jqn .unmatched_sample "$purge")"
# Gone everywhere: the next GET of each purged key on fleet3 goes to the origin (once per key).
before=$(origin_count purge)
"$herd_bin" --timed "$purges" "${H[@]}" --url "$(url fleet3 "$p_path")" >/dev/null
refetched=$(($(origin_count purge) - before))
check "purged keys gone from fleet3's memory and Redis ($refetched of $purges refetched)" [ "$refetched" = "$purges" ]
say "   p50 $(jqn .p50_ms "$purge") ms, p99 $(jqn .p99_ms "$purge") ms, 3/3 acks: $acked of $purges"

# --- 4. hit throughput -----------------------------------------------------------------------
say "4. 1 KiB L1-hit throughput, ${rounds} × ${duration} s per instance, herd --load 64 connections"
t_path="/bytes?size=1024&cc=max-age%3D3600&set=tput&k=0"
for name in fleet1 indep1; do
    for _ in 1 2; do curl -sf -o /dev/null -H "Host: $HOST" "$(url "$name" "$t_path")"; done
done
sleep 1
rr_before=$(redis_metric fleet1 edgecache_redis_requests_total)
t_before=$(origin_count tput)
rps_fleet='' rps_indep='' p99_fleet='' p99_indep='' tput_errors=0
for r in $(seq "$rounds"); do
    order='fleet1 indep1'
    [ $((r % 2)) = 1 ] || order='indep1 fleet1'
    for name in $order; do
        res=$("$herd_bin" --load --connections 64 --duration "$duration" "${H[@]}" --url "$(url "$name" "$t_path")")
        tput_errors=$((tput_errors + $(jqn .errors "$res")))
        if [ "$name" = fleet1 ]; then
            rps_fleet+=" $(jqn .rps "$res")" p99_fleet+=" $(jqn .p99_ms "$res")"
        else
            rps_indep+=" $(jqn .rps "$res")" p99_indep+=" $(jqn .p99_ms "$res")"
        fi
        say "   round $r $name: $(jqn .rps "$res") req/s"
    done
done
rr=$(($(redis_metric fleet1 edgecache_redis_requests_total) - rr_before))
t_origin=$(($(origin_count tput) - t_before))
check "throughput runs: no errors" [ "$tput_errors" = 0 ]
check "throughput runs: all hits (origin requests: $t_origin)" [ "$t_origin" = 0 ]
check "L1 hits make no Redis requests ($rr during the fleet runs)" [ "$rr" = 0 ]
med_fleet=$(median <<<"$rps_fleet") med_indep=$(median <<<"$rps_indep")
ratio=$(awk -v a="$med_fleet" -v b="$med_indep" 'BEGIN {printf "%.3f", a / b}')

# --- report ----------------------------------------------------------------------------------
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
rev=$(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo '?')
f3() { awk -v x="$1" 'BEGIN {printf "%.3f", x}'; }
f0() { awk -v x="$1" 'BEGIN {printf "%.0f", x}'; }
report=$rundir/report.md
{
    echo "## Fleet of 3 (Redis) vs 3 independent instances"
    echo
    echo "\`bench/fleet.sh\` on $rev, $(date -u '+%Y-%m-%d %H:%M') UTC: $(nproc) × ${cpu:-?}, loopback, release build, $("$redis_bin" --version | sed -n 's/.*v=\([^ ]*\).*/redis \1/p')."
    echo
    echo "| measurement | fleet (REDIS_URL) | 3 independent | target |"
    echo "|---|---:|---:|---|"
    echo "| origin requests, $cold_keys cold 16 KiB keys × 3 instances (concurrent) | $cold_fleet | $cold_indep | $cold_keys vs $((3 * cold_keys)) |"
    echo "| 16 KiB GET, L1 hit p50 / p99 ms | $(f3 "$(jqn .p50_ms "$l1")") / $(f3 "$(jqn .p99_ms "$l1")") | $(f3 "$(jqn .p50_ms "$l1_indep")") / $(f3 "$(jqn .p99_ms "$l1_indep")") | |"
    echo "| 16 KiB GET, L2 (Redis) hit p50 / p99 ms | $(f3 "$(jqn .p50_ms "$l2")") / $(f3 "$(jqn .p99_ms "$l2")") | — | |"
    echo "| 16 KiB GET, miss (origin) p50 / p99 ms | — | $(f3 "$(jqn .p50_ms "$miss")") / $(f3 "$(jqn .p99_ms "$miss")") | |"
    echo "| L2 hit − L1 hit, p50 / p99 ms | **$added_p50** / $added_p99 | — | p50 ≤ 1 ms |"
    echo "| purge round trip p50 / p99 ms ($purges purges) | $(f3 "$(jqn .p50_ms "$purge")") / **$(f3 "$(jqn .p99_ms "$purge")")** | $(f3 "$(jqn .p50_ms "$purge_indep")") / $(f3 "$(jqn .p99_ms "$purge_indep")") | p99 ≤ 50 ms |"
    echo "| purges acknowledged by 3 of 3 instances | $acked of $purges | — | all |"
    echo "| 1 KiB L1-hit throughput, req/s (median of $rounds × ${duration} s) | $(f0 "$med_fleet") | $(f0 "$med_indep") | fleet ÷ independent = $ratio (want ≈ 1) |"
    echo "| Redis requests during the fleet throughput runs | $rr | — | 0 |"
    echo
    echo "Keys: \`/bytes?size=16384&cc=max-age%3D600&k=N\`, the same \`Host\` on every instance."
    echo "Cold key set: \`herd --sequence\` with 8 in flight on each of the 3 instances at once,"
    echo "so keys are often asked on several instances at the same moment ($waits lease waits)."
    echo "Latency: \`herd --timed\`, one request at a time on a keep-alive connection, send to"
    echo "last body byte; keys fetched on fleet1, then each GET on fleet2 once (L2 hit, checked:"
    echo "\`Cache-Status: …detail=redis\` on $(jqn .matched "$l2") of $lat_keys) and again (L1"
    echo "hit). Independent column: indep1's first GET (miss) and second (L1 hit)."
    echo "Purge: \`Clear-Cache: true\` on fleet1 for keys cached on all three; the round trip"
    echo "includes the wait for acknowledgements. Independent column: the same purge on an instance"
    echo "without Redis. Afterwards each purged key was fetched from the origin again on fleet3"
    echo "($refetched of $purges). Throughput: \`herd --load\` (64 keep-alive connections, closed"
    echo "loop) on one instance each, fleet and independent interleaved; client, instances, origin"
    echo "and Redis share the $(nproc) cores."
} >"$report"
cat "$report"
mkdir -p "$(dirname "$out")"
cp "$report" "$out"
say "table written to $out"
if [ ${#failed[@]} -gt 0 ]; then
    say "${#failed[@]} check(s) failed: ${failed[*]}"
    exit 1
fi
