//! keyroll's own state store in a KV v2 mount: the per-key record (times Vault does not keep),
//! read and written with check-and-set, and the KV primitive the lock shares with it — a
//! check-and-set write that survives an operator's `kv delete` / `kv destroy`.
//!
//! Paths: `<state.mount>/data/<state.path>/keys/<mount>/<name>` (records) and
//! `.../locks/<mount>/<name>` (locks, see `crate::lock`).
//!
//! KV v2 keeps a deleted or destroyed entry's version number: a read says "not found", but a
//! write "as new" (check-and-set 0) is refused for ever. Where a write expected an absent entry
//! and was refused, the store reads the path's metadata once; if the current version is
//! deleted or destroyed, it writes over that version. (This needs `read` on
//! `<state.mount>/metadata/<state.path>/*`.)

use std::time::Duration;

use jiff::Timestamp;
use rand::Rng;
use reqwest::Method;
use serde_json::Value;

use crate::policy::StateSettings;
use crate::state::KeyRecord;
use crate::vault::{Vault, VaultError};
use crate::KeyName;

/// Attempts of one record update (read, change, check-and-set write) before giving up: a
/// mismatch means another writer got in between, which under the key's lock is only an
/// earlier attempt of ours whose answer was lost.
pub const MAX_RECORD_ATTEMPTS: u32 = 3;
/// Pause between record update attempts (plus up to as much again of jitter).
const RECORD_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The record's path below the state mount.
pub fn record_path(state: &StateSettings, mount: &str, name: &KeyName) -> String {
    format!("{}/keys/{mount}/{name}", state.path)
}

/// Reads keyroll's record for a key (the default when there is none, or it was deleted) and
/// the KV version to check-and-set against (0: no live entry).
pub async fn read_record(
    vault: &Vault,
    state: &StateSettings,
    mount: &str,
    name: &KeyName,
) -> Result<(KeyRecord, u64), VaultError> {
    let path = record_path(state, mount, name);
    match vault.kv_read(&state.mount, &path).await? {
        None => Ok((KeyRecord::default(), 0)),
        Some(e) => {
            let rec = serde_json::from_value::<KeyRecord>(e.data).map_err(|err| {
                VaultError::BadResponse {
                    path: format!("{}/data/{path}", state.mount),
                    reason: format!("keyroll record is malformed: {err}"),
                }
            })?;
            Ok((rec, e.version))
        }
    }
}

/// Read-modify-write of a key's record (the caller holds the key's lock). `change` returns
/// whether it changed anything; nothing is written otherwise (the result says whether it
/// wrote). Idempotent changes only: after an unclear answer the record is read again and
/// `change` applied to what is there.
pub async fn update_record(
    vault: &Vault,
    state: &StateSettings,
    (mount, name): (&str, &KeyName),
    mut change: impl FnMut(&mut KeyRecord) -> bool,
) -> Result<bool, VaultError> {
    let path = record_path(state, mount, name);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (mut rec, version) = read_record(vault, state, mount, name).await?;
        if !change(&mut rec) {
            return Ok(false);
        }
        let data = serde_json::to_value(&rec).map_err(|e| VaultError::BadResponse {
            path: path.clone(),
            reason: format!("cannot encode keyroll record: {e}"),
        })?;
        match write_cas(vault, &state.mount, &path, &data, version).await {
            Ok(_) => return Ok(true),
            Err(e) if attempt < MAX_RECORD_ATTEMPTS && retry_record_write(&e) => {
                tracing::warn!(record = %path, error = %e, "record write unclear; reading it again");
                let jitter = rand::rng().random_range(0..=RECORD_RETRY_PAUSE.as_millis() as u64);
                tokio::time::sleep(RECORD_RETRY_PAUSE + Duration::from_millis(jitter)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A record write worth repeating after a fresh read: a mismatch (an earlier attempt landed)
/// or an answer that may hide an applied write.
fn retry_record_write(e: &VaultError) -> bool {
    matches!(e, VaultError::CasMismatch { .. }) || outcome_unknown(e)
}

/// Whether a write that failed with `e` may nevertheless have been applied by Vault: a 5xx, a
/// timeout, or a connection that broke after the request went out (a reset mid-answer).
pub fn outcome_unknown(e: &VaultError) -> bool {
    e.is_ambiguous() || matches!(e, VaultError::Unreachable { .. })
}

/// A check-and-set write of `data` at `<mount>/data/<path>` against `version` (0: "must not
/// exist"), writing over a deleted or destroyed entry when `version` is 0 and that is what
/// stands in the way. Returns the new version.
pub async fn write_cas(
    vault: &Vault,
    mount: &str,
    path: &str,
    data: &Value,
    version: u64,
) -> Result<u64, VaultError> {
    match vault.kv_write(mount, path, data, Some(version)).await {
        Err(VaultError::CasMismatch { path: full }) if version == 0 => {
            match deleted_version(vault, mount, path).await? {
                Some(v) => {
                    tracing::info!(path = %full, version = v, "writing over a deleted KV entry");
                    vault.kv_write(mount, path, data, Some(v)).await
                }
                None => Err(VaultError::CasMismatch { path: full }),
            }
        }
        other => other,
    }
}

/// The current version of `<mount>/metadata/<path>` if it is deleted or destroyed (so a reader
/// sees nothing but check-and-set 0 is refused); `None` if it is live or was never written.
pub async fn deleted_version(
    vault: &Vault,
    mount: &str,
    path: &str,
) -> Result<Option<u64>, VaultError> {
    let meta = format!("{mount}/metadata/{path}");
    let v = match vault.request(Method::GET, &meta, None).await {
        Ok(Some(v)) => v,
        Ok(None) | Err(VaultError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(gone_version(v.get("data").unwrap_or(&Value::Null)))
}

/// From a KV v2 metadata answer's `data`: the current version if it is deleted or destroyed.
fn gone_version(meta: &Value) -> Option<u64> {
    let current = meta.get("current_version").and_then(Value::as_u64)?;
    let entry = meta.pointer(&format!("/versions/{current}"))?;
    let deleted = entry
        .get("deletion_time")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty());
    let destroyed = entry.get("destroyed").and_then(Value::as_bool) == Some(true);
    (current > 0 && (deleted || destroyed)).then_some(current)
}

/// Records `now` for each version without a time yet (first record wins: a later guess would
/// only ever make rotation or disposal earlier). Returns whether anything changed.
pub fn stamp_missing(
    times: &mut std::collections::BTreeMap<u32, Timestamp>,
    versions: impl IntoIterator<Item = u32>,
    now: Timestamp,
) -> bool {
    let mut changed = false;
    for v in versions {
        times.entry(v).or_insert_with(|| {
            changed = true;
            now
        });
    }
    changed
}

/// Records `now` for each version, replacing any earlier time: for events that restart a clock
/// (a version retired again after it was usable restarts `dispose_after`).
pub fn stamp_now(
    times: &mut std::collections::BTreeMap<u32, Timestamp>,
    versions: impl IntoIterator<Item = u32>,
    now: Timestamp,
) -> bool {
    let mut changed = false;
    for v in versions {
        changed |= times.insert(v, now) != Some(now);
    }
    changed
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_deleted_or_destroyed_current_version_is_found_in_metadata() {
        let meta = |del: &str, destroyed: bool| {
            json!({"current_version": 3, "versions": {
                "2": {"deletion_time": "", "destroyed": false},
                "3": {"deletion_time": del, "destroyed": destroyed}}})
        };
        assert_eq!(gone_version(&meta("2026-11-27T11:38:09Z", false)), Some(3));
        assert_eq!(gone_version(&meta("", true)), Some(3));
        assert_eq!(gone_version(&meta("", false)), None);
        assert_eq!(gone_version(&json!({})), None);
        assert_eq!(
            gone_version(&json!({"current_version": 0, "versions": {}})),
            None
        );
    }

    #[test]
    fn stamps_keep_or_replace_as_asked() {
        let t = |s| Timestamp::from_second(s).unwrap();
        let mut m = std::collections::BTreeMap::from([(1, t(10))]);
        assert!(stamp_missing(&mut m, [1, 2], t(20)));
        assert_eq!(m[&1], t(10));
        assert_eq!(m[&2], t(20));
        assert!(!stamp_missing(&mut m, [1, 2], t(30)));
        assert!(stamp_now(&mut m, [1], t(30)));
        assert_eq!(m[&1], t(30));
        assert!(!stamp_now(&mut m, [1], t(30)));
    }
}
