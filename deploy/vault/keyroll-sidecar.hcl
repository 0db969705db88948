# keyroll-sidecar.hcl — the least a `keyroll-sidecar` needs: read the keys it serves, export
# their signing keys, and report which version its mailer signs with. Nothing else writes.
#
# Scope shipped here: transit keys whose names start with "mail-" on the mount "transit",
# delivered as DKIM keys (format "opendkim" or "pem" of rsa/ed25519/ecdsa keys, which export as
# "signing-key"). To adapt: replace "transit/" and "mail-" as for keyroll-rotator.hcl, or name
# each key: "transit/keys/mail-dkim" and "transit/export/signing-key/mail-dkim*".
#
# Deliberately absent:
#   - create/update on transit/keys/*: no creating, rotating, reconfiguring or trimming keys;
#   - transit/encrypt/*, transit/sign/*, transit/hmac/*: `encrypt` on a missing key creates
#     it when the token holds "create" on that path, so a typo would silently make a new key;
#     the sidecar only ever reads transit;
#   - keyroll's own state (secret/data/keyroll/keys/*, locks): only the signing reports below.

# GET transit/keys/<name>: versions, type, exportable — one cheap read per key per poll.
path "transit/keys/mail-*" {
  capabilities = ["read"]
}

# GET transit/export/signing-key/<name> (and .../<name>/<version>): the key material to render.
path "transit/export/signing-key/mail-*" {
  capabilities = ["read"]
}

# keyring-json of symmetric keys needs the other export kinds; uncomment what you serve:
# path "transit/export/encryption-key/mail-*" { capabilities = ["read"] }   # aes*, chacha20
# path "transit/export/hmac-key/mail-*"       { capabilities = ["read"] }   # hmac

# Signing reports ([report] in sidecar.toml, on by default): after a DKIM key's signing
# selector changes, and hourly, the sidecar writes one KV v2 entry
# <state mount>/data/<state path>/signing/<transit mount>/<key>/<sidecar id>, and reads its own
# entry once at start (to keep "since" across restarts). keyroll reads these to hold the old
# version until every mailer signs with the new one. Adapt "secret" and "keyroll" to
# [report] state_mount / state_path (keyroll's [state]); drop this block with enabled = false.
path "secret/data/keyroll/signing/transit/mail-*" {
  capabilities = ["create", "update", "read"]
}

# Token lookup and renewal for a long-running sidecar (see keyroll-rotator.hcl).
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
