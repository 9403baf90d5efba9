#!/usr/bin/env bash
# What a routes file costs a cache hit (issue 14): instructions per 1 KiB hit, counted by
# bench/hit_instructions.sh (callgrind, repeatable on a busy machine), without a routes file
# and with a 50-route one whose matching route for the hit is among 49 others (allowlist on,
# prefixes sharing leading bytes, some with method lists, one with injected headers).
#
#   bench/routes.sh [BINDIR]   (default: target/release; build it first with
#                               cargo build --release --bins)
set -euo pipefail
cd "$(dirname "$0")/.."
bindir=${1:-target/release}
file=$(mktemp --suffix=.toml)
trap 'rm -f "$file"' EXIT
{
    echo 'allowlist = true'
    for i in $(seq 1 48); do
        printf '\n[[routes]]\nprefix = "/api/v%d/"\n' "$i"
        if (( i % 3 == 0 )); then echo 'methods = ["GET", "POST"]'; fi
        if (( i % 5 == 0 )); then echo 'ttl_secs = 60'; fi
    done
    printf '\n[[routes]]\nprefix = "/by"\nmethods = ["POST"]\n'
    printf '\n[[routes]]\nprefix = "/bytes"\nkey_query_ignore = ["utm_*"]\nheaders = { X-Token = "bench" }\n'
} > "$file"

with=$(ROUTES_FILE=$file bench/hit_instructions.sh "$bindir")
echo "without a routes file: $(bench/hit_instructions.sh "$bindir")"
echo "with 50 routes:        $with"
