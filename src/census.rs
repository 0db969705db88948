//! Census: how many stored ciphertexts each version of a key still protects, per data source,
//! and when that was counted. The result is kept in Vault beside keyroll's other state
//! (`<state.mount>/<state.path>/census/<mount>/<name>`, KV v2 with check-and-set), so the
//! rotation planner can take "the latest census" as an observed input:
//! `(policy, key state, census, now) -> Plan` — a version the latest census still finds in any
//! source must not be retired or trimmed.
//!
//! Times are conservative: a source's `taken_at` is when its count *began*, so every row
//! written before that instant was counted; a row written during or after may not have been.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::datasource::{Counts, DataSource, Db, Engine, SourceError};
use crate::policy::{KeyPolicy, StateSettings};
use crate::vault::{Vault, VaultError};

/// KV sub-path (under `[state] path`) of the census records.
pub const CENSUS_DIR: &str = "census";
/// Attempts to store a census when another writer keeps winning the check-and-set.
pub const STORE_ATTEMPTS: u32 = 3;

/// One source's count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCensus {
    /// The source's id in the policy (`name`, else `table.column`).
    pub source: String,
    pub engine: Engine,
    pub table: String,
    pub column: String,
    /// When this source's count began; every row written before it was counted.
    pub taken_at: Timestamp,
    /// How long the count took, in milliseconds.
    pub took_ms: u64,
    /// Rows per version (`vault:vN:` prefix). Every version listed here was seen at `taken_at`.
    pub versions: BTreeMap<u32, u64>,
    /// Non-NULL values that are not transit ciphertexts.
    pub non_transit: u64,
    pub null: u64,
    pub total: u64,
}

impl SourceCensus {
    fn new(source: &DataSource, taken_at: Timestamp, took_ms: u64, counts: Counts) -> Self {
        SourceCensus {
            source: source.id.clone(),
            engine: source.engine,
            table: source.table.to_string(),
            column: source.column.to_string(),
            taken_at,
            took_ms,
            total: counts.total(),
            versions: counts.versions,
            non_transit: counts.non_transit,
            null: counts.null,
        }
    }

    /// Rows at versions `<= v`.
    pub fn rows_at_or_below(&self, v: u32) -> u64 {
        self.versions.range(..=v).map(|(_, n)| n).sum()
    }
}

/// A key's census across all its sources: the record stored in Vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCensus {
    pub key: String,
    pub mount: String,
    /// The key's latest version when the census began.
    pub latest_version: u32,
    /// The earliest source `taken_at`: rows written before it were counted in every source.
    pub taken_at: Timestamp,
    pub finished_at: Timestamp,
    pub sources: Vec<SourceCensus>,
}

/// Where one version is still in use: for a planner's "blocked" reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InUse {
    pub source: String,
    pub location: String,
    pub version: u32,
    pub rows: u64,
    pub taken_at: Timestamp,
}

impl KeyCensus {
    /// Rows at `version` per source, for sources that have any.
    pub fn in_use(&self, version: u32) -> Vec<InUse> {
        self.sources
            .iter()
            .filter_map(|s| {
                s.versions.get(&version).map(|&rows| InUse {
                    source: s.source.clone(),
                    location: format!("{}.{}", s.table, s.column),
                    version,
                    rows,
                    taken_at: s.taken_at,
                })
            })
            .collect()
    }

    /// Rows at versions `<= v`, summed over the sources.
    pub fn rows_at_or_below(&self, v: u32) -> u64 {
        self.sources.iter().map(|s| s.rows_at_or_below(v)).sum()
    }

    /// The lowest version any source still holds (None: no transit ciphertext anywhere).
    pub fn lowest_version(&self) -> Option<u32> {
        self.sources
            .iter()
            .filter_map(|s| s.versions.keys().next().copied())
            .min()
    }

    /// Whether the census covers exactly these sources (a source added to or removed from the
    /// policy since makes it incomplete for that policy).
    pub fn covers(&self, sources: &[DataSource]) -> bool {
        let mut have: Vec<&str> = self.sources.iter().map(|s| s.source.as_str()).collect();
        let mut want: Vec<&str> = sources.iter().map(|s| s.id.as_str()).collect();
        have.sort_unstable();
        want.sort_unstable();
        have == want
    }
}

/// Why a census of a key could not be taken or stored.
#[derive(Debug, thiserror::Error)]
pub enum CensusError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{mount}/keys/{key} does not exist; nothing to take a census for")]
    KeyMissing { mount: String, key: String },
    #[error("census record {path} is not readable as a census: {reason}")]
    BadRecord { path: String, reason: String },
}

/// The KV path (below the state mount) of a key's census record.
pub fn record_path(state: &StateSettings, mount: &str, key: &str) -> String {
    format!("{}/{CENSUS_DIR}/{mount}/{key}", state.path)
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Counts one source. `now` is the clock (injected so tests can pin it).
pub async fn count_source(
    source: &DataSource,
    now: &(dyn Fn() -> Timestamp + Sync),
) -> Result<SourceCensus, SourceError> {
    let db = Db::open(source).await?;
    let taken_at = now();
    let t0 = std::time::Instant::now();
    let counts = db.census().await?;
    let took = millis(t0.elapsed());
    tracing::info!(source = %source.id, location = %source.location(), rows = counts.total(), took_ms = took, "census counted");
    Ok(SourceCensus::new(source, taken_at, took, counts))
}

/// Takes a census of one key over all its sources (one after another: each is a full scan, and
/// running them side by side on one server would only make each slower). Any failing source
/// fails the whole census: a partial census must never look like "no rows left".
pub async fn take(
    vault: &Vault,
    key: &KeyPolicy,
    sources: &[DataSource],
    now: &(dyn Fn() -> Timestamp + Sync),
) -> Result<KeyCensus, CensusError> {
    let started = now();
    let transit = vault
        .read_key(&key.mount, &key.name)
        .await?
        .ok_or_else(|| CensusError::KeyMissing {
            mount: key.mount.clone(),
            key: key.name.to_string(),
        })?;
    let mut out = Vec::with_capacity(sources.len());
    for s in sources {
        out.push(count_source(s, now).await?);
    }
    Ok(KeyCensus {
        key: key.name.to_string(),
        mount: key.mount.clone(),
        latest_version: transit.latest_version,
        taken_at: out.iter().map(|s| s.taken_at).min().unwrap_or(started),
        finished_at: now(),
        sources: out,
    })
}

/// The latest stored census of a key, if any.
pub async fn latest(
    vault: &Vault,
    state: &StateSettings,
    mount: &str,
    key: &str,
) -> Result<Option<KeyCensus>, CensusError> {
    let path = record_path(state, mount, key);
    match vault.kv_read(&state.mount, &path).await? {
        None => Ok(None),
        Some(e) => serde_json::from_value(e.data)
            .map(Some)
            .map_err(|err| CensusError::BadRecord {
                path: format!("{}/{path}", state.mount),
                reason: err.to_string(),
            }),
    }
}

/// Stores `census` as the key's latest, with check-and-set; a census that began earlier than
/// the one already stored never replaces it (two censuses racing: the newer count wins).
/// Returns whether `census` is now the stored one.
pub async fn store(
    vault: &Vault,
    state: &StateSettings,
    census: &KeyCensus,
) -> Result<bool, CensusError> {
    let path = record_path(state, &census.mount, &census.key);
    let data = serde_json::to_value(census).map_err(|e| CensusError::BadRecord {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let current = vault.kv_read(&state.mount, &path).await?;
        let cas = current.as_ref().map(|e| e.version).unwrap_or(0);
        if let Some(e) = &current {
            if let Ok(stored) = serde_json::from_value::<KeyCensus>(e.data.clone()) {
                if stored.taken_at > census.taken_at {
                    return Ok(false);
                }
            }
        }
        match vault.kv_write(&state.mount, &path, &data, Some(cas)).await {
            Ok(_) => return Ok(true),
            Err(VaultError::CasMismatch { .. }) if attempt < STORE_ATTEMPTS => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(id: &str, taken: i64, versions: &[(u32, u64)]) -> SourceCensus {
        SourceCensus {
            source: id.into(),
            engine: Engine::Sqlite,
            table: "t".into(),
            column: "c".into(),
            taken_at: Timestamp::from_second(taken).unwrap(),
            took_ms: 1,
            versions: versions.iter().copied().collect(),
            non_transit: 0,
            null: 0,
            total: versions.iter().map(|v| v.1).sum(),
        }
    }

    #[test]
    fn views_answer_what_a_planner_asks() {
        let c = KeyCensus {
            key: "k".into(),
            mount: "transit".into(),
            latest_version: 3,
            taken_at: Timestamp::from_second(100).unwrap(),
            finished_at: Timestamp::from_second(200).unwrap(),
            sources: vec![
                src("a", 100, &[(1, 5), (3, 10)]),
                src("b", 150, &[(2, 7), (3, 1)]),
            ],
        };
        assert_eq!(c.rows_at_or_below(1), 5);
        assert_eq!(c.rows_at_or_below(2), 12);
        assert_eq!(c.lowest_version(), Some(1));
        let u = c.in_use(2);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].source, "b");
        assert_eq!(u[0].rows, 7);
        assert_eq!(u[0].location, "t.c");
        // Round-trips through the JSON stored in KV (u32 map keys become strings).
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["sources"][0]["versions"]["1"], 5);
        assert_eq!(serde_json::from_value::<KeyCensus>(json).unwrap(), c);
    }
}
