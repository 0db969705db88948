#!/bin/sh
# One-shot init for the keyroll dev stack (docker-compose.yml's `init` service; also run by
# tests/deploy_compose.rs against a local OpenBao). Idempotent: safe to run again.
#
#   - enables transit and AppRole (if not yet enabled);
#   - loads the shipped least-privilege policies deploy/vault/keyroll-{rotator,sidecar}.hcl;
#   - creates one AppRole per program, bound to its policy only (no default policy);
#   - writes each program's role_id and a fresh secret_id into its own directory, readable by
#     the program's uid only (the rotator cannot read the sidecar's and vice versa).
#
# Environment: VAULT_ADDR, VAULT_TOKEN (root or an admin token), POLICY_DIR, ROTATOR_CREDS,
# SIDECAR_CREDS, OWNER (uid:gid to chown the credentials and KEYS_DIR to; empty: no chown),
# KEYS_DIR (optional: the sidecar's output volume, chowned to OWNER), APPROLE_MOUNT, BAO.
set -eu

: "${VAULT_ADDR:?set VAULT_ADDR}"
: "${VAULT_TOKEN:?set VAULT_TOKEN}"
POLICY_DIR=${POLICY_DIR:-/policies}
ROTATOR_CREDS=${ROTATOR_CREDS:-/creds/rotator}
SIDECAR_CREDS=${SIDECAR_CREDS:-/creds/sidecar}
OWNER=${OWNER-10001:10001}
KEYS_DIR=${KEYS_DIR:-}
APPROLE_MOUNT=${APPROLE_MOUNT:-approle}
BAO=${BAO:-bao}
export VAULT_ADDR VAULT_TOKEN

log() { echo "init: $*"; }

i=0
until "$BAO" status >/dev/null 2>&1; do
  i=$((i + 1))
  if [ "$i" -gt 60 ]; then
    echo "init: OpenBao at $VAULT_ADDR did not answer in 60s" >&2
    exit 1
  fi
  sleep 1
done

if "$BAO" secrets list -format=json | grep -q '"transit/"'; then
  log "transit already enabled"
else
  "$BAO" secrets enable transit >/dev/null
  log "enabled transit"
fi
if "$BAO" auth list -format=json | grep -q "\"$APPROLE_MOUNT/\""; then
  log "AppRole already enabled at auth/$APPROLE_MOUNT"
else
  "$BAO" auth enable -path="$APPROLE_MOUNT" approle >/dev/null
  log "enabled AppRole at auth/$APPROLE_MOUNT"
fi

# credentials ROLE DIR: role bound to the shipped policy ROLE; its IDs written into DIR.
credentials() {
  role=$1
  dir=$2
  "$BAO" policy write "$role" "$POLICY_DIR/$role.hcl" >/dev/null
  "$BAO" write "auth/$APPROLE_MOUNT/role/$role" \
    token_policies="$role" token_no_default_policy=true \
    token_ttl=1h token_max_ttl=24h secret_id_ttl=0 >/dev/null
  mkdir -p "$dir"
  umask 077
  "$BAO" read -field=role_id "auth/$APPROLE_MOUNT/role/$role/role-id" >"$dir/role_id"
  "$BAO" write -f -field=secret_id "auth/$APPROLE_MOUNT/role/$role/secret-id" >"$dir/secret_id"
  chmod 0400 "$dir/role_id" "$dir/secret_id"
  chmod 0500 "$dir"
  if [ -n "$OWNER" ]; then chown -R "$OWNER" "$dir"; fi
  log "policy $role loaded; AppRole $role bound to it; credentials in $dir"
}
credentials keyroll-rotator "$ROTATOR_CREDS"
credentials keyroll-sidecar "$SIDECAR_CREDS"

if [ -n "$KEYS_DIR" ]; then
  mkdir -p "$KEYS_DIR"
  chmod 0750 "$KEYS_DIR"
  if [ -n "$OWNER" ]; then chown "$OWNER" "$KEYS_DIR"; fi
  log "$KEYS_DIR ready for keyroll-sidecar"
fi
log "done"
