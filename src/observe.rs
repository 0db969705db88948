//! Reading observed state: a key from transit, plus keyroll's own record (from the state
//! store) where the planner needs it. Reads of many keys run concurrently with a bounded
//! concurrency (`run.concurrency`).

use futures::StreamExt;

use crate::policy::{KeyPolicy, StateSettings};
use crate::state::{KeyRecord, Observation};
use crate::store::read_record;
use crate::vault::transit::TransitKey;
use crate::vault::{Vault, VaultError};
use crate::{KeyName, KeyType};

/// Whether the planner needs keyroll's record for this key: HMAC creation times (Vault keeps
/// none), and, whenever disposal is configured, retirement times — read on every run, so that a
/// time left from an earlier retirement of a version that is usable again is seen (and
/// forgotten) rather than counted when the version retires again.
pub fn needs_record(policy: &KeyPolicy, key: &TransitKey) -> bool {
    policy.key_type == KeyType::Hmac
        || key.key_type == "hmac"
        || policy.retention.dispose_after.is_some()
}

/// Observes one key: the transit key, then (if `wants_record` says so) keyroll's record.
pub async fn observe(
    vault: &Vault,
    state: &StateSettings,
    (mount, name): (&str, &KeyName),
    wants_record: impl FnOnce(&TransitKey) -> bool,
) -> Result<Observation, VaultError> {
    let Some(key) = vault.read_key(mount, name).await? else {
        return Ok(Observation::Missing);
    };
    let record = if wants_record(&key) {
        read_record(vault, state, mount, name).await?.0
    } else {
        KeyRecord::default()
    };
    Ok(Observation::present(key, record))
}

/// Observes one managed key.
pub async fn observe_key(
    vault: &Vault,
    state: &StateSettings,
    policy: &KeyPolicy,
) -> Result<Observation, VaultError> {
    observe(vault, state, (&policy.mount, &policy.name), |k| {
        needs_record(policy, k)
    })
    .await
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
