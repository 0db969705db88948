#!/usr/bin/env bash
# Data-key benchmarks (not a test), on a loopback OpenBao dev server and a throwaway PostgreSQL
# 15 cluster started here, plus a SQLite file:
#  1. `keyroll rewrap` end to end (read rows, transit batch rewrap, compare-and-swap write) of N
#     rows at v1 (default 100,000), on PostgreSQL and on SQLite, against two references in the
#     same run: a row-by-row loop (bench/rewrap_row_by_row.rs: one rewrap request and one
#     UPDATE per row, like HashiCorp's rewrap example; timed over REF rows, default 5,000) and a
#     plain SQL UPDATE of the same rows (the database alone: the ceiling for any rewrap);
#  2. `keyroll census` of C rows (default 1,000,000, generated in SQL) on PostgreSQL, against
#     the census query alone in psql;
#  3. peak RSS of the PostgreSQL rewrap (VmHWM).
# Each rewrap run starts from the same v1 rows (copied from a seed table).
# Usage: bench/rewrap.sh [N_ROWS] [CENSUS_ROWS] [REF_ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
C=${2:-1000000}
REF=${3:-5000}
PG_BIN=/usr/lib/postgresql/15/bin
./scripts/setup.sh >/dev/null
cargo build -q --release -p keyroll-cli
cargo build -q --release -p keyroll --example rewrap_row_by_row
K="$PWD/target/release/keyroll"
LOOP="$PWD/target/release/examples/rewrap_row_by_row"
work=$(mktemp -d)
chmod 755 "$work"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

bport=$(free_port)
export VAULT_ADDR="http://127.0.0.1:$bport" VAULT_TOKEN="bench-$RANDOM$RANDOM"
BAO_DEV_ROOT_TOKEN_ID="$VAULT_TOKEN" .venv/bin/bao server -dev -dev-listen-address="127.0.0.1:$bport" >"$work/bao.log" 2>&1 &
bao_pid=$!
pport=$(free_port)
mkdir -p "$work/pg"
[ "$(id -u)" = 0 ] && chown postgres "$work/pg"
cleanup() {
  as_pg "$PG_BIN/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
  kill "$bao_pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"
}
trap cleanup EXIT
as_pg "$PG_BIN/initdb" -D "$work/pg/data" -A trust -U kr --no-sync -E UTF8 --locale=C >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w \
  -o "-p $pport -k $work/pg -c listen_addresses=127.0.0.1" start >/dev/null
export KEYROLL_BENCH_DB_URL="postgres://kr@127.0.0.1:$pport/postgres"
psql() { "$PG_BIN/psql" -h 127.0.0.1 -p "$pport" -U kr -d postgres -X -q -A -t -v ON_ERROR_STOP=1 "$@"; }
for _ in $(seq 100); do .venv/bin/bao status >/dev/null 2>&1 && break; sleep 0.1; done
.venv/bin/bao secrets enable transit >/dev/null
.venv/bin/bao write -f transit/keys/bench >/dev/null

echo "encrypting $N seed rows at v1..."
python3 - "$N" "$work/seed.csv" <<'PY'
import base64, http.client, json, os, sys, urllib.parse
n, out = int(sys.argv[1]), sys.argv[2]
u = urllib.parse.urlparse(os.environ["VAULT_ADDR"])
conn = http.client.HTTPConnection(u.hostname, u.port)
hdr = {"X-Vault-Token": os.environ["VAULT_TOKEN"], "Content-Type": "application/json"}
with open(out, "w") as f:
    for start in range(1, n + 1, 200):
        ids = range(start, min(start + 200, n + 1))
        body = {"batch_input": [{"plaintext": base64.b64encode(f"subscriber-{i}@example.com".encode()).decode()} for i in ids]}
        conn.request("POST", "/v1/transit/encrypt/bench", json.dumps(body), hdr)
        res = json.loads(conn.getresponse().read())["data"]["batch_results"]
        for i, r in zip(ids, res):
            f.write(f"{i},{r['ciphertext']}\n")
PY
.venv/bin/bao write -f transit/keys/bench/rotate >/dev/null
psql -c "CREATE TABLE seed (id bigint PRIMARY KEY, c text)" -c "\copy seed FROM '$work/seed.csv' WITH (FORMAT csv)" \
  -c "CREATE TABLE subscribers (id bigint PRIMARY KEY, c text)"
sqlite3 "$work/app.db" "CREATE TABLE seed (id INTEGER PRIMARY KEY, c TEXT); CREATE TABLE subscribers (id INTEGER PRIMARY KEY, c TEXT);" \
  ".mode csv" ".import $work/seed.csv seed"

policy() { # $1 = engine
  if [ "$1" = postgres ]; then conn='engine = "postgres"
url_env = "KEYROLL_BENCH_DB_URL"'; else conn="engine = \"sqlite\"
path = \"$work/app.db\""; fi
  printf '[[keys]]\nname = "bench"\ntype = "aes256-gcm96"\nrotate_every = "30d"\n[[keys.data]]\n%s\ntable = "subscribers"\ncolumn = "c"\nprimary_key = "id"\n' "$conn" >"$work/$1.toml"
}
policy postgres
policy sqlite
reset() { # $1 = engine
  if [ "$1" = postgres ]; then psql -c "TRUNCATE subscribers" -c "INSERT INTO subscribers SELECT * FROM seed" -c "VACUUM ANALYZE subscribers"
  else sqlite3 "$work/app.db" "DELETE FROM subscribers; INSERT INTO subscribers SELECT * FROM seed;"; fi
}
secs() { awk "BEGIN {printf \"%.2f\", $2 - $1}"; }
now() { date +%s.%N; }
# Runs keyroll rewrap; prints "seconds peak_rss_kib".
rewrap() { # $1 = engine, rest = flags
  local e=$1; shift
  reset "$e"
  local s; s=$(now)
  /usr/bin/time -f '%M' -o "$work/rss" "$K" -c "$work/$e.toml" -o json --log-level warn rewrap --progress never "$@" \
    >"$work/out" 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
  local e2; e2=$(now)
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))[0]["sources"][0]; sys.exit(r["rewrapped"] != int(sys.argv[2]))' "$work/out" "$N" \
    || { echo "rewrap did not move all $N rows: $(cat "$work/out")" >&2; exit 1; }
  echo "$(secs "$s" "$e2") $(cat "$work/rss")"
}
sql_update() { # $1 = engine: the same rows rewritten by the database alone
  reset "$1"
  local s; s=$(now)
  if [ "$1" = postgres ]; then psql -c "UPDATE subscribers SET c = 'vault:v2:' || substr(c, 10)"
  else sqlite3 "$work/app.db" "UPDATE subscribers SET c = 'vault:v2:' || substr(c, 10);"; fi
  secs "$s" "$(now)"
}
rate() { awk "BEGIN {printf \"%.0f\", $N / $1}"; }

row_by_row() { # $1 = engine: rows/s of the reference loop over REF rows
  reset "$1"
  if [ "$1" = postgres ]; then "$LOOP" postgres "$KEYROLL_BENCH_DB_URL" subscribers bench "$REF"
  else "$LOOP" sqlite "$work/app.db" subscribers bench "$REF"; fi
}

for e in postgres sqlite; do
  read -r t rss < <(rewrap "$e")
  r1=$(row_by_row "$e")
  tsql=$(sql_update "$e")
  printf '%-8s rewrap %d rows: %6.2f s = %6s rows/s (peak RSS %.1f MiB) | row by row: %5s rows/s -> %.1fx | SQL UPDATE alone: %5.2f s = %7s rows/s -> rewrap at %.0f%% of it\n' \
    "$e" "$N" "$t" "$(rate "$t")" "$(awk "BEGIN {print $rss / 1024}")" "$r1" \
    "$(awk "BEGIN {print $N / $t / $r1}")" "$tsql" "$(rate "$tsql")" "$(awk "BEGIN {print 100 * $tsql / $t}")"
done

echo "generating $C rows for the census..."
psql -c "CREATE TABLE big (id bigint PRIMARY KEY, c text)" \
  -c "INSERT INTO big SELECT g, CASE WHEN g % 50 = 0 THEN NULL ELSE 'vault:v' || (g % 3 + 1) || ':' || md5(g::text) END FROM generate_series(1, $C) g" \
  -c "VACUUM ANALYZE big"
sed 's/table = "subscribers"/table = "big"/' "$work/postgres.toml" >"$work/big.toml"
s=$(now); "$K" -c "$work/big.toml" --log-level warn census >/dev/null; tc=$(secs "$s" "$(now)")
s=$(now); psql -c "SELECT split_part(c, ':', 2), count(*) FROM big GROUP BY 1" >/dev/null; tq=$(secs "$s" "$(now)")
printf 'census of %d rows on postgres: keyroll census %.2f s (whole command) | the bare split_part query in psql: %.2f s -> %.2fx of it\n' \
  "$C" "$tc" "$tq" "$(awk "BEGIN {print $tc / $tq}")"
