//! Rewrap: move every stored ciphertext below a key's latest version up to it, with transit's
//! batch `rewrap` (Vault decrypts and re-encrypts inside; keyroll never sees plaintext), writing
//! each value back only if the row still holds what was read (compare-and-swap), so an
//! application write that lands meanwhile is never overwritten.
//!
//! Per source, a bounded pipeline:
//! 1. a reader pages through the rows below the target in primary-key order (keyset: each page
//!    is `pk > last`, so memory and each query stay small whatever the table size);
//! 2. up to `concurrency` pages are at Vault at once (the slow part);
//! 3. pages are written back strictly in order, one transaction each.
//!
//! Resumable after a kill. A checkpoint in Vault KV (`<state.path>/rewrap/<mount>/<name>`,
//! check-and-set) holds the target version and, per source, `after` (every row up to it is
//! done) plus the page about to be written, as (key, fingerprint of the new ciphertext) pairs.
//! It is written before each page's database transaction, so after a kill at any instant the
//! next run knows exactly which rows of the interrupted page it wrote (their current value
//! carries its fingerprint; Vault's ciphertexts are never repeated), counts them, and resumes
//! after the last completed page: nothing is redone, nothing lost, and "rewrapped" stays exact.
//! Rows already moved are never rewritten anyway: the reader only selects rows below the target.
//! A checkpoint for another target version (the key rotated since) starts over; a finished one
//! makes the next run a fresh pass.
//!
//! Two concurrent runs on one key: the check-and-set on the checkpoint makes the older one stop
//! ("superseded") at its next page; the rows it had in flight are still compare-and-swapped, so
//! neither run can overwrite anything but the exact value it read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::sync::{mpsc, watch};

use crate::datasource::{Counts, DataSource, Db, Engine, Pk, Row, SourceError, Swap};
use crate::policy::{KeyPolicy, StateSettings};
use crate::vault::datakey::{RewrapItem, MAX_BATCH};
use crate::vault::{Vault, VaultError};
use crate::KeyName;

/// KV sub-path (under `[state] path`) of the rewrap checkpoints.
pub const CHECKPOINT_DIR: &str = "rewrap";
/// Rows per page — one database transaction and one checkpoint write — by default. Vault gets
/// a page in requests of at most [`MAX_BATCH`] rows, all at once.
pub const DEFAULT_BATCH_SIZE: usize = 1000;
/// The most rows per page.
pub const MAX_BATCH_SIZE: usize = 2000;
/// Pages at Vault at once, by default; OpenBao's batch rewrap gains ~40 % from several
/// requests in flight.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// The most pages at Vault at once (each page is up to `batch_size / 200` requests).
pub const MAX_CONCURRENCY: usize = 16;
/// The highest `--max-rate` accepted (rows per second).
pub const MAX_ROWS_PER_SEC: u32 = 1_000_000;
/// How often progress goes to the log.
pub const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(10);
/// Distinct failure reasons kept per source (the rest are counted under one line).
pub const MAX_FAILURE_REASONS: usize = 20;
/// Example primary keys kept per failure reason.
pub const MAX_SAMPLE_KEYS: usize = 5;
/// Hex digits of the SHA-256 fingerprint stored for rows in flight.
const FINGERPRINT_HEX: usize = 16;
/// Attempts to claim a checkpoint that a running rewrap keeps saving (each save between our read
/// and our claim costs one); the running one saves once per page, so two or three suffice.
const CLAIM_ATTEMPTS: u32 = 5;
const OTHER_REASONS: &str = "(other reasons)";

/// How a run paces itself. Validated by [`RewrapOptions::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RewrapOptions {
    pub batch_size: usize,
    pub concurrency: usize,
    /// Rows per second across the run; None = as fast as Vault and the database go.
    pub max_rows_per_sec: Option<u32>,
}

impl Default for RewrapOptions {
    fn default() -> Self {
        RewrapOptions {
            batch_size: DEFAULT_BATCH_SIZE,
            concurrency: DEFAULT_CONCURRENCY,
            max_rows_per_sec: None,
        }
    }
}

impl RewrapOptions {
    /// Checks the bounds; the error says which value and the accepted range.
    pub fn new(
        batch_size: usize,
        concurrency: usize,
        max_rows_per_sec: Option<u32>,
    ) -> Result<Self, String> {
        if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
            return Err(format!(
                "batch size {batch_size} is out of range; use 1..={MAX_BATCH_SIZE}"
            ));
        }
        if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
            return Err(format!(
                "concurrency {concurrency} is out of range; use 1..={MAX_CONCURRENCY}"
            ));
        }
        if let Some(r) = max_rows_per_sec {
            if !(1..=MAX_ROWS_PER_SEC).contains(&r) {
                return Err(format!(
                    "max rate {r} rows/s is out of range; use 1..={MAX_ROWS_PER_SEC}"
                ));
            }
        }
        Ok(RewrapOptions {
            batch_size,
            concurrency,
            max_rows_per_sec,
        })
    }
}

/// Rows Vault (or keyroll) refused for one reason, with a few of their keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureSample {
    pub rows: u64,
    pub sample_keys: Vec<Pk>,
}

/// The page about to be written: its keys and the fingerprints of the values being written.
///
/// Stored as *one* JSON string (a JSON array inside): OpenBao refuses request bodies with more
/// than about 1,000 strings, which a page of 500 (key, fingerprint) pairs would exceed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inflight {
    #[serde(with = "packed")]
    pub rows: Vec<(Pk, String)>,
}

/// Serde for [`Inflight::rows`]: a JSON array packed into a single string.
mod packed {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    use crate::datasource::Pk;

    pub fn serialize<S: Serializer>(rows: &[(Pk, String)], s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(rows).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(Pk, String)>, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(D::Error::custom)
    }
}

/// One source's progress in the checkpoint (cumulative over resumed runs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceProgress {
    /// `table.column` this progress is about: if the policy now points the source elsewhere,
    /// its progress is not carried over.
    #[serde(default)]
    pub location: String,
    /// Every row with a key up to this one is done.
    pub after: Option<Pk>,
    pub done: bool,
    pub rewrapped: u64,
    pub skipped_changed: u64,
    pub failed: u64,
    #[serde(default)]
    pub failures: BTreeMap<String, FailureSample>,
    #[serde(default)]
    pub inflight: Option<Inflight>,
}

impl SourceProgress {
    fn fail(&mut self, reason: &str, pk: &Pk) {
        self.failed += 1;
        let reason =
            if self.failures.contains_key(reason) || self.failures.len() < MAX_FAILURE_REASONS {
                reason
            } else {
                OTHER_REASONS
            };
        let f = self.failures.entry(reason.to_string()).or_default();
        f.rows += 1;
        if f.sample_keys.len() < MAX_SAMPLE_KEYS {
            f.sample_keys.push(pk.clone());
        }
    }
}

/// The checkpoint record kept in Vault KV.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub target_version: u32,
    pub started_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
    /// Runs that worked on this pass (1 + resumptions).
    pub runs: u32,
    pub sources: BTreeMap<String, SourceProgress>,
}

/// One source's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub source: String,
    pub engine: Engine,
    pub table: String,
    pub column: String,
    /// Rows below the target when this run looked (before rewrapping).
    pub below_target: u64,
    pub non_transit: u64,
    pub null: u64,
    /// Cumulative over the pass, including resumed runs.
    pub rewrapped: u64,
    pub skipped_changed: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, FailureSample>,
    /// What this run alone rewrapped (differs from `rewrapped` after a resume).
    pub rewrapped_this_run: u64,
    /// Rows of a page interrupted by a kill that the previous run had written.
    pub recovered_inflight: u64,
    pub took_ms: u64,
    pub complete: bool,
}

/// The outcome for one key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyRewrapReport {
    pub key: String,
    pub mount: String,
    pub target_version: u32,
    /// Whether this run continued an interrupted one.
    pub resumed: bool,
    /// Stopped early on request; run again to resume.
    pub interrupted: bool,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub sources: Vec<SourceReport>,
}

impl KeyRewrapReport {
    pub fn rewrapped(&self) -> u64 {
        self.sources.iter().map(|s| s.rewrapped).sum()
    }
    pub fn skipped_changed(&self) -> u64 {
        self.sources.iter().map(|s| s.skipped_changed).sum()
    }
    pub fn failed(&self) -> u64 {
        self.sources.iter().map(|s| s.failed).sum()
    }
    pub fn non_transit(&self) -> u64 {
        self.sources.iter().map(|s| s.non_transit).sum()
    }
}

/// A progress snapshot for a progress bar.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    pub key: &'a str,
    pub source: &'a str,
    /// Rows handled this run (rewrapped + skipped + failed).
    pub done: u64,
    /// Rows below the target when the source started.
    pub total: u64,
    pub rewrapped: u64,
    pub skipped_changed: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Set on the last call for a source.
    pub finished: bool,
}

/// Why a rewrap stopped.
#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{mount}/keys/{key} does not exist; nothing to rewrap to")]
    KeyMissing { mount: String, key: String },
    #[error(
        "another keyroll rewrap took over {path} (its checkpoint changed under this run); this \
         run stopped, the other continues. If no other run exists, the checkpoint's latest \
         version was deleted: remove it for good with `kv metadata delete`"
    )]
    Superseded { path: String },
    #[error("rewrap checkpoint {path} is not readable: {reason}")]
    BadCheckpoint { path: String, reason: String },
}

/// The KV path (below the state mount) of a key's checkpoint.
pub fn checkpoint_path(state: &StateSettings, mount: &str, key: &str) -> String {
    format!("{}/{CHECKPOINT_DIR}/{mount}/{key}", state.path)
}

/// Reads a key's checkpoint (for status displays and tests).
pub async fn read_checkpoint(
    vault: &Vault,
    state: &StateSettings,
    mount: &str,
    key: &str,
) -> Result<Option<Checkpoint>, RewrapError> {
    let path = checkpoint_path(state, mount, key);
    match vault.kv_read(&state.mount, &path).await? {
        None => Ok(None),
        Some(e) => {
            serde_json::from_value(e.data)
                .map(Some)
                .map_err(|err| RewrapError::BadCheckpoint {
                    path,
                    reason: err.to_string(),
                })
        }
    }
}

/// A short fingerprint of a ciphertext, to recognise our own write after a kill.
pub fn fingerprint(ciphertext: &str) -> String {
    let d = sha2::Sha256::digest(ciphertext.as_bytes());
    let mut s = String::with_capacity(FINGERPRINT_HEX);
    for b in d.iter().take(FINGERPRINT_HEX / 2) {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The checkpoint as this run holds it, with the KV version for check-and-set.
struct Store<'a> {
    vault: &'a Vault,
    mount: String,
    path: String,
    version: u64,
    data: Checkpoint,
    now: &'a (dyn Fn() -> Timestamp + Sync),
}

impl Store<'_> {
    async fn save(&mut self) -> Result<(), RewrapError> {
        self.data.updated_at = (self.now)();
        let value = serde_json::to_value(&self.data).map_err(|e| RewrapError::BadCheckpoint {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        match self
            .vault
            .kv_write(&self.mount, &self.path, &value, Some(self.version))
            .await
        {
            Ok(v) => {
                self.version = v;
                Ok(())
            }
            Err(VaultError::CasMismatch { .. }) => Err(RewrapError::Superseded {
                path: format!("{}/{}", self.mount, self.path),
            }),
            Err(e) => Err(e.into()),
        }
    }
}

/// Everything a run needs that does not change per source.
pub struct Ctx<'a> {
    pub vault: &'a Vault,
    pub state: &'a StateSettings,
    pub opts: RewrapOptions,
    pub now: &'a (dyn Fn() -> Timestamp + Sync),
    pub progress: &'a (dyn Fn(&Progress<'_>) + Sync),
    /// Flips to true to stop after the page being written (the checkpoint is saved).
    pub stop: &'a watch::Receiver<bool>,
}

/// Rewraps every source of one key to its latest version.
pub async fn rewrap_key(
    ctx: &Ctx<'_>,
    key: &KeyPolicy,
    sources: &[DataSource],
) -> Result<KeyRewrapReport, RewrapError> {
    let started_at = (ctx.now)();
    let transit = ctx
        .vault
        .read_key(&key.mount, &key.name)
        .await?
        .ok_or_else(|| RewrapError::KeyMissing {
            mount: key.mount.clone(),
            key: key.name.to_string(),
        })?;
    let target = transit.latest_version;
    let path = checkpoint_path(ctx.state, &key.mount, key.name.as_str());
    // Claim the checkpoint before any work, so a concurrent run is detected at once. The newest
    // run takes over: if a running one saved its progress between our read and our claim, read
    // again and claim on top of it (it then stops at its next save, "took over").
    let mut attempt = 0;
    let (mut store, resume) = loop {
        attempt += 1;
        let existing = ctx.vault.kv_read(&ctx.state.mount, &path).await?;
        let version = existing.as_ref().map(|e| e.version).unwrap_or(0);
        let previous: Option<Checkpoint> = match existing {
            None => None,
            Some(e) => match serde_json::from_value(e.data) {
                Ok(c) => Some(c),
                Err(err) => {
                    // An unreadable checkpoint only costs a re-scan: rows already at the target are
                    // never selected again. Say so, and start over.
                    tracing::warn!(path = %path, error = %err, "rewrap checkpoint unreadable; starting a fresh pass");
                    None
                }
            },
        };
        let resume = previous
            .as_ref()
            .is_some_and(|c| c.target_version == target && c.finished_at.is_none());
        let data = match previous {
            Some(mut c) if resume => {
                c.runs = c.runs.saturating_add(1);
                c
            }
            other => {
                if let Some(c) = other {
                    tracing::info!(
                        previous_target = c.target_version,
                        target,
                        finished = c.finished_at.is_some(),
                        "starting a new rewrap pass"
                    );
                }
                Checkpoint {
                    target_version: target,
                    started_at,
                    updated_at: started_at,
                    finished_at: None,
                    runs: 1,
                    sources: BTreeMap::new(),
                }
            }
        };
        let mut store = Store {
            vault: ctx.vault,
            mount: ctx.state.mount.clone(),
            path: path.clone(),
            version,
            data,
            now: ctx.now,
        };
        match store.save().await {
            Ok(()) => break (store, resume),
            Err(RewrapError::Superseded { .. }) if attempt < CLAIM_ATTEMPTS => {
                tracing::debug!(
                    attempt,
                    "a running rewrap saved while this one claimed; reading again"
                );
            }
            Err(e) => return Err(e),
        }
    };
    if resume {
        tracing::info!(key = %key.name, target, "resuming an interrupted rewrap");
    }

    let mut reports = Vec::with_capacity(sources.len());
    let mut interrupted = false;
    for s in sources {
        if interrupted {
            break;
        }
        let r = rewrap_source(ctx, key, s, target, &mut store).await?;
        interrupted = !r.complete;
        reports.push(r);
    }
    let finished_at = (ctx.now)();
    if !interrupted {
        store.data.finished_at = Some(finished_at);
        store.save().await?;
    }
    Ok(KeyRewrapReport {
        key: key.name.to_string(),
        mount: key.mount.clone(),
        target_version: target,
        resumed: resume,
        interrupted,
        started_at,
        finished_at,
        sources: reports,
    })
}

/// A page read and rewrapped, waiting to be written.
struct Batch {
    rows: Vec<Row>,
    /// One per row: the new ciphertext or why not.
    results: Vec<Result<String, String>>,
}

async fn rewrap_source(
    ctx: &Ctx<'_>,
    key: &KeyPolicy,
    source: &DataSource,
    target: u32,
    store: &mut Store<'_>,
) -> Result<SourceReport, RewrapError> {
    let t0 = Instant::now();
    let mut st = store
        .data
        .sources
        .get(&source.id)
        .filter(|p| p.location == source.location())
        .cloned()
        .unwrap_or_else(|| SourceProgress {
            location: source.location(),
            ..Default::default()
        });
    let (db, counts) = if st.done {
        // Finished earlier in this pass (a resumed run): nothing to open.
        (None, Counts::default())
    } else {
        let db = Arc::new(Db::open(source).await?);
        db.check_writable().await?;
        let counts = db.census().await?;
        (Some(db), counts)
    };
    let mut report = SourceReport {
        source: source.id.clone(),
        engine: source.engine,
        table: source.table.to_string(),
        column: source.column.to_string(),
        below_target: counts.below(target),
        non_transit: counts.non_transit,
        null: counts.null,
        rewrapped: 0,
        skipped_changed: 0,
        failed: 0,
        failures: BTreeMap::new(),
        rewrapped_this_run: 0,
        recovered_inflight: 0,
        took_ms: 0,
        complete: true,
    };
    let Some(db) = db else {
        fill(&mut report, &st, t0);
        return Ok(report);
    };
    // A page the previous run was writing when it died: count the rows it did write.
    if let Some(inflight) = st.inflight.take() {
        let pks: Vec<Pk> = inflight.rows.iter().map(|(p, _)| p.clone()).collect();
        let current = db.current(&pks).await?;
        let mine = inflight
            .rows
            .iter()
            .zip(&current)
            .filter(|((_, fp), cur)| cur.as_deref().map(fingerprint).as_deref() == Some(fp))
            .count() as u64;
        st.rewrapped += mine;
        report.recovered_inflight = mine;
        tracing::info!(source = %source.id, rows = mine, of = pks.len(), "recovered the page in flight at the last stop");
    }
    tracing::info!(
        key = %key.name, source = %source.id, location = %source.location(), target,
        below_target = report.below_target, non_transit = counts.non_transit, null = counts.null,
        resume_after = ?st.after, "rewrap starting"
    );

    let (tx, mut rx) = mpsc::channel::<Result<Batch, RewrapError>>(ctx.opts.concurrency);
    let producer = tokio::spawn(produce(
        Job {
            db: db.clone(),
            vault: ctx.vault.clone(),
            mount: key.mount.clone(),
            name: key.name.clone(),
            source_id: source.id.clone(),
            table: source.table.to_string(),
            target,
            opts: ctx.opts,
            has_context: source.context_column.is_some(),
        },
        st.after.clone(),
        tx,
    ));
    let mut producer = AbortOnDrop(Some(producer));

    let mut this_run = (0u64, 0u64, 0u64);
    let mut last_log = Instant::now();
    let mut stop = ctx.stop.clone();
    let mut complete = true;
    loop {
        let stopped = async {
            // A dropped sender means "never stop", not "stop now".
            if stop.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let batch = tokio::select! {
            b = rx.recv() => b,
            _ = stopped => {
                complete = false;
                break;
            }
        };
        let Some(batch) = batch else {
            // The producer hung up: the end of the table, unless it died.
            producer.join().await?;
            break;
        };
        let batch = batch?;
        let mut swaps = Vec::with_capacity(batch.rows.len());
        let mut failed = Vec::new();
        for (row, res) in batch.rows.iter().zip(batch.results) {
            match res {
                Ok(new) => swaps.push(Swap {
                    pk: row.pk.clone(),
                    old: row.ciphertext.clone(),
                    new,
                }),
                Err(reason) => failed.push((row.pk.clone(), reason)),
            }
        }
        st.inflight = Some(Inflight {
            rows: swaps
                .iter()
                .map(|s| (s.pk.clone(), fingerprint(&s.new)))
                .collect(),
        });
        store.data.sources.insert(source.id.clone(), st.clone());
        store.save().await?;
        let written = db.swap(&swaps).await?;
        let n_written = written.iter().filter(|w| **w).count() as u64;
        let n_skipped = written.len() as u64 - n_written;
        st.rewrapped += n_written;
        st.skipped_changed += n_skipped;
        for (pk, reason) in &failed {
            st.fail(reason, pk);
        }
        st.after = batch.rows.last().map(|r| r.pk.clone()).or(st.after);
        st.inflight = None;
        store.data.sources.insert(source.id.clone(), st.clone());
        this_run.0 += n_written;
        this_run.1 += n_skipped;
        this_run.2 += failed.len() as u64;
        let p = Progress {
            key: key.name.as_str(),
            source: &source.id,
            done: this_run.0 + this_run.1 + this_run.2,
            total: report.below_target,
            rewrapped: this_run.0,
            skipped_changed: this_run.1,
            failed: this_run.2,
            elapsed: t0.elapsed(),
            finished: false,
        };
        (ctx.progress)(&p);
        if last_log.elapsed() >= PROGRESS_LOG_EVERY {
            last_log = Instant::now();
            log_progress(&p);
        }
        if *ctx.stop.borrow() {
            complete = false;
            break;
        }
    }
    st.done = complete;
    store.data.sources.insert(source.id.clone(), st.clone());
    store.save().await?;
    let p = Progress {
        key: key.name.as_str(),
        source: &source.id,
        done: this_run.0 + this_run.1 + this_run.2,
        total: report.below_target,
        rewrapped: this_run.0,
        skipped_changed: this_run.1,
        failed: this_run.2,
        elapsed: t0.elapsed(),
        finished: true,
    };
    (ctx.progress)(&p);
    log_progress(&p);
    report.rewrapped_this_run = this_run.0;
    report.complete = complete;
    fill(&mut report, &st, t0);
    Ok(report)
}

fn fill(report: &mut SourceReport, st: &SourceProgress, t0: Instant) {
    report.rewrapped = st.rewrapped;
    report.skipped_changed = st.skipped_changed;
    report.failed = st.failed;
    report.failures = st.failures.clone();
    report.took_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
}

fn log_progress(p: &Progress<'_>) {
    let secs = p.elapsed.as_secs_f64().max(0.001);
    tracing::info!(
        key = p.key,
        source = p.source,
        done = p.done,
        total = p.total,
        rewrapped = p.rewrapped,
        skipped_changed = p.skipped_changed,
        failed = p.failed,
        rows_per_sec = (p.done as f64 / secs).round() as u64,
        "rewrap progress"
    );
}

/// The producer task: aborted when the consumer stops early, joined when it ends.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Waits for the task; a panic in it is an error (its end would otherwise look like the
    /// end of the table).
    async fn join(&mut self) -> Result<(), RewrapError> {
        match self.0.take() {
            None => Ok(()),
            Some(h) => h.await.map_err(|e| {
                RewrapError::Vault(VaultError::BadResponse {
                    path: "rewrap".into(),
                    reason: format!("the page reader failed: {e}"),
                })
            }),
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// What the producer works on.
struct Job {
    db: Arc<Db>,
    vault: Vault,
    mount: String,
    name: KeyName,
    source_id: String,
    table: String,
    target: u32,
    opts: RewrapOptions,
    has_context: bool,
}

/// Reads pages in key order, sends them to Vault (up to `concurrency` at once, paced to the
/// rate limit) and hands them on in order. Stops at the end of the table, on the first error
/// (after sending it), or when the consumer hangs up.
async fn produce(job: Job, after: Option<Pk>, tx: mpsc::Sender<Result<Batch, RewrapError>>) {
    let Job {
        db,
        vault,
        mount,
        name,
        source_id,
        table,
        target,
        opts,
        has_context,
    } = job;
    let start = tokio::time::Instant::now();
    let mut dispatched: u64 = 0;
    let pages = futures::stream::unfold((after, false), |(after, ended)| {
        let db = db.clone();
        let (source_id, table) = (source_id.clone(), table.clone());
        async move {
            if ended {
                return None;
            }
            // Spawned, so the query always runs to completion. Awaited in place, it would be
            // polled only when `buffered` below has room; meanwhile tokio-postgres could not
            // hand over its answer, and the consumer's write on the same connection, queued
            // behind it, would never finish: a deadlock (seen in the SIGKILL test).
            let page = tokio::spawn(async move {
                db.page_below(after.as_ref(), target, opts.batch_size).await
            })
            .await
            .unwrap_or_else(|e| {
                Err(SourceError::Query {
                    source_id,
                    table,
                    reason: format!("the page reader failed: {e}"),
                })
            });
            match page {
                Ok(rows) if rows.is_empty() => None,
                Ok(rows) => {
                    let next = rows.last().map(|r| r.pk.clone());
                    // A short page is the end of the table (as of this read).
                    let ended = rows.len() < opts.batch_size;
                    Some((Ok(rows), (next, ended)))
                }
                Err(e) => Some((Err(RewrapError::from(e)), (None, true))),
            }
        }
    });
    let paced = pages.then(|page| {
        let wait = match (&page, opts.max_rows_per_sec) {
            (Ok(rows), Some(rate)) => {
                let due = start + Duration::from_secs_f64(dispatched as f64 / f64::from(rate));
                dispatched += rows.len() as u64;
                Some(due)
            }
            _ => None,
        };
        async move {
            if let Some(due) = wait {
                tokio::time::sleep_until(due).await;
            }
            page
        }
    });
    let rewrapped = paced
        .map(|page| {
            let vault = vault.clone();
            let mount = mount.clone();
            let name = name.clone();
            // Spawned, so Vault calls proceed while the consumer writes earlier pages.
            let task = tokio::spawn(async move {
                let rows = page?;
                rewrap_page(&vault, &mount, &name, has_context, rows).await
            });
            async move {
                task.await.unwrap_or_else(|e| {
                    Err(RewrapError::Vault(VaultError::BadResponse {
                        path: "rewrap".into(),
                        reason: format!("rewrap task failed: {e}"),
                    }))
                })
            }
        })
        .buffered(opts.concurrency);
    futures::pin_mut!(rewrapped);
    while let Some(b) = rewrapped.next().await {
        let stop = b.is_err();
        if tx.send(b).await.is_err() || stop {
            return;
        }
    }
}

/// Rewraps one page. Rows whose context cannot be sent are failed here, so a batch never mixes
/// items with and without a context (Vault refuses such a batch as a whole).
async fn rewrap_page(
    vault: &Vault,
    mount: &str,
    name: &KeyName,
    has_context: bool,
    rows: Vec<Row>,
) -> Result<Batch, RewrapError> {
    let mut results: Vec<Option<Result<String, String>>> = vec![None; rows.len()];
    let mut items = Vec::with_capacity(rows.len());
    let mut index = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let context = match (&r.context, has_context) {
            (Err(reason), _) => {
                results[i] = Some(Err(reason.clone()));
                continue;
            }
            (Ok(Some(c)), true) if !c.is_empty() => Some(c.clone()),
            (Ok(_), true) => {
                results[i] = Some(Err(
                    "the context column is NULL or empty; a derived key needs the row's context"
                        .into(),
                ));
                continue;
            }
            (Ok(_), false) => None,
        };
        items.push(RewrapItem {
            ciphertext: r.ciphertext.clone(),
            context,
        });
        index.push(i);
    }
    // Vault takes at most MAX_BATCH items a request; a page's requests go out together.
    let answers = futures::future::try_join_all(
        items
            .chunks(MAX_BATCH)
            .map(|chunk| vault.rewrap_batch(mount, name, chunk)),
    )
    .await?;
    for (i, a) in index.into_iter().zip(answers.into_iter().flatten()) {
        results[i] = Some(a);
    }
    Ok(Batch {
        rows,
        results: results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err("no answer".into())))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_bounded() {
        assert!(RewrapOptions::new(200, 4, None).is_ok());
        assert!(RewrapOptions::new(MAX_BATCH_SIZE, 4, None).is_ok());
        assert!(RewrapOptions::new(0, 4, None).is_err());
        assert!(RewrapOptions::new(MAX_BATCH_SIZE + 1, 4, None).is_err());
        assert!(RewrapOptions::new(10, 0, None).is_err());
        assert!(RewrapOptions::new(10, MAX_CONCURRENCY + 1, None).is_err());
        assert!(RewrapOptions::new(10, 1, Some(0)).is_err());
        assert!(RewrapOptions::new(10, 1, Some(MAX_ROWS_PER_SEC + 1)).is_err());
    }

    #[test]
    fn failure_reasons_are_bounded_and_sampled() {
        let mut st = SourceProgress::default();
        for i in 0..(MAX_FAILURE_REASONS as i64 + 5) {
            st.fail(&format!("reason {i}"), &Pk::Int(i));
        }
        for i in 0..10 {
            st.fail("reason 0", &Pk::Int(100 + i));
        }
        assert_eq!(st.failed, MAX_FAILURE_REASONS as u64 + 15);
        assert_eq!(st.failures.len(), MAX_FAILURE_REASONS + 1);
        assert_eq!(st.failures[OTHER_REASONS].rows, 5);
        assert_eq!(st.failures["reason 0"].rows, 11);
        assert_eq!(st.failures["reason 0"].sample_keys.len(), MAX_SAMPLE_KEYS);
    }

    #[test]
    fn fingerprints_are_short_stable_and_distinct() {
        let a = fingerprint("vault:v3:abc");
        assert_eq!(a.len(), FINGERPRINT_HEX);
        assert_eq!(a, fingerprint("vault:v3:abc"));
        assert_ne!(a, fingerprint("vault:v3:abd"));
    }

    #[test]
    fn checkpoint_round_trips_through_json() {
        let mut c = Checkpoint {
            target_version: 3,
            started_at: Timestamp::from_second(1).unwrap(),
            updated_at: Timestamp::from_second(2).unwrap(),
            finished_at: None,
            runs: 1,
            sources: BTreeMap::new(),
        };
        c.sources.insert(
            "t.c".into(),
            SourceProgress {
                after: Some(Pk::Text("42".into())),
                inflight: Some(Inflight {
                    rows: vec![(Pk::Int(7), "00ff".into())],
                }),
                ..Default::default()
            },
        );
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["sources"]["t.c"]["after"], "42");
        assert_eq!(serde_json::from_value::<Checkpoint>(v).unwrap(), c);
    }

    fn strings(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::String(_) => 1,
            serde_json::Value::Array(a) => a.iter().map(strings).sum(),
            serde_json::Value::Object(o) => o.len() + o.values().map(strings).sum::<usize>(),
            _ => 0,
        }
    }

    /// OpenBao refuses a KV write with more than ~1,000 JSON strings: a checkpoint holding the
    /// largest page in flight, with every failure reason sampled, stays far below.
    #[test]
    fn a_full_checkpoint_stays_within_openbaos_json_limits() {
        let mut st = SourceProgress {
            after: Some(Pk::Text("x".repeat(40))),
            inflight: Some(Inflight {
                rows: (0..MAX_BATCH_SIZE as i64)
                    .map(|i| (Pk::Text(format!("{i:040}")), fingerprint(&i.to_string())))
                    .collect(),
            }),
            ..Default::default()
        };
        for i in 0..(MAX_FAILURE_REASONS * MAX_SAMPLE_KEYS * 2) {
            st.fail(
                &format!("reason {}", i % (MAX_FAILURE_REASONS + 3)),
                &Pk::Text(format!("k{i}")),
            );
        }
        let c = Checkpoint {
            target_version: 3,
            started_at: Timestamp::from_second(1).unwrap(),
            updated_at: Timestamp::from_second(2).unwrap(),
            finished_at: None,
            runs: 1,
            sources: BTreeMap::from([("a".to_string(), st.clone()), ("b".to_string(), st)]),
        };
        let v = serde_json::to_value(&c).unwrap();
        let n = strings(&serde_json::json!({ "data": v }));
        assert!(n < 600, "{n} strings");
        assert_eq!(serde_json::from_value::<Checkpoint>(v).unwrap(), c);
    }
}
