#!/usr/bin/env bash
# keyroll's whole test suite: unit tests (planner property tests, renderers, config) and the
# integration tests, which start real OpenBao servers on free loopback ports, a real OpenDKIM,
# real SMTP/HTTP receivers. Installs what they need first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The integration tests run the workspace binaries; build them first.
cargo build --workspace --bins
cargo test --workspace "$@"
