//! The reconcile loop: turn "Vault has these usable versions" into "the output directory holds
//! exactly these files, and the mailer has loaded them". It only orchestrates:
//!
//! - `fetch` reads each key's metadata, and exports only when its fingerprint changed;
//! - `desired` works out the complete file set from the last good material of every key (pure);
//! - `deliver` makes the directory match it (on the blocking pool, with backoff on failure);
//! - `reload` is told which content is live, and reloads the mailer until it has it.
//!
//! A *full pass* reads Vault, then delivers; a *republish* delivers the known material again
//! without touching Vault (staged activation coming due, a retry after a failed publish, repair
//! after someone changed the directory). A pass never sees why it runs and re-reads what it
//! needs, so running one twice is harmless.
//!
//! Failure policy: Vault down, sealed or answering 5xx stops the pass's Vault reads and backs
//! off with jitter; a key-level error (403, deleted key, material that does not render)
//! degrades that key only: its last good material stays known, so its files stay. After a
//! restart the last good material of every delivered key comes from the live snapshot's record
//! (`state`), so a key that fails right after a restart keeps its files too. Nothing is ever
//! removed because of an error.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use keyroll::render::KeyMaterial;
use keyroll::vault::{Vault, VaultError};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::backoff::{jittered, Backoff};
use crate::closedloop::ClosedLoop;
use crate::config::Config;
use crate::deliver::{self, Delivered, Deliverer, Recovery};
use crate::desired::{self, Digest, Disk, KeyId, Plan};
use crate::fetch::{self, Fetched, Fingerprint, Read, Severity};
use crate::reload::Reloads;
use crate::renew::Renewal;
use crate::selfheal;
use crate::status::{KeyStatus, PassSummary, Shared};

/// First delay after Vault was found unavailable.
pub const VAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Longest delay between attempts while Vault is unavailable (also never above the poll
/// interval, so an outage never slows recovery below the normal cadence).
pub const VAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Quiet time after a change in the output directory before checking it, so a burst of events
/// (ours or someone else's) costs one check.
pub const HEAL_DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest single timer the loop sets (staged activation may be weeks away; it re-arms).
const MAX_TIMER: Duration = Duration::from_secs(24 * 3600);

/// What one pass found.
#[derive(Debug, Default, Clone)]
pub struct PassResult {
    pub vault_error: Option<String>,
    /// Every configured key is current (read, exported if needed, rendered) and published.
    pub complete: bool,
    pub published: bool,
    /// Some configured key has never been delivered.
    pub failed_keys: Vec<String>,
    /// The Vault settings cannot work at all (bad CA file...): exit 64.
    pub fatal: Option<String>,
}

pub struct Watcher {
    cfg: Arc<Config>,
    vault: Option<Vault>,
    renewal: Option<Renewal>,
    stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
    /// Last good material of each key (fresh, or recovered from the live snapshot).
    material: BTreeMap<KeyId, KeyMaterial>,
    /// Fingerprints of material read from Vault by this process (none for recovered material,
    /// so the first read exports it again).
    fingerprints: BTreeMap<KeyId, Fingerprint>,
    key_errors: BTreeMap<KeyId, String>,
    disk: Disk,
    deliverer: Deliverer,
    reloads: Reloads,
    /// Content live in the directory, as far as this process knows.
    live: Option<Digest>,
    /// Bumped whenever the inputs of the desired set change (new material, new config).
    generation: u64,
    next_change: Option<Timestamp>,
    announced: bool,
    /// Which version each DKIM key signs with, the DNS gate, signing reports.
    closed: ClosedLoop,
}

impl Watcher {
    pub fn new(
        cfg: Arc<Config>,
        vault: Option<Vault>,
        shared: Arc<Shared>,
        reloads: Reloads,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let mut w = Watcher {
            deliverer: Deliverer::new(cfg.output_dir.clone()),
            cfg,
            vault: None,
            renewal: None,
            stop,
            shared,
            material: BTreeMap::new(),
            fingerprints: BTreeMap::new(),
            key_errors: BTreeMap::new(),
            disk: Disk::Known,
            reloads,
            live: None,
            generation: 0,
            next_change: None,
            announced: false,
            closed: ClosedLoop::default(),
        };
        if let Some(v) = vault {
            w.adopt(v);
        }
        w.update_key_status();
        w
    }

    /// Makes `v` the current client and keeps its token alive (the previous client's renewal
    /// stops).
    fn adopt(&mut self, v: Vault) {
        self.renewal = Some(Renewal::start(&v, self.stop.clone()));
        self.vault = Some(v);
    }

    /// Learns what the live snapshot holds (and tidies after a crash): every key it delivered
    /// becomes known material, and its content is owed to the mailer if not confirmed.
    pub async fn recover(&mut self) {
        let dir = self.cfg.output_dir.clone();
        match deliver::recover(dir, self.cfg.snapshot_grace).await {
            Ok(Recovery::Empty) => {}
            Ok(Recovery::Known(r)) => {
                let wanted: BTreeSet<KeyId> = self.cfg.keys.iter().map(desired::id_of).collect();
                let keys: Vec<String> = r.keys.keys().map(|(_, n)| n.to_string()).collect();
                self.material = r
                    .keys
                    .into_iter()
                    .filter(|(id, _)| wanted.contains(id))
                    .collect();
                let table = std::fs::read_to_string(self.cfg.output_dir.join("SigningTable")).ok();
                self.closed.recover(
                    &self.cfg.keys,
                    &self.material,
                    table.as_deref(),
                    Timestamp::now(),
                );
                self.deliverer.assume_live(r.digest);
                self.live = Some(r.digest);
                self.reloads.live(r.digest, self.cfg.reload.as_ref());
                tracing::info!(?keys, "recovered the live snapshot's keys");
            }
            Ok(Recovery::Unknown { snapshot, why }) => {
                self.disk = Disk::Unknown;
                tracing::warn!(%snapshot, reason = %why, "the live snapshot has no usable record of its keys; nothing will be published until every key has been read");
            }
            Err(e) => {
                self.disk = Disk::Unknown;
                tracing::warn!(error = %e, "cannot read the output directory's current state");
            }
        }
        self.update_key_status();
    }

    /// Runs passes until `stop` fires: at start, every poll interval (jittered), on `/refresh`,
    /// on config changes, when staged activation comes due, after a failed publish's backoff,
    /// and after directory changes. Returns an exit code if it cannot go on.
    pub async fn run(
        mut self,
        mut cfg_rx: watch::Receiver<(Arc<Config>, Option<Vault>)>,
        heal: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
    ) -> Option<u8> {
        self.recover().await;
        let mut vault_backoff = self.vault_backoff();
        let mut next_poll = Instant::now();
        let mut heal_at: Option<Instant> = None;
        let shared = self.shared.clone();
        loop {
            let change_at = self.next_change.map(instant_at);
            let retry_at = self.deliverer.retry_at();
            let dns_at = self.closed.due().map(instant_at);
            enum Why {
                Full,
                Republish,
                Dns,
                Stop,
            }
            let far = Instant::now() + MAX_TIMER;
            let why = tokio::select! {
                biased;
                _ = stop.changed() => Why::Stop,
                r = cfg_rx.changed() => {
                    if r.is_err() {
                        Why::Stop
                    } else {
                        let (cfg, vault) = cfg_rx.borrow_and_update().clone();
                        self.apply_config(cfg, vault);
                        vault_backoff = self.vault_backoff();
                        Why::Full
                    }
                }
                _ = shared.refresh.notified() => Why::Full,
                _ = tokio::time::sleep_until(next_poll) => Why::Full,
                _ = tokio::time::sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => {
                    self.deliverer.timer_fired();
                    Why::Republish
                }
                _ = tokio::time::sleep_until(change_at.unwrap_or(far)), if change_at.is_some() => {
                    self.next_change = None;
                    Why::Republish
                }
                // A waiting version's negative TTL runs out: check DNS again now rather than
                // at the next poll.
                _ = tokio::time::sleep_until(dns_at.unwrap_or(far)), if dns_at.is_some() => Why::Dns,
                _ = tokio::time::sleep_until(heal_at.unwrap_or(far)), if heal_at.is_some() => {
                    heal_at = None;
                    Why::Republish
                }
                _ = heal.notified(), if heal_at.is_none() => {
                    heal_at = Some(Instant::now() + HEAL_DEBOUNCE);
                    continue;
                }
            };
            match why {
                Why::Stop => return None,
                Why::Republish => {
                    self.republish().await;
                    self.report().await;
                }
                Why::Dns => {
                    self.check_dns().await;
                    self.republish().await;
                    self.report().await;
                }
                Why::Full => {
                    let ticket = shared.pass_started();
                    let started = Instant::now();
                    let r = self.full_pass().await;
                    shared.pass_finished(
                        ticket,
                        PassSummary {
                            published: r.published,
                            complete: r.complete,
                        },
                    );
                    if let Some(e) = r.fatal {
                        tracing::error!(error = %e, "cannot build the Vault client");
                        return Some(crate::app::EXIT_CONFIG);
                    }
                    // Polls keep their cadence from the start of a pass: the time a pass takes
                    // does not add to the interval.
                    next_poll = if r.vault_error.is_some() {
                        Instant::now() + vault_backoff.next()
                    } else {
                        vault_backoff.reset();
                        (started + jittered(self.cfg.poll_interval, self.cfg.poll_jitter))
                            .max(Instant::now())
                    };
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
            self.adopt(v);
        }
        for id in desired::unconfigured(&cfg.keys, self.material.keys().cloned()) {
            self.material.remove(&id);
            self.fingerprints.remove(&id);
        }
        let wanted: BTreeSet<KeyId> = cfg.keys.iter().map(desired::id_of).collect();
        self.key_errors.retain(|id, _| wanted.contains(id));
        self.cfg = cfg;
        self.generation += 1;
        // A reload still owed goes out with the new reload settings.
        if let Some(d) = self.live {
            self.reloads.live(d, self.cfg.reload.as_ref());
        }
        self.update_key_status();
    }

    /// One full pass for `--once`: every key must be delivered, or nothing is written.
    pub async fn once(&mut self) -> PassResult {
        let mut r = PassResult::default();
        self.read_vault(&mut r).await;
        if r.vault_error.is_none() && r.failed_keys.is_empty() && self.key_errors.is_empty() {
            // One DNS check: with activation = "dns" the newest version served right now signs
            // (no negative TTL can pass within one run), not a blind choice.
            self.check_dns().await;
            let delivered = self.republish().await;
            r.published = matches!(delivered, Some(Delivered::Published { .. }));
            r.complete = matches!(
                delivered,
                Some(Delivered::Published { .. } | Delivered::Unchanged)
            );
        }
        r
    }

    /// Reads Vault (connecting first if needed), then delivers whatever is current.
    pub async fn full_pass(&mut self) -> PassResult {
        let mut r = PassResult::default();
        if self.vault.is_none() {
            match selfheal::connect(&self.cfg).await {
                Ok(v) => {
                    tracing::info!("logged in to Vault");
                    self.adopt(v);
                }
                Err(e @ VaultError::Config(_)) => {
                    r.fatal = Some(e.to_string());
                    return r;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot log in to Vault; keeping the last good files and retrying");
                    self.shared.with(|s| s.error("vault"));
                    r.vault_error = Some(e.to_string());
                }
            }
        }
        if self.vault.is_some() {
            self.read_vault(&mut r).await;
        }
        // DNS is checked whatever Vault said: the material known is what gets delivered.
        self.check_dns().await;
        let delivered = self.republish().await;
        if r.vault_error.is_none() {
            self.report().await;
        }
        r.published = matches!(delivered, Some(Delivered::Published { .. }));
        let live_ok = matches!(
            delivered,
            Some(Delivered::Published { .. } | Delivered::Unchanged)
        );
        r.complete = live_ok
            && r.vault_error.is_none()
            && self.key_errors.is_empty()
            && r.failed_keys.is_empty();
        // Ready: every configured key's files are live (some may be the last good ones
        // recovered after a restart while Vault cannot be asked).
        let every_key_live = live_ok
            && self
                .cfg
                .keys
                .iter()
                .all(|k| self.material.contains_key(&desired::id_of(k)));
        self.shared.with(|s| {
            s.counters.passes += 1;
            s.vault_error = r.vault_error.clone();
            if r.complete {
                s.last_success = Some(Timestamp::now());
            }
            if every_key_live {
                s.ready = true;
            }
        });
        r
    }

    /// Reads every key's metadata and exports those whose fingerprint changed; new material
    /// replaces the last good one only if it renders.
    async fn read_vault(&mut self, result: &mut PassResult) {
        let Some(vault) = self.vault.clone() else {
            return;
        };
        let ids: Vec<KeyId> = {
            let mut seen = BTreeSet::new();
            self.cfg
                .keys
                .iter()
                .map(desired::id_of)
                .filter(|id| seen.insert(id.clone()))
                .collect()
        };
        // One sys/health first (more only when the node in use is not active): a follower that
        // lost its leader still answers reads, from state nobody can update. That is an outage:
        // keep the files, and every key keeps its previous verdict ("not checked").
        let cluster = vault.cluster_health().await;
        if cluster.is_degraded() {
            let msg = cluster.to_string();
            tracing::warn!(error = %msg, "Vault unavailable; keeping the last good files");
            self.shared.with(|s| s.error("vault"));
            for id in ids {
                self.key_errors
                    .entry(id.clone())
                    .or_insert_with(|| format!("not checked: {msg}"));
                if !self.material.contains_key(&id) {
                    result.failed_keys.push(id.1.to_string());
                }
            }
            result.vault_error = Some(msg);
            self.update_key_status();
            return;
        }
        let keys = ids
            .into_iter()
            .map(|id| {
                let fp = self.fingerprints.get(&id).cloned();
                (id, fp)
            })
            .collect();
        let now = Timestamp::now();
        for (id, read) in fetch::fetch_all(&vault, keys, &self.shared).await {
            let span = tracing::info_span!("key", key = %id.1, mount = %id.0);
            let _g = span.enter();
            let fetched = match read {
                Read::Done(r) => r,
                Read::NotChecked => {
                    // Keep the previous per-key verdict; the key was simply not checked.
                    let e = result.vault_error.clone().unwrap_or_default();
                    self.key_errors
                        .entry(id.clone())
                        .or_insert_with(|| format!("not checked: {e}"));
                    if !self.material.contains_key(&id) {
                        result.failed_keys.push(id.1.to_string());
                    }
                    continue;
                }
            };
            let checked = fetched.and_then(|f| match f {
                Fetched::Same => Ok(()),
                Fetched::New {
                    fingerprint,
                    material,
                } => {
                    desired::renders_alone(
                        &self.cfg.keys,
                        &self.cfg.output_dir,
                        &id,
                        &material,
                        now,
                    )
                    .map_err(|e| {
                        self.shared.with(|s| s.error("render"));
                        (Severity::Key, e.to_string())
                    })?;
                    let versions: Vec<u32> = material.versions.iter().map(|v| v.version).collect();
                    tracing::info!(
                        ?versions,
                        latest = material.latest_version,
                        "new key material"
                    );
                    self.material.insert(id.clone(), material);
                    self.fingerprints.insert(id.clone(), fingerprint);
                    self.generation += 1;
                    Ok(())
                }
            });
            match checked {
                Ok(()) => {
                    self.key_errors.remove(&id);
                }
                Err((Severity::VaultDown, msg)) => {
                    // Several reads in flight may all find Vault down: say it once per pass.
                    if result.vault_error.is_none() {
                        tracing::warn!(error = %msg, "Vault unavailable; keeping the last good files");
                        self.shared.with(|s| s.error("vault"));
                    }
                    self.key_errors.insert(id.clone(), msg.clone());
                    result.vault_error.get_or_insert(msg);
                }
                Err((Severity::Key, msg)) => {
                    if self.key_errors.get(&id) != Some(&msg) {
                        tracing::error!(error = %msg, "key degraded; keeping its last delivered files");
                    } else {
                        tracing::debug!(error = %msg, "key still degraded");
                    }
                    self.shared.with(|s| s.error("key"));
                    self.key_errors.insert(id.clone(), msg);
                }
            }
            if !self.material.contains_key(&id) {
                result.failed_keys.push(id.1.to_string());
            }
        }
        if result.vault_error.is_none() && self.shared.with(|s| s.vault_error.is_some()) {
            tracing::info!("Vault is available again");
        }
        self.update_key_status();
    }

    /// Checks DNS for the dns-gated keys; a newly confirmed version changes the desired set.
    async fn check_dns(&mut self) {
        if self
            .closed
            .check(&self.cfg, &self.material, &self.shared)
            .await
        {
            self.generation += 1;
        }
        self.update_key_status();
    }

    /// Writes the signing reports that are due (never in `--once`: no mailer signs yet).
    async fn report(&mut self) {
        if let Some(vault) = self.vault.clone() {
            self.closed.report(&self.cfg, &vault, &self.shared).await;
        }
    }

    /// Works out the desired set from the known material and delivers it, unless a failed
    /// attempt with the same inputs is still backing off. Reports the outcome; returns None
    /// when nothing was attempted.
    async fn republish(&mut self) -> Option<Delivered> {
        if self
            .deliverer
            .deferred_until(self.generation, Instant::now())
            .is_some()
        {
            return None;
        }
        let now = Timestamp::now();
        let plan = desired::plan(
            &self.cfg.keys,
            &self.cfg.output_dir,
            &self.material,
            self.disk,
            &self.closed.gates(&self.cfg.keys),
            now,
        );
        let d = match plan {
            Err(e) => {
                self.next_change = None;
                let retry = self.deliverer.failed(self.generation);
                tracing::error!(error = %e, retry_in_ms = ms_until(retry), "rendering the output set failed; nothing written");
                self.shared.with(|s| {
                    s.error("render");
                    s.publish_error = Some(e.to_string());
                });
                return None;
            }
            Ok(Plan::Hold(why)) => {
                self.next_change = None;
                if self.disk == Disk::Unknown {
                    self.shared.with(|s| s.publish_error = Some(why));
                }
                return None;
            }
            Ok(Plan::Publish(d)) => d,
        };
        self.next_change = d.next_change;
        if !d.undelivered.is_empty() {
            tracing::debug!(keys = ?d.undelivered, "publishing without keys not delivered yet");
        }
        let dir = self.cfg.output_dir.display().to_string();
        let files = d.set.files.len();
        let delivered = self
            .deliverer
            .deliver(&d, self.cfg.publish_options(), self.generation)
            .await;
        match &delivered {
            Delivered::Published { snapshot, repair } => {
                self.shared.with(|s| {
                    s.publish_error = None;
                    s.counters.publishes += 1;
                    s.last_publish = Some(Timestamp::now());
                    if *repair {
                        s.counters.repairs += 1;
                    }
                });
                if *repair {
                    tracing::warn!(%dir, %snapshot, "files were changed or deleted by someone else; restored");
                } else {
                    tracing::info!(%dir, %snapshot, files, "published");
                }
            }
            Delivered::Unchanged => {
                self.shared.with(|s| s.publish_error = None);
                if !self.announced {
                    tracing::info!(%dir, files, "output directory already current");
                }
            }
            Delivered::Incomplete { error } => {
                let retry = self.deliverer.retry_at().map(ms_until).unwrap_or(0);
                tracing::error!(%error, retry_in_ms = retry, "the new files are live, but publishing did not finish; retrying");
                self.shared.with(|s| {
                    s.error("publish");
                    s.publish_error = Some(error.clone());
                });
            }
            Delivered::Failed { error } => {
                let retry = self.deliverer.retry_at().map(ms_until).unwrap_or(0);
                tracing::error!(%error, retry_in_ms = retry, "publishing failed; the previous files are still live");
                self.shared.with(|s| {
                    s.error("publish");
                    s.publish_error = Some(error.clone());
                });
            }
        }
        if delivered.is_live() {
            self.announced = true;
            self.disk = Disk::Known;
            self.live = Some(d.digest);
            self.reloads.live(d.digest, self.cfg.reload.as_ref());
            self.closed
                .published(&self.cfg.keys, &self.material, &d.set, Timestamp::now());
            self.update_key_status();
        }
        Some(delivered)
    }

    fn update_key_status(&self) {
        let keys: BTreeMap<String, KeyStatus> = self
            .cfg
            .keys
            .iter()
            .map(|k| {
                let id = desired::id_of(k);
                let known = self.material.get(&id);
                let mut versions: Vec<u32> = known
                    .map(|m| m.versions.iter().map(|v| v.version).collect())
                    .unwrap_or_default();
                versions.sort_unstable();
                let error = self
                    .key_errors
                    .get(&id)
                    .cloned()
                    .or_else(|| known.is_none().then(|| "not delivered yet".to_string()));
                let label = if self
                    .cfg
                    .keys
                    .iter()
                    .filter(|o| desired::id_of(o) == id)
                    .count()
                    > 1
                {
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
                        latest_version: known.map(|m| m.latest_version).unwrap_or(0),
                        versions,
                        dkim: self.closed.status(k, known),
                    },
                )
            })
            .collect();
        self.shared.with(|s| s.keys = keys);
    }
}

/// The monotonic instant of wall-clock time `t` (rounded up a little: rendering exactly at the
/// boundary must see it passed), never more than a day away.
fn instant_at(t: Timestamp) -> Instant {
    let wait = t.duration_since(Timestamp::now());
    let wait = Duration::try_from(wait)
        .unwrap_or(Duration::ZERO)
        .min(MAX_TIMER);
    Instant::now() + wait + Duration::from_millis(5)
}

fn ms_until(at: Instant) -> u64 {
    at.saturating_duration_since(Instant::now()).as_millis() as u64
}
