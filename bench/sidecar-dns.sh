#!/bin/sh
# keyroll-sidecar, activation = "dns": record served -> signing switched, median over ROTATIONS
# rotations against a loopback Knot DNS server, as a ratio to "negative TTL + one poll"; plus
# the DNS queries made at steady state. See bench/sidecar_dns_bench.py.
# Usage: [ROTATIONS=9] [POLL=2] [NEG_TTL=3] bench/sidecar-dns.sh  (results in
# bench/results-sidecar-dns.json). The figure is set by DNS timing, not CPU, so the dev build
# is used (SIDECAR_BIN overrides).
set -eu
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$PWD/target}"
export CARGO_TARGET_DIR
./scripts/setup.sh >/dev/null
cargo build -q -p keyroll-sidecar
exec .venv/bin/python bench/sidecar_dns_bench.py "$@"
