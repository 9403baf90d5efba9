#!/usr/bin/env bash
# Builds the header-parser fuzz target with libFuzzer coverage instrumentation (the flags
# cargo-fuzz uses, on the stable toolchain, without a sanitizer) and fuzzes it for N seconds
# (default 60) starting from the committed corpus. New interesting inputs go to a scratch
# copy; a crash leaves `crash-*` in fuzz/artifacts/ — add it to fuzz/corpus/header_parsers/ once
# fixed, so tests/parser_corpus.rs replays it on every `cargo test`.
#   fuzz/run.sh [SECONDS]        0 = build only
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
target=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares"
cargo build --release --target "$target" --bin header_parsers
[ "$seconds" -gt 0 ] || exit 0
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp corpus/header_parsers/* "$scratch"/
mkdir -p artifacts
"target/$target/release/header_parsers" -max_total_time="$seconds" -max_len=4096 \
    -artifact_prefix=artifacts/ "$scratch" corpus/header_parsers 2>&1 | tail -n 3
