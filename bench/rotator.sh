#!/usr/bin/env bash
# Rotator benchmarks (not a test), release build, on a loopback OpenBao dev server started here:
#  1. `keyroll validate` over 1,000, 10,000 and 100,000 keys (median of R runs each): loading is
#     linear (target: 100,000 keys in at most 1 s);
#  2. the no-op apply over 1,000 keys with reads 16 at a time ([run] concurrency) against the
#     same with concurrency = 1 (reads one by one) as the reference, Vault holding 1,000 keys;
#  3. a no-op `keyroll apply` over 1,000 and 10,000 managed keys (median of R runs each), Vault
#     holding BIG keys: the 10,000-key run within 1.5x of 10x the 1,000-key run of the same
#     script run (linear); and over BIG keys, reported;
#  4. the resident memory of `keyroll run` idling with 100 managed keys.
# Usage: bench/rotator.sh [RUNS] [BIG]   (BIG = the large key count, default 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-5}
BIG=${2:-100000}
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
    for i in $(seq 1 "$2"); do printf '[[keys]]\nname = "bench-%06d"\n' "$i"; done; } > "$1"
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
time_runs() { # $1 = runs, then the command
  local n=$1; shift
  for _ in $(seq "$n"); do
    s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N)
    awk "BEGIN {print $e - $s}"
  done | median
}
ratio() { awk "BEGIN {printf \"%.2f\", $1 / $2}"; }

for n in 1000 10000 "$BIG"; do policy "$work/p$n.toml" "$n" 16; done
policy "$work/seq1000.toml" 1000 1

v1k=$(time_runs "$R" "$K" -c "$work/p1000.toml" validate)
v10k=$(time_runs "$R" "$K" -c "$work/p10000.toml" validate)
vbig=$(time_runs "$R" "$K" -c "$work/p$BIG.toml" validate)
printf 'validate: 1,000 keys %.3f s, 10,000 keys %.3f s, %d keys %.3f s (target <= 1 s); %d/1,000 = %sx for %dx the keys\n' \
  "$v1k" "$v10k" "$BIG" "$vbig" "$BIG" "$(ratio "$vbig" "$v1k")" $((BIG / 1000))

create() { # $1 = first, $2 = last: keys bench-FIRST..LAST straight to Vault, 16 at a time
  # (keyroll's own create path takes a lock per key; this is only setup).
  python3 - "$VAULT_ADDR" "$VAULT_TOKEN" "$1" "$2" <<'PY'
import http.client, json, sys, threading
addr, token, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
host = addr.split("//", 1)[1]
def worker(start):
    c = http.client.HTTPConnection(host)
    for i in range(start, hi + 1, 16):
        c.request("POST", f"/v1/transit/keys/bench-{i:06d}", json.dumps({"type": "aes256-gcm96"}),
                  {"X-Vault-Token": token})
        r = c.getresponse(); r.read()
        if r.status >= 300:
            sys.exit(f"create bench-{i:06d}: {r.status}")
ts = [threading.Thread(target=worker, args=(lo + i,)) for i in range(16)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
}
noop() { # $1 = policy: must be a no-op apply
  local out
  out=$("$K" -c "$1" apply 2>&1 | tail -1)
  case "$out" in *" 0 changed, 0 failed, 0 drifted"*) ;; *) echo "not a no-op: $out"; exit 1;; esac
}

# Concurrency against the reference, on a Vault holding just these 1,000 keys.
create 1 1000
noop "$work/p1000.toml"
conc=$(time_runs "$R" "$K" -c "$work/p1000.toml" apply)
seq=$(time_runs "$R" "$K" -c "$work/seq1000.toml" apply)
printf 'no-op apply, 1,000 keys: concurrent (16) %.3f s, one by one %.3f s (reference) -> %sx of reference, %sx faster\n' \
  "$conc" "$seq" "$(ratio "$conc" "$seq")" "$(ratio "$seq" "$conc")"

echo "creating $BIG keys..."
create 1001 "$BIG"
noop "$work/p10000.toml"
noop "$work/p$BIG.toml"
# Linearity on one Vault (holding all $BIG keys): only the policy's key count differs.
a1k=$(time_runs "$R" "$K" -c "$work/p1000.toml" apply)
a10k=$(time_runs "$R" "$K" -c "$work/p10000.toml" apply)
abig=$(time_runs 1 "$K" -c "$work/p$BIG.toml" apply)
printf 'no-op apply (Vault holding %d keys): 1,000 keys %.3f s, 10,000 keys %.3f s = %sx of 10x the 1,000-key time (target <= 1.5x); %d keys %.3f s\n' \
  "$BIG" "$a1k" "$a10k" "$(ratio "$a10k" "$(awk "BEGIN {print 10 * $a1k}")")" "$BIG" "$abig"

policy "$work/run100.toml" 100 16
"$K" -c "$work/run100.toml" --log-format json run --interval 1h >"$work/run.log" 2>&1 &
run_pid=$!
for _ in $(seq 200); do grep -q "pass finished" "$work/run.log" && break; sleep 0.05; done
sleep 2
rss=$(awk '/VmRSS/ {print $2}' "/proc/$run_pid/status")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$run_pid/status")
printf 'keyroll run idle with 100 keys: RSS %.1f MiB (peak %.1f MiB); budget 10 MiB -> %.2fx of budget\n' \
  "$(awk "BEGIN {print $rss / 1024}")" "$(awk "BEGIN {print $hwm / 1024}")" "$(awk "BEGIN {print $rss / 10240}")"
