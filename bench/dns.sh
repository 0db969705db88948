#!/usr/bin/env bash
# DKIM/DNS benchmarks of the rotator (not a test), on loopback: an OpenBao dev server and a Knot
# DNS primary (zone example.com, TSIG key keyroll, the least-privilege TXT-under-_domainkey ACL),
# both started here.
#  1. rotation -> record confirmed at the authoritative server: `keyroll rotate` of an ed25519
#     DKIM key, then `keyroll apply` (publishes the new selector with an RFC 2136 UPDATE) and
#     `keyroll apply` again (every authoritative server answers it: confirmed), median over N
#     rotations (target <= 1 s). Reference in the same run: one raw `knsupdate` of the same kind
#     of record plus one `kdig` that sees it served (what publishing costs without keyroll).
#  2. a steady-state `keyroll apply` (nothing to do): DNS queries Knot answered and UPDATEs it
#     processed, from Knot's mod-stats counters and log (target: one query per record, no UPDATE).
# Usage: bench/dns.sh [ROTATIONS]   (default 20). KEYROLL_BENCH_PROFILE=debug uses the debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
PROFILE=${KEYROLL_BENCH_PROFILE:-release}
./scripts/setup.sh >/dev/null
if [ "$PROFILE" = release ]; then
  cargo build -q --release -p keyroll-cli
else
  cargo build -q -p keyroll-cli
fi
K="$PWD/target/$PROFILE/keyroll"
KNOTD=$(command -v knotd || echo /usr/sbin/knotd)
KNOTC=$(command -v knotc || echo /usr/sbin/knotc)
work=$(mktemp -d)
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(freeport)
dport=$(freeport)
export VAULT_ADDR="http://127.0.0.1:$port" VAULT_TOKEN="bench-$RANDOM$RANDOM"
BAO_DEV_ROOT_TOKEN_ID="$VAULT_TOKEN" .venv/bin/bao server -dev -dev-listen-address="127.0.0.1:$port" >"$work/bao.log" 2>&1 &
bao_pid=$!
knot_pid=
cleanup() { kill "$bao_pid" ${knot_pid:-} 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 100); do .venv/bin/bao status >/dev/null 2>&1 && break; sleep 0.1; done
.venv/bin/bao secrets enable transit >/dev/null

# Knot: one primary, TSIG key, the ACL keyroll documents, mod-stats for query counts.
mkdir -p "$work/knot/run" "$work/knot/db" "$work/knot/zones"
secret=$(python3 -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())')
echo "$secret" > "$work/tsig.key"
chmod 600 "$work/tsig.key"
cat > "$work/knot/zones/example.com.zone" <<EOF
\$ORIGIN example.com.
\$TTL 300
@   300 IN SOA ns1.example.com. hostmaster.example.com. 1 60 30 600 5
@       IN NS  ns1.example.com.
ns1     IN A   127.0.0.1
EOF
user=""
[ "$(id -u)" = 0 ] && user="    user: root:root"
cat > "$work/knot/knot.conf" <<EOF
server:
    rundir: "$work/knot/run"
    listen: 127.0.0.1@$dport
$user
log:
  - target: stderr
    any: info
database:
    storage: "$work/knot/db"
key:
  - id: keyroll
    algorithm: hmac-sha256
    secret: $secret
acl:
  - id: keyroll-dkim
    key: keyroll
    action: update
    update-type: [TXT]
    update-owner: name
    update-owner-match: sub
    update-owner-name: [_domainkey]
mod-stats:
  - id: default
    query-type: on
template:
  - id: default
    storage: "$work/knot/zones"
    zonefile-sync: -1
    journal-content: changes
    global-module: mod-stats/default
zone:
  - domain: example.com
    acl: [keyroll-dkim]
EOF
"$KNOTD" -c "$work/knot/knot.conf" >"$work/knot.log" 2>&1 &
knot_pid=$!
for _ in $(seq 100); do
  kdig @127.0.0.1 -p "$dport" +short example.com SOA >/dev/null 2>&1 && break; sleep 0.1
done

cat > "$work/policy.toml" <<EOF
[[dns.target]]
name = "primary"
kind = "rfc2136"
zone = "example.com"
server = "127.0.0.1:$dport"
tsig_key = "keyroll"
tsig_secret_file = "$work/tsig.key"
servers = ["127.0.0.1:$dport"]
ttl = "60s"

[[keys]]
name = "dkim-bench"
type = "ed25519"
rotate_every = "30d"
keep_versions = 2

[keys.dns]
target = "primary"
domain = "example.com"
EOF

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk "BEGIN {printf \"%.2f\", $1 / $2}"; }
now() { date +%s.%N; }
updates() { grep -c 'DDNS, processing' "$work/knot.log" || true; }
queries() { # TXT queries Knot answered so far (mod-stats)
  "$KNOTC" -c "$work/knot/knot.conf" stats mod-stats.query-type 2>/dev/null \
    | awk -F' = ' '/\[TXT\]/ {s += $2} END {print s + 0}'
}
apply_json() { "$K" -c "$work/policy.toml" apply -o json 2>>"$work/keyroll.log"; }

# Create v1 and settle it (published, confirmed).
apply_json >/dev/null
apply_json >/dev/null

: > "$work/rot.txt"
for i in $(seq "$N"); do
  s=$(now)
  "$K" -c "$work/policy.toml" rotate dkim-bench >/dev/null 2>>"$work/keyroll.log"
  apply_json > "$work/a1.json"
  apply_json > "$work/a2.json"
  e=$(now)
  grep -q '"action": "publish"' "$work/a1.json" || { echo "run $i: no publish"; cat "$work/a1.json"; exit 1; }
  grep -q '"action": "confirm"' "$work/a2.json" || { echo "run $i: no confirm"; cat "$work/a2.json"; exit 1; }
  awk "BEGIN {print $e - $s}" >> "$work/rot.txt"
done
rot=$(median < "$work/rot.txt")

# Reference: a raw UPDATE of a DKIM-sized TXT record and a query that sees it served.
: > "$work/ref.txt"
for i in $(seq "$N"); do
  s=$(now)
  printf 'server 127.0.0.1 %s\nzone example.com.\nupdate add ref%d._domainkey.example.com. 60 TXT "v=DKIM1; k=ed25519; p=%s"\nsend\n' \
    "$dport" "$i" "$(head -c 32 /dev/urandom | base64)" \
    | knsupdate -y "hmac-sha256:keyroll:$secret" >/dev/null
  until kdig @127.0.0.1 -p "$dport" +short "ref$i._domainkey.example.com" TXT | grep -q DKIM1; do :; done
  e=$(now)
  awk "BEGIN {print $e - $s}" >> "$work/ref.txt"
done
ref=$(median < "$work/ref.txt")
printf 'rotation -> record confirmed (rotate + publish run + confirm run), median of %d: %.3f s (target <= 1 s); raw knsupdate + kdig %.3f s: %sx\n' \
  "$N" "$rot" "$ref" "$(ratio "$rot" "$ref")"

# Steady state: nothing to do.
u0=$(updates); q0=$(queries)
out=$(apply_json)
u1=$(updates); q1=$(queries)
echo "$out" | grep -q '"action"' && { echo "steady-state apply did something: $out"; exit 1; }
records=$(echo "$out" | grep -c '"owner"' || true)
printf 'steady-state apply: %d record(s) on record, %d TXT queries, %d UPDATEs (target: one query per record, no UPDATE)\n' \
  "$records" "$((q1 - q0))" "$((u1 - u0))"
