#!/usr/bin/env bash
# Instructions per cache hit (user space), counted by valgrind's callgrind: repeatable for the
# same binary whatever else the machine is doing, unlike wall-clock throughput. Runs edgecache
# under callgrind in front of mock-origin, sends 1,000 and then 5,000 keep-alive hits for one
# 1 KiB object, and prints the difference per request.
#
#   bench/hit_instructions.sh [BINDIR]   (default: target/release; build it first with
#                                         cargo build --release --bins)
set -euo pipefail
cd "$(dirname "$0")/.."
bindir=${1:-target/release}
command -v valgrind >/dev/null || { echo "valgrind is required (apt-get install -y valgrind)" >&2; exit 2; }

total_after() {
    local n=$1 out port_o port_p mo ec
    out=$(mktemp)
    port_o=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    port_p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$bindir/mock-origin" --listen "127.0.0.1:$port_o" >/dev/null 2>&1 &
    mo=$!
    UPSTREAM_URL=http://127.0.0.1:$port_o LISTEN_ADDR=127.0.0.1:$port_p OPS_LISTEN_ADDR=off \
        RUST_LOG=off DEFAULT_CACHE_EXPIRY_TIME_SECS=600 HEALTH_CHECK_INTERVAL_SECS=0 \
        SHUTDOWN_GRACE_SECS=1 \
        valgrind --tool=callgrind --callgrind-out-file="$out" "$bindir/edgecache" >/dev/null 2>&1 &
    ec=$!
    python3 - "$port_p" "$n" <<'PY'
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
deadline = time.time() + 60
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port))
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("edgecache did not start")
        time.sleep(0.05)
req = b"GET /bytes?size=1024 HTTP/1.1\r\nhost: bench\r\n\r\n"
def one():
    s.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, body = buf.split(b"\r\n\r\n", 1)
    length = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")]
    cl = int(length[0].split(b":")[1])
    while len(body) < cl:
        body += s.recv(65536)
    return head
one()  # the miss that fills the cache
for _ in range(n):
    head = one()
assert b"x-cache-status: HIT" in head.lower().replace(b"hit", b"HIT"), head
s.close()
PY
    kill -INT "$ec"; wait "$ec" || true
    kill "$mo"; wait "$mo" 2>/dev/null || true
    sed -n 's/^summary: //p' "$out"
    rm -f "$out"
}

a=$(total_after 1000)
b=$(total_after 5000)
echo "instructions per 1 KiB hit: $(( (b - a) / 4000 ))  ($bindir/edgecache)"
