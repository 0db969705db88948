#!/bin/sh
# Property/fuzz run of the sidecar config parser and the renderers with many more generated
# inputs than the normal suite (which runs a few thousand of each): by default 350,000 for
# each of the three harnesses, 1,050,000 in all. Not part of the test suite's time budget.
# Usage: [CASES=350000] bench/sidecar_fuzz.sh
# Each harness prints how many inputs it ran and where they ended (accepted / refused).
set -eu
cd "$(dirname "$0")/.."
CASES="${CASES:-350000}"
export KEYROLL_FUZZ_CASES="$CASES"
start=$(date +%s)
# Release builds: the harnesses are CPU-bound and run ~10x faster optimised.
cargo test --release -p keyroll --lib render::fuzz -- --nocapture 2>&1 | grep -E "renderers:|test result|panicked"
cargo test --release -p keyroll-sidecar config_fuzz -- --nocapture --test-threads=1 2>&1 | grep -E "config parser|test result|panicked"
end=$(date +%s)
echo "3 harnesses x $CASES generated inputs = $((3 * CASES)) in $((end - start)) s (including the build)"
