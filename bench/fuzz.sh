#!/usr/bin/env bash
# Policy parser fuzzing (not a test; a long run of tests/policy_fuzz.rs): generated TOML texts
# and random mutations of valid policies through Policy::from_toml, release build, checking
# that nothing panics, every error names file, line and field, and every accepted policy
# respects the caps. Usage: bench/fuzz.sh [TOTAL_CASES] (default 1,000,000, split evenly over
# the two generators). Exits non-zero, with the minimal failing input, if any case fails.
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-1000000}
PER=$(( (TOTAL + 1) / 2 ))
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
status=0
KEYROLL_FUZZ_CASES=$PER cargo test -q --release -p keyroll --test policy_fuzz -- --nocapture \
  >"$log" 2>&1 || status=$?
end=$(date +%s)
if [ "$status" -ne 0 ]; then
  cat "$log"
  echo "policy fuzz: FAILED (exit $status)"
  exit "$status"
fi
grep -E "policy fuzz:" "$log"
printf 'policy fuzz: %d generated + %d mutated = %d inputs, no panic, every error named file:line: field, in %d s\n' \
  "$PER" "$PER" $((2 * PER)) $((end - start))
