#!/usr/bin/env bash
# HTTP cache conformance run: edgecache in front of the origin server of http-cache-tests
# (https://cache-tests.fyi), scored with the suite's own categories. See conformance/README.md.
#
#   conformance/run.sh [--no-build] [--bin PATH] [--id TEST-ID] [--score-only]
#
#   --no-build    do not run `cargo build --release --bin edgecache` first
#   --bin PATH    edgecache binary to test (default: <target dir>/release/edgecache; implies
#                 --no-build)
#   --id TEST-ID  run one test with the suite's request/response dump; no scoring, the stored
#                 results are left alone
#   --score-only  no run: score the stored conformance/results/edgecache.json again
#
# Exit status: 0 = every required test passes or is listed in expected-failures.txt (and every
# listed one still fails); 1 = that list is not true any more; 2 = setup / harness problem.
set -euo pipefail

SUITE_VERSION=0.4.5
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cache_root=${EDGECACHE_CONFORMANCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgecache-conformance}
suite_home=$cache_root/http-cache-tests-$SUITE_VERSION
pkg=$suite_home/node_modules/http-cache-tests
results=$here/results/edgecache.json

say() { printf 'conformance: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

build=1 bin='' test_id='' score_only=0
while [ $# -gt 0 ]; do
    case $1 in
        --no-build) build=0 ;;
        --bin) [ $# -ge 2 ] || die "--bin needs a path"; bin=$2; build=0; shift ;;
        --bin=*) bin=${1#--bin=}; build=0 ;;
        --id) [ $# -ge 2 ] || die "--id needs a test id"; test_id=$2; shift ;;
        --id=*) test_id=${1#--id=} ;;
        --score-only) score_only=1 ;;
        -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

command -v node >/dev/null 2>&1 || die "node is required (>= 18)"
start_time=$SECONDS

# --- the suite: pinned by package-lock.json, installed once outside the repo ------------------
install_suite() {
    if [ -f "$pkg/package.json" ] && cmp -s "$here/package-lock.json" "$suite_home/package-lock.json"; then
        return 0
    fi
    command -v npm >/dev/null 2>&1 || die "npm is required to install http-cache-tests once"
    say "installing http-cache-tests@$SUITE_VERSION into $suite_home (first run only)"
    mkdir -p "$cache_root"
    local tmp
    tmp=$(mktemp -d "$cache_root/.install.XXXXXX")
    cp "$here/package.json" "$here/package-lock.json" "$tmp/"
    if ! (cd "$tmp" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >&2); then
        rm -rf "$tmp"
        die "npm ci failed (is the npm registry reachable?)"
    fi
    local got
    got=$(node -p "require('$tmp/node_modules/http-cache-tests/package.json').version")
    [ "$got" = "$SUITE_VERSION" ] || { rm -rf "$tmp"; die "installed http-cache-tests $got, wanted $SUITE_VERSION"; }
    chmod 755 "$tmp"
    rm -rf "$suite_home"
    mv "$tmp" "$suite_home"
}
install_suite

score() {
    node "$here/score.mjs" --suite "$pkg" --results "$results" \
        --expected "$here/expected-failures.txt" --summary "$here/results/summary.md"
}

if [ "$score_only" = 1 ]; then
    [ -f "$results" ] || die "no stored results at $results"
    score
    exit $?
fi

# --- edgecache binary ------------------------------------------------------------------
if [ -z "$bin" ]; then
    bin=${CARGO_TARGET_DIR:-$root/target}/release/edgecache
    [[ $bin = /* ]] || bin=$root/$bin
fi
if [ "$build" = 1 ]; then
    say "cargo build --release --bin edgecache"
    (cd "$root" && cargo build --release --bin edgecache) || die "cargo build failed"
fi
[ -x "$bin" ] || die "no edgecache binary at $bin (build it, or pass --bin)"

# --- processes ---------------------------------------------------------------------------
rundir=$(mktemp -d "${TMPDIR:-/tmp}/edgecache-conformance.XXXXXX")
logdir=$cache_root/last-run
origin_pid='' edge_pid=''

# shellcheck disable=SC2317 # called from the EXIT trap
stop() { # pid: TERM, then KILL after 5 s
    local pid=$1 _
    [ -n "$pid" ] || return 0
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
    local rc=$?
    stop "$edge_pid"
    stop "$origin_pid"
    rm -rf "$logdir"
    mkdir -p "$logdir"
    cp "$rundir"/*.log "$rundir"/*.err "$logdir/" 2>/dev/null || true
    rm -rf "$rundir"
    if [ "$rc" -ge 2 ]; then say "logs: $logdir"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 2' INT TERM

free_port() {
    node -e "const s=require('net').createServer();s.listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
tail_log() { say "last lines of $1:"; tail -n 20 "$rundir/$1" >&2 || true; }

# The suite's origin server. It takes its port from npm_config_port; 0 = the kernel picks a
# free one, which the server prints. loopback.mjs pins it to 127.0.0.1.
(cd "$rundir" && exec env npm_config_port=0 npm_config_protocol=http \
    npm_config_pidfile="$rundir/origin.pid" \
    node --import "$here/loopback.mjs" "$pkg/server/server.mjs") >"$rundir/origin.log" 2>&1 &
origin_pid=$!
origin_port=
deadline=$((SECONDS + 15))
while [ -z "$origin_port" ]; do
    kill -0 "$origin_pid" 2>/dev/null || { tail_log origin.log; die "the suite's origin server exited"; }
    [ "$SECONDS" -lt "$deadline" ] || { tail_log origin.log; die "the suite's origin server did not start"; }
    origin_port=$(sed -n 's|^Listening on http://127\.0\.0\.1:\([0-9]*\)/.*|\1|p' "$rundir/origin.log" | head -n 1)
    [ -n "$origin_port" ] || sleep 0.1
done

# edgecache as a plain RFC 9111 shared cache (the "RFC profile" in README.md): no default
# freshness and no proactive refresh (both are operator policy beyond the RFC), and expired
# entries kept for revalidation and for serving stale when the origin is unreachable, as
# nginx (`inactive`, `proxy_cache_use_stale`) and Varnish (`keep`, `grace`) do. A clean
# environment and an empty working directory, so no .env or stray variable leaks in.
start_edgecache() {
    edge_port=$(free_port)
    (cd "$rundir" && exec env -i PATH="$PATH" \
        UPSTREAM_URL="http://127.0.0.1:$origin_port" \
        LISTEN_ADDR="127.0.0.1:$edge_port" \
        DEFAULT_CACHE_EXPIRY_TIME_SECS=0 \
        DEFAULT_REFRESH_WINDOW_SECS=0 \
        STALE_RETENTION_SECS=3600 \
        STALE_IF_ERROR_SECS=60 \
        OPS_LISTEN_ADDR=off \
        REQ_TIMEOUT=10 \
        LOG_FORMAT=text \
        RUST_LOG=warn \
        NO_COLOR=1 \
        "$bin") >"$rundir/edgecache.log" 2>&1 &
    edge_pid=$!
    local deadline=$((SECONDS + 15))
    until port_open "$edge_port"; do
        if ! kill -0 "$edge_pid" 2>/dev/null; then
            wait "$edge_pid" 2>/dev/null || true
            edge_pid=
            return 1
        fi
        [ "$SECONDS" -lt "$deadline" ] || { tail_log edgecache.log; die "edgecache did not listen on 127.0.0.1:$edge_port"; }
        sleep 0.1
    done
}
started=0
for _ in 1 2 3; do # the port picked may have been taken in between
    if start_edgecache; then started=1; break; fi
done
[ "$started" = 1 ] || { tail_log edgecache.log; die "edgecache exited at start"; }
say "origin 127.0.0.1:$origin_port, edgecache 127.0.0.1:$edge_port ($bin)"

# --- the suite's CLI -----------------------------------------------------------------------
# cli.mjs reads npm_config_base / npm_config_id, falling back to npm_package_config_*; both
# are set so nothing from a surrounding npm environment applies. The base has no trailing
# slash (the client appends /test/<uuid>).
run_cli() {
    (cd "$pkg" && exec env npm_config_base="http://127.0.0.1:$edge_port" npm_package_config_base= \
        npm_config_id="$test_id" npm_package_config_id= \
        timeout 300 node --no-warnings cli.mjs)
}

if [ -n "$test_id" ]; then
    run_cli 2>&1 | tee "$rundir/cli.log"
    printf '\n==== What the origin server saw (its log)\n'
    cat "$rundir/origin.log"
    exit 0
fi

say "running http-cache-tests $SUITE_VERSION (takes ~20 s)"
cli_rc=0
run_cli >"$rundir/results.json" 2>"$rundir/cli.err" || cli_rc=$?
if [ "$cli_rc" -ne 0 ] || [ -s "$rundir/cli.err" ]; then
    tail_log cli.err
    die "the suite's CLI failed (exit $cli_rc)"
fi
node -e 'const r=JSON.parse(require("fs").readFileSync(process.argv[1],"utf8")); if(!Object.keys(r).length) process.exit(1)' \
    "$rundir/results.json" 2>/dev/null || { head -c 2000 "$rundir/results.json" >&2; die "the CLI did not print a results object"; }
if ! kill -0 "$edge_pid" 2>/dev/null; then
    tail_log edgecache.log
    die "edgecache died during the run"
fi
mkdir -p "$here/results"
cp "$rundir/results.json" "$results"
say "results: ${results#"$root"/} ($((SECONDS - start_time)) s so far)"

score_rc=0
score || score_rc=$?
say "done in $((SECONDS - start_time)) s"
exit "$score_rc"
