#!/usr/bin/env bash
# Rotator benchmarks (not a test): on a loopback OpenBao dev server started here,
#  1. a no-op `keyroll apply` over N managed keys (default 1000), reads concurrent at the
#     policy's [run] concurrency, against the same apply with concurrency = 1 (the reads one
#     by one) as the reference, measured in the same run; median of R runs each;
#  2. the resident memory of `keyroll run` idling with 100 managed keys.
# Usage: bench/rotator.sh [N_KEYS] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
R=${2:-5}
./scripts/setup.sh >/dev/null
cargo build -q --release -p keyroll-cli
K="$PWD/target/release/keyroll"
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export VAULT_ADDR="http://127.0.0.1:$port" VAULT_TOKEN="bench-$RANDOM$RANDOM"
BAO_DEV_ROOT_TOKEN_ID="$VAULT_TOKEN" .venv/bin/bao server -dev -dev-listen-address="127.0.0.1:$port" >"$work/bao.log" 2>&1 &
bao_pid=$!
cleanup() { kill "$bao_pid" ${run_pid:-} 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 100); do .venv/bin/bao status >/dev/null 2>&1 && break; sleep 0.1; done
.venv/bin/bao secrets enable transit >/dev/null

policy() { # $1 = file, $2 = key count, $3 = concurrency
  { printf '[run]\nconcurrency = %s\n[defaults]\ntype = "aes256-gcm96"\nrotate_every = "90d"\nkeep_versions = 2\n' "$3"
    for i in $(seq 1 "$2"); do printf '[[keys]]\nname = "bench-%04d"\n' "$i"; done; } > "$1"
}
policy "$work/conc.toml" "$N" 16
policy "$work/seq.toml" "$N" 1
echo "creating $N keys..."
"$K" -c "$work/conc.toml" apply >/dev/null 2>&1

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
time_runs() { # $1 = policy
  for _ in $(seq "$R"); do
    s=$(date +%s.%N); "$K" -c "$1" apply >/dev/null 2>&1; e=$(date +%s.%N)
    awk "BEGIN {print $e - $s}"
  done | median
}
conc=$(time_runs "$work/conc.toml")
seq=$(time_runs "$work/seq.toml")
printf 'no-op apply, %d keys: concurrent (16) %.3f s, one by one %.3f s (reference) -> %.2fx of reference, %.1fx faster\n' \
  "$N" "$conc" "$seq" "$(awk "BEGIN {print $conc / $seq}")" "$(awk "BEGIN {print $seq / $conc}")"

policy "$work/run100.toml" 100 16
"$K" -c "$work/run100.toml" apply >/dev/null 2>&1
"$K" -c "$work/run100.toml" --log-format json run --interval 1h >"$work/run.log" 2>&1 &
run_pid=$!
for _ in $(seq 200); do grep -q "pass finished" "$work/run.log" && break; sleep 0.05; done
sleep 2
rss=$(awk '/VmRSS/ {print $2}' "/proc/$run_pid/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$run_pid/status")
printf 'keyroll run idle with 100 keys: RSS %.1f MiB (peak %.1f MiB); budget 10 MiB -> %.2fx of budget\n' \
  "$(awk "BEGIN {print $rss / 1024}")" "$(awk "BEGIN {print $hwm / 1024}")" "$(awk "BEGIN {print $rss / 10240}")"
