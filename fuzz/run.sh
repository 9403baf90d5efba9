#!/usr/bin/env bash
# Builds a fuzz target (the header parsers by default) with libFuzzer coverage
# instrumentation (the flags cargo-fuzz uses, on the stable toolchain, without a sanitizer)
# and fuzzes it for N seconds (default 60) starting from the committed corpus. New interesting inputs go to a scratch
# copy; a crash leaves `crash-*` in fuzz/artifacts/ — add it to fuzz/corpus/<target>/ once
# fixed, so tests/parser_corpus.rs replays it on every `cargo test`.
#   fuzz/run.sh [SECONDS [TARGET]]   0 = build only; TARGET: header_parsers (default), head_scan, entry_codec
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
bin=${2:-header_parsers}
target=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares"
cargo build --release --target "$target" --bin "$bin"
[ "$seconds" -gt 0 ] || exit 0
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp "corpus/$bin"/* "$scratch"/
mkdir -p artifacts
"target/$target/release/$bin" -max_total_time="$seconds" -max_len=4096 \
    -artifact_prefix=artifacts/ "$scratch" "corpus/$bin" 2>&1 | tail -n 3
