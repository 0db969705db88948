//! Reading keys from Vault: each key's metadata (one cheap read), and its material only when the
//! key's fingerprint (type, latest version, usable versions, creation times, public keys)
//! differs from the one already known. Keys are read concurrently (at most
//! [`MAX_CONCURRENT_READS`] at a time), so a pass over many keys takes about one round trip,
//! not one per key; once Vault is found unavailable, keys not yet read are left unchecked.
//! Also the error policy ([`classify`]): what counts as Vault being unavailable rather than one
//! key being unreadable.
//!
//! HMAC keys: Vault reports no creation time for their versions; the sidecar passes the Unix
//! epoch as "unknown", and the keyring renderer omits `created` for such versions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use jiff::Timestamp;
use keyroll::render::{KeyMaterial, VersionMaterial};
use keyroll::state::KeyView as _;
use keyroll::vault::transit::TransitKey;
use keyroll::vault::{Vault, VaultError};
use keyroll::KeyType;

use crate::desired::KeyId;
use crate::status::Shared;

/// Vault requests one pass has in flight at most.
pub const MAX_CONCURRENT_READS: usize = 8;

/// Everything a key's export depends on; equal fingerprints mean equal material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    key_type: String,
    latest: u32,
    usable: Vec<(u32, Option<Timestamp>)>,
    public: Vec<(u32, String)>,
}

/// How a failure affects the pass.
#[derive(Debug, PartialEq, Eq)]
pub enum Severity {
    /// Vault as a whole is unusable: stop this pass's reads and back off.
    VaultDown,
    /// Only this key is affected.
    Key,
}

/// The error policy, apart from the loop: what counts as Vault being unavailable.
pub fn classify(e: &VaultError) -> Severity {
    if e.is_unavailable()
        || matches!(e, VaultError::Api { status, .. } if *status >= 500)
        || matches!(e, VaultError::Login(_))
    {
        Severity::VaultDown
    } else {
        Severity::Key
    }
}

/// What a read found.
pub enum Fetched {
    /// Same fingerprint as the one known: nothing exported.
    Same,
    /// New material (not yet checked to render).
    New {
        fingerprint: Fingerprint,
        material: KeyMaterial,
    },
}

/// The outcome for one key of [`fetch_all`].
pub enum Read {
    Done(Result<Fetched, (Severity, String)>),
    /// Not read: Vault was found unavailable first.
    NotChecked,
}

/// Reads every key of `keys` (with the fingerprint known for it), concurrently; results in the
/// same order.
pub async fn fetch_all(
    vault: &Vault,
    keys: Vec<(KeyId, Option<Fingerprint>)>,
    shared: &Arc<Shared>,
) -> Vec<(KeyId, Read)> {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_READS));
    let down = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = keys
        .into_iter()
        .map(|(id, known)| {
            let (vault, shared, permits, down) =
                (vault.clone(), shared.clone(), permits.clone(), down.clone());
            let span = tracing::info_span!("key", key = %id.1, mount = %id.0);
            let task_id = id.clone();
            let task = tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let Ok(_permit) = permits.acquire().await else {
                        return Read::NotChecked;
                    };
                    if down.load(Ordering::Relaxed) {
                        return Read::NotChecked;
                    }
                    let r = fetch(&vault, &task_id, known.as_ref(), &shared).await;
                    if matches!(r, Err((Severity::VaultDown, _))) {
                        down.store(true, Ordering::Relaxed);
                    }
                    Read::Done(r)
                },
                span,
            ));
            (id, task)
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for (id, task) in tasks {
        let r = task.await.unwrap_or_else(|e| {
            Read::Done(Err((Severity::Key, format!("reading the key failed: {e}"))))
        });
        out.push((id, r));
    }
    out
}

/// Reads key `id`; exports it only if its fingerprint differs from `known`. Errors carry no key
/// material.
pub async fn fetch(
    vault: &Vault,
    id: &KeyId,
    known: Option<&Fingerprint>,
    shared: &Shared,
) -> Result<Fetched, (Severity, String)> {
    let (mount, name) = id;
    shared.with(|s| s.counters.metadata_reads += 1);
    let tk = match vault.read_key(mount, name).await {
        Ok(Some(k)) => k,
        Ok(None) => {
            return Err((
                Severity::Key,
                format!("{mount}/keys/{name} does not exist (deleted, or wrong mount?)"),
            ))
        }
        Err(e) => return Err((classify(&e), e.to_string())),
    };
    let key_type = KeyType::parse(&tk.key_type).ok_or_else(|| {
        (
            Severity::Key,
            format!("Vault reports unknown key type {:?}", tk.key_type),
        )
    })?;
    let fp = fingerprint(&tk);
    if known == Some(&fp) {
        return Ok(Fetched::Same);
    }
    if !tk.exportable {
        return Err((
            Severity::Key,
            format!(
                "{mount}/keys/{name} is not exportable; the sidecar can only deliver keys \
                 created with exportable=true"
            ),
        ));
    }
    shared.with(|s| s.counters.exports += 1);
    let exported = vault
        .export_key(mount, name, key_type.export_kind())
        .await
        .map_err(|e| (classify(&e), e.to_string()))?;
    let min = tk.min_usable();
    let versions: Vec<VersionMaterial> = exported
        .into_iter()
        .filter(|(v, _)| *v >= min && *v <= tk.latest_version)
        .map(|(v, private)| VersionMaterial {
            version: v,
            created: tk
                .versions
                .get(&v)
                .copied()
                .unwrap_or(Timestamp::UNIX_EPOCH),
            private,
            public: tk.public_keys.get(&v).cloned(),
        })
        .collect();
    Ok(Fetched::New {
        fingerprint: fp,
        material: KeyMaterial {
            name: name.clone(),
            key_type,
            latest_version: tk.latest_version,
            versions,
        },
    })
}

fn fingerprint(tk: &TransitKey) -> Fingerprint {
    let min = tk.min_usable();
    let usable = (min..=tk.latest_version)
        .map(|v| (v, tk.versions.get(&v).copied()))
        .collect();
    Fingerprint {
        key_type: tk.key_type.clone(),
        latest: tk.latest_version,
        usable,
        public: tk
            .public_keys
            .iter()
            .filter(|(v, _)| **v >= min)
            .map(|(v, p)| (*v, p.clone()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn key(latest: u32, min_dec: u32) -> TransitKey {
        TransitKey {
            name: "k".into(),
            key_type: "aes256-gcm96".into(),
            exportable: true,
            deletion_allowed: false,
            latest_version: latest,
            min_decryption_version: min_dec,
            min_encryption_version: 0,
            min_available_version: 0,
            versions: (1..=latest)
                .map(|v| (v, Timestamp::from_second(i64::from(v) * 1000).unwrap()))
                .collect(),
            public_keys: BTreeMap::new(),
        }
    }

    #[test]
    fn fingerprint_changes_only_when_usable_versions_change() {
        assert_eq!(fingerprint(&key(3, 1)), fingerprint(&key(3, 1)));
        assert_ne!(fingerprint(&key(3, 1)), fingerprint(&key(4, 1)));
        assert_ne!(fingerprint(&key(3, 1)), fingerprint(&key(3, 2)));
        let mut trimmed = key(3, 2);
        trimmed.min_available_version = 2;
        trimmed.versions.remove(&1);
        assert_eq!(fingerprint(&key(3, 2)), fingerprint(&trimmed));
    }

    #[test]
    fn outages_back_off_but_a_403_degrades_one_key() {
        let down = VaultError::Unreachable {
            addr: "a".into(),
            reason: "refused".into(),
        };
        assert_eq!(classify(&down), Severity::VaultDown);
        let five = VaultError::Api {
            status: 503,
            method: "GET".into(),
            path: "p".into(),
            message: "m".into(),
        };
        assert_eq!(classify(&five), Severity::VaultDown);
        let denied = VaultError::PermissionDenied {
            path: "p".into(),
            message: "permission denied".into(),
        };
        assert_eq!(classify(&denied), Severity::Key);
    }
}
