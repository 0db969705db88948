//! Reading observed state: each managed key from transit, plus keyroll's own KV record where
//! the planner needs it. Reads run concurrently with a bounded concurrency (`run.concurrency`).

use futures::StreamExt;
use serde_json::Value;

use crate::policy::{KeyPolicy, StateSettings};
use crate::state::{KeyRecord, KeyView, Observation};
use crate::vault::transit::TransitKey;
use crate::vault::{Vault, VaultError};
use crate::{KeyName, KeyType};

pub fn record_path(state: &StateSettings, mount: &str, name: &KeyName) -> String {
    format!("{}/keys/{mount}/{name}", state.path)
}

/// Whether the planner needs keyroll's record for this key: HMAC creation times, or retirement
/// times when disposal is configured and retired versions are still stored.
fn needs_record(policy: &KeyPolicy, key: &TransitKey) -> bool {
    policy.key_type == KeyType::Hmac
        || key.key_type == "hmac"
        || (policy.retention.dispose_after.is_some() && key.min_usable() > key.min_available())
}

/// Reads keyroll's record for a key (default when none) and its KV version for check-and-set.
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

/// Observes one key.
pub async fn observe_key(
    vault: &Vault,
    state: &StateSettings,
    policy: &KeyPolicy,
) -> Result<Observation, VaultError> {
    let Some(key) = vault.read_key(&policy.mount, &policy.name).await? else {
        return Ok(Observation::Missing);
    };
    let record = if needs_record(policy, &key) {
        read_record(vault, state, &policy.mount, &policy.name)
            .await?
            .0
    } else {
        KeyRecord::default()
    };
    Ok(Observation::present(key, record))
}

/// Observes every key, `concurrency` at a time, results in policy order.
pub async fn observe_all(
    vault: &Vault,
    state: &StateSettings,
    keys: &[KeyPolicy],
    concurrency: usize,
) -> Vec<Result<Observation, VaultError>> {
    futures::stream::iter(keys)
        .map(|k| observe_key(vault, state, k))
        .buffered(concurrency.max(1))
        .collect()
        .await
}

/// Writes keyroll's record with check-and-set on `version` (0 = new).
pub async fn write_record(
    vault: &Vault,
    state: &StateSettings,
    mount: &str,
    name: &KeyName,
    record: &KeyRecord,
    version: u64,
) -> Result<u64, VaultError> {
    let path = record_path(state, mount, name);
    let data: Value = serde_json::to_value(record).expect("record serializes");
    vault
        .kv_write(&state.mount, &path, &data, Some(version))
        .await
}
