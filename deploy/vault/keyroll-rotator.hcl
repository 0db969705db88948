# keyroll-rotator.hcl — the least a `keyroll` rotator needs, and nothing more.
#
# Scope shipped here: transit keys whose names start with "mail-" on the mount "transit", and
# keyroll's own state under the KV v2 mount "secret" at "keyroll" (the policy.toml defaults
# [state] mount = "secret", path = "keyroll").
#
# To adapt:
#   - another transit mount:   replace "transit/" everywhere below (one block per mount);
#   - another name prefix:     replace "mail-" (a glob only works at the end of a path, so a
#                              prefix is the finest scope; or list each key by its full name:
#                              "transit/keys/mail-dkim" plus "transit/keys/mail-dkim/*");
#   - another [state] mount or path: replace "secret/data/keyroll/",
#                              "secret/metadata/keyroll/" and "secret/metadata/keyroll/signing/".
#
# What each line is for is written beside it. The rotator never exports key material: there is
# no "transit/export/..." line, so a leaked rotator token cannot read a private key. It cannot
# delete keys either (no "delete" capability; transit also requires deletion_allowed).
# sys/health needs no policy (it is unauthenticated).

# Read a key (GET transit/keys/<name>), create it (POST transit/keys/<name>; transit has no
# existence check, so creation is checked as "update"), and through the trailing glob:
#   POST transit/keys/<name>/rotate   rotate to a new version
#   POST transit/keys/<name>/config   retire (min_decryption_version), set min_encryption_version
#   POST transit/keys/<name>/trim     dispose (min_available_version), irreversible by design
# (import and import_version also live under this prefix; transit refuses them for keys it
# generated itself, and the rotator cannot read transit/wrapping_key.)
path "transit/keys/mail-*" {
  capabilities = ["create", "read", "update"]
}

# `keyroll rewrap` (data keys, [[keys.data]]): transit's batch rewrap re-encrypts stored
# ciphertexts under the latest version without ever showing keyroll a plaintext
# (POST transit/rewrap/<name>). `keyroll census` needs nothing in Vault beyond the state paths
# below. Drop this block if no key has data sources.
path "transit/rewrap/mail-*" {
  capabilities = ["update"]
}

# `keyroll inventory` lists every key of the mount, managed or not, to find strays: LIST
# transit/keys (names) and GET transit/keys/<name> for each (metadata: type, versions, dates;
# never material). "+" is one path segment, so this grants no sub-path (no rotate, config,
# trim) on keys outside the prefix above, which stays the more specific rule for its keys.
# Drop both blocks if you do not use inventory.
path "transit/keys" {
  capabilities = ["list"]
}
path "transit/keys/+" {
  capabilities = ["read"]
}

# keyroll's state in KV v2: per-key locks (locks/<mount>/<name>) and per-key records
# (keys/<mount>/<name>), read and written with check-and-set. No delete, no destroy.
path "secret/data/keyroll/*" {
  capabilities = ["create", "read", "update"]
}

# Read-only metadata, used only when someone soft-deleted or destroyed a lock or record
# (`kv delete` keeps the version number, so a check-and-set write "as new" is refused): keyroll
# reads the current version and writes over the deleted one. No metadata writes or deletes.
path "secret/metadata/keyroll/*" {
  capabilities = ["read"]
}

# DKIM keys with [keys.dns]: which version each mailer signs with, as keyroll-sidecar reports it
# at secret/data/keyroll/signing/<mount>/<key>/<sidecar id> (read through the data rule above).
# keyroll LISTs a key's report directory to find every sidecar's report. Read only.
path "secret/metadata/keyroll/signing/*" {
  capabilities = ["list", "read"]
}

# Long-running `keyroll run`: look the token up to learn its TTL and renew it before it expires.
# (Vault's "default" policy grants these too; they are here so a role or token created with
# -no-default-policy / token_no_default_policy=true still works.)
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
