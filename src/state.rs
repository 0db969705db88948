//! The observed state of one managed key: what Vault reports plus what keyroll recorded itself.
//!
//! Vault records a creation time for every version of every key type except `hmac`, and never
//! records *when* a version was retired. keyroll keeps both in a small KV v2 record per key
//! (`<state.mount>/<state.path>/keys/<mount>/<name>`), so the planner can time rotations of
//! HMAC keys and keep retirement and disposal apart in time.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::vault::transit::TransitKey;

/// keyroll's own per-key record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Creation (or, for versions made outside keyroll, first-seen) time of versions whose
    /// creation Vault does not report (`hmac`).
    #[serde(default)]
    pub created: BTreeMap<u32, Timestamp>,
    /// When each version was retired (its `min_decryption_version` raised past it), as first
    /// seen by keyroll.
    #[serde(default)]
    pub retired: BTreeMap<u32, Timestamp>,
    /// Each version's DKIM record in DNS (keys with `[keys.dns]` only; absent in records
    /// written before DNS publishing existed).
    #[serde(default, skip_serializing_if = "crate::dns::DnsState::is_empty")]
    pub dns: crate::dns::DnsState,
}

/// What one read of Vault (and keyroll's record) found for a managed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The key does not exist on its mount.
    Missing,
    Present {
        key: TransitKey,
        record: KeyRecord,
    },
}

impl Observation {
    pub fn present(key: TransitKey, record: KeyRecord) -> Self {
        Observation::Present { key, record }
    }
}

/// Convenience views over a present key.
pub trait KeyView {
    /// Creation time of `version`, from Vault or keyroll's record.
    fn created(&self, record: &KeyRecord, version: u32) -> Option<Timestamp>;
    /// The lowest version still stored (Vault reports 0 when nothing was ever trimmed).
    fn min_available(&self) -> u32;
    /// The lowest version still usable for decryption/verification.
    fn min_usable(&self) -> u32;
}

impl KeyView for TransitKey {
    fn created(&self, record: &KeyRecord, version: u32) -> Option<Timestamp> {
        self.versions
            .get(&version)
            .copied()
            .or_else(|| record.created.get(&version).copied())
    }

    fn min_available(&self) -> u32 {
        self.min_available_version.max(1)
    }

    fn min_usable(&self) -> u32 {
        self.min_decryption_version.max(1).max(self.min_available())
    }
}
