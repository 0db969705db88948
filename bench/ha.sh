#!/bin/sh
# Vault HA benchmark (not a test): leader loss on a 3-node OpenBao Raft cluster -> first
# successful `keyroll run` pass and first successful sidecar poll, median over KILLS (>= 5)
# kills, with the election time from the servers' logs side by side; then Vault requests per
# steady-state pass/poll with three addresses vs one. See bench/ha_bench.py.
# Usage: [KILLS=5] [INTERVAL=1] [PERF_MULT=5] bench/ha.sh
set -eu
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$PWD/target}"
export CARGO_TARGET_DIR
./scripts/setup.sh >/dev/null
cargo build -q --release -p keyroll-cli -p keyroll-sidecar
exec python3 bench/ha_bench.py "$@"
