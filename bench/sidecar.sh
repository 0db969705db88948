#!/bin/sh
# keyroll-sidecar vs OpenBao Agent on one loopback OpenBao dev server (see sidecar_bench.py).
# Usage: [BENCH_DIR=/dev/shm] bench/sidecar.sh
# (IDLE_SECS, PUSH_ROTATIONS, POLL_ROTATIONS, TORN_ROTATIONS tune it; results in bench/results.json)
set -eu
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$PWD/target}"
export CARGO_TARGET_DIR
cargo build --profile release-small -p keyroll-sidecar
exec .venv/bin/python bench/sidecar_bench.py "$@"
