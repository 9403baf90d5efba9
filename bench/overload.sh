#!/usr/bin/env bash
# Overload run: edgecache (release) in front of mock-origin, a 1 KiB hot key, driven by wrk
# at the concurrency that saturates this machine (64 connections), then at 10x and ~60x
# that, then at 64 again. Reports req/s, p50/p99, errors and edgecache's RSS per phase.
#
#   bench/overload.sh [--duration S] [--no-build] [--out FILE]
#
# Needs wrk (apt-get install -y wrk). Default 10 s per phase; the table is printed and
# written to bench/results/overload.md. Exit 0 = ran and edgecache stayed up with no errors
# or 5xx; 1 = it did not; 2 = setup problem.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
say() { printf 'overload: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

duration=10 build=1 out=$here/results/overload.md
while [ $# -gt 0 ]; do
    case $1 in
        --duration) [ $# -ge 2 ] || die "--duration needs seconds"; duration=$2; shift ;;
        --no-build) build=0 ;;
        --out) [ $# -ge 2 ] || die "--out needs a file"; out=$2; shift ;;
        *) die "unknown argument $1" ;;
    esac
    shift
done
command -v wrk >/dev/null || die "wrk not found: apt-get install -y wrk"

target=${CARGO_TARGET_DIR:-$root/target}
[[ $target = /* ]] || target=$root/$target
if [ "$build" = 1 ]; then
    (cd "$root" && cargo build --release --bins --examples) || die "cargo build failed"
fi
edgecache_bin=$target/release/edgecache
origin_bin=$target/release/mock-origin
herd_bin=$target/release/examples/herd
for b in "$edgecache_bin" "$origin_bin" "$herd_bin"; do [ -x "$b" ] || die "missing $b"; done

hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then ulimit -n 65536; else ulimit -n "$hard"; fi

rundir=$(mktemp -d "${TMPDIR:-/tmp}/edgecache-overload.XXXXXX")
pids=()
cleanup() {
    local rc=$? p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "$rc" -eq 0 ] || { say "edgecache log:"; tail -n 20 "$rundir/edgecache.log" >&2 || true; }
    rm -rf "$rundir"
}
trap cleanup EXIT

"$origin_bin" --listen 127.0.0.1:0 >"$rundir/origin.log" 2>&1 &
pids+=($!)
origin=''
for _ in $(seq 200); do
    origin=$(sed -n 's|^mock-origin listening on \(http://[0-9.:]*\).*|\1|p' "$rundir/origin.log")
    [ -n "$origin" ] && break
    sleep 0.05
done
[ -n "$origin" ] || die "mock-origin did not start"

port=$("$herd_bin" --free-port)
(cd "$rundir" && exec env -i PATH="$PATH" UPSTREAM_URL="$origin" LISTEN_ADDR="127.0.0.1:$port" \
    OPS_LISTEN_ADDR=off RUST_LOG=warn NO_COLOR=1 "$edgecache_bin") >"$rundir/edgecache.log" 2>&1 &
edge_pid=$!
pids+=("$edge_pid")
for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
done
url="http://127.0.0.1:$port/bytes?size=1024&cc=max-age%3D3600"
"$herd_bin" --sequence 1 --url "$url" >/dev/null

rss() { awk '/^VmRSS:/ { printf "%.0f", $2 / 1024 }' "/proc/$edge_pid/status" 2>/dev/null || echo '?'; }

rows=() failed=0
phase() { # name connections
    local name=$1 c=$2 res peak=0 r wrk_pid
    wrk -t2 -c"$c" -d"${duration}s" --timeout 10s --latency "$url" >"$rundir/wrk.out" 2>&1 &
    wrk_pid=$!
    while kill -0 "$wrk_pid" 2>/dev/null; do
        r=$(rss)
        [[ $r =~ ^[0-9]+$ ]] && [ "$r" -gt "$peak" ] && peak=$r
        sleep 0.5
    done
    wait "$wrk_pid" || true
    res=$(awk -f "$here/wrk_summary.awk" "$rundir/wrk.out") ||
        { cat "$rundir/wrk.out" >&2; die "wrk failed"; }
    read -r rps p50 p99 err <<<"$res"
    printf -v rps '%.0f' "$rps"
    printf -v p50 '%.2f' "$p50"
    printf -v p99 '%.1f' "$p99"
    kill -0 "$edge_pid" 2>/dev/null || { say "edgecache died during '$name'"; failed=1; }
    [ "$err" -eq 0 ] || failed=1
    rows+=("| $name | $c | $rps | $p50 | $p99 | $err | $peak | $(rss) |")
    say "$name: c=$c $rps req/s p50 ${p50} ms p99 ${p99} ms errors $err RSS peak $peak MiB"
}

phase "before" 64
phase "10x overload" 640
phase "60x overload" 4000
phase "after" 64

{
    echo "# Overload run"
    echo
    echo "\`bench/overload.sh --duration $duration\` on $(date -u +%Y-%m-%d), $(nproc) vCPUs shared by wrk, edgecache"
    echo "and mock-origin; edgecache at its defaults (\`MAX_CONNECTIONS=10000\`), a cached 1 KiB object."
    echo "64 connections already saturate this machine; the overload phases open 10x and ~60x as many."
    echo
    echo "| phase | connections | req/s | p50 ms | p99 ms | errors + non-2xx | RSS peak MiB | RSS at phase end MiB |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${rows[@]}"
} | tee "$out"
exit "$failed"
