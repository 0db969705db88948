//! The reconcile loop: turn "Vault has these usable versions" into "the output directory holds
//! exactly these files", then ask for one reload.
//!
//! A *full pass* reads each key's metadata (one cheap read per key) and exports material only
//! when the key's fingerprint (type, latest version, usable versions, creation times, public
//! keys) differs from what is cached. A *republish* renders the cached material again without
//! touching Vault: for staged activation coming due and for self-healing after someone changed
//! the directory. Both end the same way: render every key, publish once, reload if the content
//! changed. A pass never sees why it runs and re-reads what it needs, so running one twice is
//! harmless.
//!
//! Failure policy (kept separate in [`classify`]): Vault down, sealed or answering 5xx stops the
//! pass's Vault reads and backs off with jitter; a key-level error (403, deleted key, material
//! that does not render) degrades that key only: its last delivered material stays in the cache
//! and in the files. Nothing is ever removed because of an error.
//!
//! HMAC keys: Vault reports no creation time for their versions; the sidecar passes the Unix
//! epoch as "unknown", and the keyring renderer omits `created` for such versions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use keyroll::render::{self, FileSet, KeyMaterial, OutputSpec, VersionMaterial};
use keyroll::state::KeyView;
use keyroll::vault::transit::TransitKey;
use keyroll::vault::{Vault, VaultError};
use keyroll::{KeyName, KeyType};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::backoff::{jittered, Backoff};
use crate::config::{Config, KeySpec};
use crate::reload;
use crate::status::{KeyStatus, PassSummary, Shared};

/// First delay after Vault was found unavailable.
pub const VAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Longest delay between attempts while Vault is unavailable (also never above the poll
/// interval, so an outage never slows recovery below the normal cadence).
pub const VAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Quiet time after a change in the output directory before checking it, so a burst of events
/// (ours or someone else's) costs one check.
pub const HEAL_DEBOUNCE: Duration = Duration::from_millis(100);

type KeyId = (String, KeyName);

/// Everything a key's export depends on; equal fingerprints mean equal material.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    key_type: String,
    latest: u32,
    usable: Vec<(u32, Option<Timestamp>)>,
    public: Vec<(u32, String)>,
}

struct Cached {
    fingerprint: Fingerprint,
    material: KeyMaterial,
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

/// What one pass found.
#[derive(Debug, Default, Clone)]
pub struct PassResult {
    pub vault_error: Option<String>,
    /// Every configured key is current (read, exported if needed, rendered) and published.
    pub complete: bool,
    pub published: bool,
    /// Some key could not be delivered at all.
    pub failed_keys: Vec<String>,
}

pub struct Watcher {
    cfg: Arc<Config>,
    vault: Vault,
    shared: Arc<Shared>,
    cache: BTreeMap<KeyId, Cached>,
    key_errors: BTreeMap<KeyId, String>,
    reload_tx: watch::Sender<reload::Request>,
    /// Digest of the set last published (or found already on disk).
    last_digest: Option<[u8; 32]>,
    next_change: Option<Timestamp>,
    generation: u64,
}

fn id_of(k: &KeySpec) -> KeyId {
    (k.mount.clone(), k.name.clone())
}

fn digest(set: &FileSet) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in &set.files {
        h.update((f.path.len() as u64).to_le_bytes());
        h.update(f.path.as_bytes());
        h.update([u8::from(f.secret)]);
        h.update((f.contents.len() as u64).to_le_bytes());
        h.update(&f.contents[..]);
    }
    h.finalize().into()
}

impl Watcher {
    pub fn new(
        cfg: Arc<Config>,
        vault: Vault,
        shared: Arc<Shared>,
        reload_tx: watch::Sender<reload::Request>,
    ) -> Self {
        let w = Watcher {
            cfg,
            vault,
            shared,
            cache: BTreeMap::new(),
            key_errors: BTreeMap::new(),
            reload_tx,
            last_digest: None,
            next_change: None,
            generation: 0,
        };
        w.update_key_status();
        w
    }

    /// Runs passes until `stop` fires: at start, every poll interval (jittered), on `/refresh`,
    /// on config changes, when staged activation comes due, and after directory changes.
    pub async fn run(
        mut self,
        mut cfg_rx: watch::Receiver<(Arc<Config>, Option<Vault>)>,
        heal: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = self.vault_backoff();
        let mut next_poll = Instant::now();
        let mut heal_at: Option<Instant> = None;
        let shared = self.shared.clone();
        loop {
            let change_at = self.next_change.map(|t| {
                let wait = t.duration_since(Timestamp::now());
                let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
                // Round up a little: rendering exactly at the boundary must see it passed.
                Instant::now() + wait + Duration::from_millis(5)
            });
            enum Why {
                Full,
                Republish,
                Stop,
            }
            let why = tokio::select! {
                biased;
                _ = stop.changed() => Why::Stop,
                r = cfg_rx.changed() => {
                    if r.is_err() {
                        Why::Stop
                    } else {
                        let (cfg, vault) = cfg_rx.borrow_and_update().clone();
                        self.apply_config(cfg, vault);
                        backoff = self.vault_backoff();
                        Why::Full
                    }
                }
                _ = shared.refresh.notified() => Why::Full,
                _ = tokio::time::sleep_until(next_poll) => Why::Full,
                _ = tokio::time::sleep_until(change_at.unwrap_or(next_poll)), if change_at.is_some() => Why::Republish,
                _ = tokio::time::sleep_until(heal_at.unwrap_or(next_poll)), if heal_at.is_some() => {
                    heal_at = None;
                    Why::Republish
                }
                _ = heal.notified(), if heal_at.is_none() => {
                    heal_at = Some(Instant::now() + HEAL_DEBOUNCE);
                    continue;
                }
            };
            match why {
                Why::Stop => break,
                Why::Republish => {
                    self.publish_cached(false);
                }
                Why::Full => {
                    let ticket = shared.pass_started();
                    let r = self.full_pass().await;
                    shared.pass_finished(
                        ticket,
                        PassSummary {
                            published: r.published,
                            complete: r.complete,
                        },
                    );
                    let wait = if r.vault_error.is_some() {
                        backoff.next()
                    } else {
                        backoff.reset();
                        jittered(self.cfg.poll_interval, self.cfg.poll_jitter)
                    };
                    next_poll = Instant::now() + wait;
                }
            }
        }
    }

    fn vault_backoff(&self) -> Backoff {
        Backoff::new(
            VAULT_BACKOFF_INITIAL,
            VAULT_BACKOFF_MAX.min(self.cfg.poll_interval),
        )
    }

    /// Takes a new, already validated config (and a new client if `[vault]` changed).
    fn apply_config(&mut self, cfg: Arc<Config>, vault: Option<Vault>) {
        if let Some(v) = vault {
            self.vault = v;
        }
        let wanted: BTreeSet<KeyId> = cfg.keys.iter().map(id_of).collect();
        self.cache.retain(|id, _| wanted.contains(id));
        self.key_errors.retain(|id, _| wanted.contains(id));
        self.cfg = cfg;
        self.update_key_status();
    }

    /// One full pass for `--once`: every key must be delivered, or nothing is written.
    pub async fn once(&mut self) -> PassResult {
        let mut r = self.read_vault().await;
        if r.vault_error.is_none() && r.failed_keys.is_empty() {
            let (published, ok) = self.publish_cached(true);
            r.published = published;
            r.complete = ok;
        }
        r
    }

    /// Reads Vault, then publishes whatever is current.
    pub async fn full_pass(&mut self) -> PassResult {
        let mut r = self.read_vault().await;
        let (published, publish_ok) = self.publish_cached(false);
        r.published = published;
        r.complete = publish_ok && r.vault_error.is_none() && self.key_errors.is_empty();
        self.shared.with(|s| {
            s.counters.passes += 1;
            s.vault_error = r.vault_error.clone();
            if r.complete {
                s.last_success = Some(Timestamp::now());
                s.ready = true;
            }
        });
        r
    }

    /// Reads every key's metadata and exports those whose fingerprint changed.
    async fn read_vault(&mut self) -> PassResult {
        let mut result = PassResult::default();
        // One sys/health first (more only when the node in use is not active): a follower that
        // lost its leader still answers reads, from state nobody can update. That is an outage.
        let cluster = self.vault.cluster_health().await;
        if cluster.is_degraded() {
            let msg = cluster.to_string();
            tracing::warn!(error = %msg, "Vault unavailable; keeping the last good files");
            self.shared.with(|s| s.error("vault"));
            result.vault_error = Some(msg);
        }
        let ids: Vec<KeyId> = {
            let mut seen = BTreeSet::new();
            self.cfg
                .keys
                .iter()
                .map(id_of)
                .filter(|id| seen.insert(id.clone()))
                .collect()
        };
        for id in ids {
            if let Some(e) = &result.vault_error {
                // Keep the previous per-key verdict; the key was simply not checked.
                self.key_errors
                    .entry(id.clone())
                    .or_insert_with(|| format!("not checked: {e}"));
                continue;
            }
            let span = tracing::info_span!("key", key = %id.1, mount = %id.0);
            let _g = span.enter();
            match self.refresh_key(&id).await {
                Ok(()) => {
                    self.key_errors.remove(&id);
                }
                Err((Severity::VaultDown, msg)) => {
                    tracing::warn!(error = %msg, "Vault unavailable; keeping the last good files");
                    self.shared.with(|s| s.error("vault"));
                    self.key_errors.insert(id.clone(), msg.clone());
                    result.vault_error = Some(msg);
                }
                Err((Severity::Key, msg)) => {
                    let first = self.key_errors.get(&id) != Some(&msg);
                    if first {
                        tracing::error!(error = %msg, "key degraded; keeping its last delivered files");
                    } else {
                        tracing::debug!(error = %msg, "key still degraded");
                    }
                    self.shared.with(|s| s.error("key"));
                    self.key_errors.insert(id.clone(), msg);
                }
            }
            if !self.cache.contains_key(&id) {
                result.failed_keys.push(id.1.to_string());
            }
        }
        if result.vault_error.is_none() && self.shared.with(|s| s.vault_error.is_some()) {
            tracing::info!("Vault is available again");
        }
        self.update_key_status();
        result
    }

    /// Brings one key's cache entry up to date. Errors carry no key material.
    async fn refresh_key(&mut self, id: &KeyId) -> Result<(), (Severity, String)> {
        let (mount, name) = id;
        self.shared.with(|s| s.counters.metadata_reads += 1);
        let tk = match self.vault.read_key(mount, name).await {
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
        if self.cache.get(id).is_some_and(|c| c.fingerprint == fp) {
            return Ok(());
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
        self.shared.with(|s| s.counters.exports += 1);
        let exported = self
            .vault
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
        let material = KeyMaterial {
            name: name.clone(),
            key_type,
            latest_version: tk.latest_version,
            versions,
        };
        // Check the new material renders in every format this key is delivered in before it
        // replaces the last good one.
        let now = Timestamp::now();
        for spec in self.cfg.keys.iter().filter(|k| &id_of(k) == id) {
            render::render(
                &self.cfg.output_dir,
                &[(spec.output.clone(), material.clone())],
                now,
            )
            .map_err(|e| {
                self.shared.with(|s| s.error("render"));
                (Severity::Key, e.to_string())
            })?;
        }
        let versions: Vec<u32> = material.versions.iter().map(|v| v.version).collect();
        tracing::info!(?versions, latest = tk.latest_version, "new key material");
        self.cache.insert(
            id.clone(),
            Cached {
                fingerprint: fp,
                material,
            },
        );
        Ok(())
    }

    /// Renders every cached key and publishes the set. Returns (published, ok). With
    /// `require_all`, publishes nothing unless every configured key is cached.
    fn publish_cached(&mut self, require_all: bool) -> (bool, bool) {
        let mut inputs: Vec<(OutputSpec, KeyMaterial)> = Vec::new();
        let mut missing = false;
        for k in &self.cfg.keys {
            match self.cache.get(&id_of(k)) {
                Some(c) => inputs.push((k.output.clone(), c.material.clone())),
                None => missing = true,
            }
        }
        if inputs.is_empty() || (require_all && missing) {
            return (false, false);
        }
        let set = match render::render(&self.cfg.output_dir, &inputs, Timestamp::now()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "rendering the output set failed; nothing written");
                self.shared.with(|s| {
                    s.error("render");
                    s.publish_error = Some(e.to_string());
                });
                return (false, false);
            }
        };
        drop(inputs);
        self.next_change = set.next_change;
        let d = digest(&set);
        let opts = self.cfg.publish_options();
        let outcome = keyroll::publish::publish(&self.cfg.output_dir, &set, &opts);
        match outcome {
            Ok(keyroll::publish::PublishOutcome::Unchanged) => {
                self.shared.with(|s| s.publish_error = None);
                if self.last_digest.is_none() {
                    tracing::info!(dir = %self.cfg.output_dir.display(), files = set.files.len(), "output directory already current");
                }
                self.last_digest = Some(d);
                (false, !missing)
            }
            Ok(keyroll::publish::PublishOutcome::Published { snapshot }) => {
                let repair = self.last_digest == Some(d);
                self.shared.with(|s| {
                    s.publish_error = None;
                    s.counters.publishes += 1;
                    s.last_publish = Some(Timestamp::now());
                    if repair {
                        s.counters.repairs += 1;
                    }
                });
                if repair {
                    tracing::warn!(dir = %self.cfg.output_dir.display(), %snapshot, "files were changed or deleted by someone else; restored");
                } else {
                    tracing::info!(dir = %self.cfg.output_dir.display(), %snapshot, files = set.files.len(), "published");
                    self.request_reload();
                }
                self.last_digest = Some(d);
                (true, !missing)
            }
            Err(e) => {
                tracing::error!(error = %e, "publishing failed; the previous files are still live");
                self.shared.with(|s| {
                    s.error("publish");
                    s.publish_error = Some(e.to_string());
                });
                (false, false)
            }
        }
    }

    fn request_reload(&mut self) {
        let Some(settings) = self.cfg.reload.clone() else {
            return;
        };
        self.generation += 1;
        self.reload_tx.send_replace(reload::Request {
            generation: self.generation,
            settings: Some(Arc::new(settings)),
        });
    }

    fn update_key_status(&self) {
        let keys: BTreeMap<String, KeyStatus> = self
            .cfg
            .keys
            .iter()
            .map(|k| {
                let id = id_of(k);
                let cached = self.cache.get(&id);
                let mut versions: Vec<u32> = cached
                    .map(|c| c.material.versions.iter().map(|v| v.version).collect())
                    .unwrap_or_default();
                versions.sort_unstable();
                let error = self
                    .key_errors
                    .get(&id)
                    .cloned()
                    .or_else(|| cached.is_none().then(|| "not delivered yet".to_string()));
                let label = if self.cfg.keys.iter().filter(|o| id_of(o) == id).count() > 1 {
                    format!("{}:{}", k.name, k.format())
                } else {
                    k.name.to_string()
                };
                (
                    label,
                    KeyStatus {
                        mount: k.mount.clone(),
                        format: k.format(),
                        healthy: error.is_none(),
                        error,
                        latest_version: cached.map(|c| c.material.latest_version).unwrap_or(0),
                        versions,
                    },
                )
            })
            .collect();
        self.shared.with(|s| s.keys = keys);
    }
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
