//! The executor: turns plans into Vault writes, one key at a time under that key's lock, and
//! reports what happened as events.
//!
//! Per key it is a small reconcile loop (see kube-runtime's controller): take the lock, read
//! state fresh, plan, carry out the *first* action, read again, report what Vault shows changed,
//! plan again — until nothing is left. So:
//! - every decision is made on a read taken after the previous write (nothing is retired or
//!   trimmed on a state that a write since may have changed);
//! - the events and `apply -o json` list what the re-read shows happened, with Vault's own
//!   versions, whatever the write's answer was: a 500, a timeout or a reset can hide an applied
//!   write, which is then reported once and never repeated; a write Vault did not apply is
//!   decided again from the fresh read;
//! - the lock is fenced (renewed by check-and-set) before every write, and a lost lock stops the
//!   key before it writes again.
//!
//! Each key's outcome is a value ([`KeyOutcome`]), handed to the caller as soon as the key is
//! done (so the audit log gets it even if a later key hangs or the process is killed).

use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::watch;
use tracing::Instrument;

use crate::changes::{changes, Change};
use crate::events::{Event, EventKind};
use crate::lock::{self, KeyLock, LockError};
use crate::observe::{observe, observe_all};
use crate::planner::{plan_key, Action, KeyPlan};
use crate::policy::{KeyPolicy, Policy, StateSettings};
use crate::state::{KeyView, Observation};
use crate::store::{outcome_unknown, stamp_missing, stamp_now, update_record};
use crate::vault::transit::NewKey;
use crate::vault::{Vault, VaultError};
use crate::{KeyName, KeyType};

/// Unclear answers (5xx, timeout, broken connection) one key may get in a run: that many to
/// reads, and as many to writes. After an unclear write keyroll reads again and decides again.
pub const MAX_ATTEMPTS: u32 = 3;
/// Actions one key may take in a run. A key needs at most a handful (record, rotate, retire,
/// record, dispose); more means the state keeps changing under keyroll, so it stops and says so.
pub const MAX_STEPS: u32 = 12;
/// Pause before reading again after an unclear answer (colliding writes in OpenBao clear up in
/// moments); doubles per unclear answer up to [`MAX_RETRY_PAUSE`], plus up to half again of
/// jitter.
pub const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(100);
pub const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Waits before the `n`th re-read (n ≥ 1) after unclear answers.
async fn retry_pause(n: u32) {
    use rand::Rng;
    let base = FIRST_RETRY_PAUSE
        .saturating_mul(1u32 << n.saturating_sub(1).min(5))
        .min(MAX_RETRY_PAUSE);
    let jitter = rand::rng().random_range(0..=base.as_millis() as u64 / 2);
    tokio::time::sleep(base + Duration::from_millis(jitter)).await;
}

/// Why a key could not be handled: the class decides the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// Vault unreachable, sealed, or timing out.
    Unavailable,
    /// The token lacks a capability.
    Denied,
    /// Anything else (bad answer, missing key, lock busy or lost).
    Other,
}

impl FailureClass {
    pub fn of(e: &VaultError) -> Self {
        if e.is_unavailable() {
            FailureClass::Unavailable
        } else if matches!(e, VaultError::PermissionDenied { .. }) {
            FailureClass::Denied
        } else {
            FailureClass::Other
        }
    }

    pub fn of_lock(e: &LockError) -> Self {
        e.vault_error().map_or(FailureClass::Other, Self::of)
    }
}

/// One action carried out (or, in a dry run, planned), as `apply -o json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Done {
    #[serde(flatten)]
    pub action: Action,
    /// The version Vault shows afterwards: the new latest (create, rotate) or the new minimum
    /// (retire: `min_decryption_version`, dispose: `min_available_version`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Vault's error answer to the write, when the re-read showed it applied anyway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered: Option<String>,
}

impl Done {
    fn planned(action: Action) -> Self {
        Done {
            action,
            version: None,
            answered: None,
        }
    }
}

/// What happened to one key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyOutcome {
    pub key: String,
    pub mount: String,
    /// Actions carried out (or, in a dry run, that would be).
    pub actions: Vec<Done>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureClass>,
    /// Whether the key was skipped because shutdown was requested.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Events for the audit log and notifiers, in the order they happened.
    #[serde(skip)]
    pub events: Vec<Event>,
}

impl KeyOutcome {
    fn new(mount: &str, name: &KeyName) -> Self {
        KeyOutcome {
            key: name.to_string(),
            mount: mount.to_string(),
            actions: Vec::new(),
            drift: Vec::new(),
            error: None,
            failure: None,
            skipped: false,
            events: Vec::new(),
        }
    }

    fn event(&mut self, run_id: &str, kind: EventKind, now: Timestamp, msg: String) -> &mut Event {
        self.events
            .push(Event::new(run_id, kind, now, msg).for_key(&self.mount, &self.key));
        self.events.last_mut().expect("just pushed")
    }

    /// Marks the key failed (one `failed` event).
    fn fail(&mut self, run_id: &str, now: Timestamp, class: FailureClass, msg: String) {
        self.event(run_id, EventKind::Failed, now, msg.clone());
        self.error = Some(msg);
        self.failure = Some(class);
    }
}

/// The result of one `apply`.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub run_id: String,
    pub dry_run: bool,
    pub keys: Vec<KeyOutcome>,
}

impl ApplyReport {
    pub fn failures(&self) -> impl Iterator<Item = &KeyOutcome> {
        self.keys.iter().filter(|k| k.error.is_some())
    }
    pub fn has_drift(&self) -> bool {
        self.keys.iter().any(|k| !k.drift.is_empty())
    }
    /// Every key's events, in key order.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.keys.iter().flat_map(|k| k.events.iter())
    }
}

/// Options for one apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    pub dry_run: bool,
    pub holder: String,
    /// How long to wait for another process's lock on a key.
    pub lock_wait: Duration,
    pub run_id: String,
}

impl ApplyOptions {
    /// Options for a run of `policy`: a fresh holder id and run id, and a lock wait long enough
    /// for a crashed holder's lock to expire (`lock_ttl` + [`lock::LOCK_WAIT_MARGIN`]).
    pub fn for_policy(policy: &Policy, dry_run: bool) -> Self {
        ApplyOptions {
            dry_run,
            holder: lock::holder_id(),
            lock_wait: policy
                .state
                .lock_ttl
                .std()
                .saturating_add(lock::LOCK_WAIT_MARGIN),
            run_id: crate::events::new_run_id(),
        }
    }
}

/// Source of "now"; a function so tests and `--at` can pin it.
pub type Clock = dyn Fn() -> Timestamp + Send + Sync;

/// Plans every key from one fresh concurrent read (what `plan` and `apply --dry-run` show).
pub async fn plan_all<'p>(
    vault: &Vault,
    policy: &'p Policy,
    now: Timestamp,
) -> Vec<(&'p KeyPolicy, Result<(Observation, KeyPlan), VaultError>)> {
    let obs = observe_all(vault, &policy.state, &policy.keys, policy.run.concurrency).await;
    policy
        .keys
        .iter()
        .zip(obs)
        .map(|(k, o)| {
            let r = o.map(|o| {
                let p = plan_key(k, &o, now);
                (o, p)
            });
            (k, r)
        })
        .collect()
}

/// What the executor needs for every key of a run.
struct Ctx<'a> {
    vault: &'a Vault,
    state: &'a StateSettings,
    opts: &'a ApplyOptions,
    clock: &'a Clock,
}

impl Ctx<'_> {
    fn now(&self) -> Timestamp {
        (self.clock)()
    }
    fn run_id(&self) -> &str {
        &self.opts.run_id
    }
}

/// Applies the policy: reads everything concurrently, then handles each key that has work,
/// `run.concurrency` keys at a time, each under its own lock. Stops starting new keys once
/// `shutdown` turns true (the key in progress finishes). `on_key` gets each key's outcome as
/// soon as it is known (in policy order), e.g. to append its events to the audit log.
pub async fn apply(
    vault: &Vault,
    policy: &Policy,
    opts: &ApplyOptions,
    clock: &Clock,
    shutdown: &watch::Receiver<bool>,
    on_key: &mut dyn FnMut(&KeyOutcome),
) -> ApplyReport {
    let ctx = Ctx {
        vault,
        state: &policy.state,
        opts,
        clock,
    };
    let planned = plan_all(vault, policy, clock()).await;
    let ctx = &ctx;
    let work = planned
        .into_iter()
        .map(|(k, r)| async move { key_work(ctx, k, r, shutdown).await });
    let mut outcomes = futures::stream::iter(work).buffered(policy.run.concurrency.max(1));
    let mut keys = Vec::with_capacity(policy.keys.len());
    while let Some(o) = outcomes.next().await {
        on_key(&o);
        keys.push(o);
    }
    ApplyReport {
        run_id: opts.run_id.clone(),
        dry_run: opts.dry_run,
        keys,
    }
}

/// One key of a run, from its planning read.
async fn key_work(
    ctx: &Ctx<'_>,
    k: &KeyPolicy,
    planned: Result<(Observation, KeyPlan), VaultError>,
    shutdown: &watch::Receiver<bool>,
) -> KeyOutcome {
    let mut out = KeyOutcome::new(&k.mount, &k.name);
    match planned {
        Err(e) => out.fail(ctx.run_id(), ctx.now(), FailureClass::of(&e), e.to_string()),
        Ok((_, plan)) if !plan.drift.is_empty() => {
            if !ctx.opts.dry_run {
                out.event(
                    ctx.run_id(),
                    EventKind::Drift,
                    ctx.now(),
                    plan.drift.join("; "),
                );
            }
            out.drift = plan.drift;
        }
        Ok((_, plan)) if plan.actions.is_empty() => {}
        Ok((_, plan)) if ctx.opts.dry_run => {
            out.actions = plan.actions.into_iter().map(Done::planned).collect()
        }
        Ok(_) if *shutdown.borrow() => out.skipped = true,
        Ok(_) => {
            let span = tracing::info_span!("key", key = %k.name, mount = %k.mount);
            out = converge_key(ctx, k).instrument(span).await;
        }
    }
    out
}

/// Which key the reconcile loop works on.
#[derive(Clone, Copy)]
struct Target<'a> {
    mount: &'a str,
    name: &'a KeyName,
}

impl Target<'_> {
    fn path(&self) -> String {
        format!("{}/keys/{}", self.mount, self.name)
    }
}

/// What to do next, given a fresh read.
enum Decision {
    /// Nothing left to do.
    Done,
    /// Vault disagrees with the policy: leave the key alone.
    Drift(Vec<String>),
    Act(Action),
}

/// Why a key's loop stopped early.
enum Stop {
    Vault(VaultError),
    Lock(LockError),
}

impl From<VaultError> for Stop {
    fn from(e: VaultError) -> Self {
        Stop::Vault(e)
    }
}

impl From<LockError> for Stop {
    fn from(e: LockError) -> Self {
        Stop::Lock(e)
    }
}

/// A Vault write whose effect the next read settles.
struct Pending {
    action: Action,
    before: Observation,
    /// Vault's answer when it was an error that may hide an applied write.
    answer: Option<VaultError>,
}

/// What a key's loop has done so far in this run.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// A new version appeared (created or rotated): one per key per run, however overdue.
    new_version: bool,
}

/// The policy planner's next action for a key, given what this run already did.
fn next_action(k: &KeyPolicy, obs: &Observation, now: Timestamp, done: Progress) -> Decision {
    let plan = plan_key(k, obs, now);
    if !plan.drift.is_empty() {
        return Decision::Drift(plan.drift);
    }
    plan.actions
        .into_iter()
        .find(|a| !(done.new_version && matches!(a, Action::Rotate { .. })))
        .map_or(Decision::Done, Decision::Act)
}

/// Lock, then reconcile the key with the policy's planner; release.
async fn converge_key(ctx: &Ctx<'_>, k: &KeyPolicy) -> KeyOutcome {
    let target = Target {
        mount: &k.mount,
        name: &k.name,
    };
    let mut decide =
        |obs: &Observation, now: Timestamp, done: Progress| Ok(next_action(k, obs, now, done));
    let wants_record =
        |key: &crate::vault::transit::TransitKey| crate::observe::needs_record(k, key);
    locked(ctx, target, &wants_record, &mut decide).await
}

type Decide<'d> = dyn FnMut(&Observation, Timestamp, Progress) -> Result<Decision, VaultError> + 'd;
type WantsRecord<'w> = dyn Fn(&crate::vault::transit::TransitKey) -> bool + Sync + 'w;

/// Takes the key's lock, runs the reconcile loop, releases the lock (unless it was lost).
async fn locked(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    wants_record: &WantsRecord<'_>,
    decide: &mut Decide<'_>,
) -> KeyOutcome {
    let mut out = KeyOutcome::new(t.mount, t.name);
    let acquired = lock::acquire(
        ctx.vault,
        ctx.state,
        t.mount,
        t.name,
        &ctx.opts.holder,
        ctx.opts.lock_wait,
    )
    .await;
    let mut held = match acquired {
        Ok(l) => l,
        Err(e) => {
            out.fail(
                ctx.run_id(),
                ctx.now(),
                FailureClass::of_lock(&e),
                e.to_string(),
            );
            return out;
        }
    };
    match reconcile(ctx, t, &mut held, wants_record, decide, &mut out).await {
        Ok(()) => held.release().await,
        Err(Stop::Lock(e)) => {
            let lost = matches!(e, LockError::Lost { .. });
            out.fail(
                ctx.run_id(),
                ctx.now(),
                FailureClass::of_lock(&e),
                e.to_string(),
            );
            if !lost {
                held.release().await;
            }
        }
        Err(Stop::Vault(e)) => {
            out.fail(ctx.run_id(), ctx.now(), FailureClass::of(&e), e.to_string());
            held.release().await;
        }
    }
    out
}

/// Read, settle the previous write, decide, fence, write — until done. See the module docs.
async fn reconcile(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    wants_record: &WantsRecord<'_>,
    decide: &mut Decide<'_>,
    out: &mut KeyOutcome,
) -> Result<(), Stop> {
    let (mut read_failures, mut write_failures, mut steps) = (0u32, 0u32, 0u32);
    let mut pending: Option<Pending> = None;
    let mut progress = Progress::default();
    loop {
        let obs = match observe(ctx.vault, ctx.state, (t.mount, t.name), wants_record).await {
            Ok(o) => o,
            Err(e) if outcome_unknown(&e) && read_failures + 1 < MAX_ATTEMPTS => {
                read_failures += 1;
                tracing::warn!(error = %e, "unclear answer to a read; reading again");
                retry_pause(read_failures + write_failures).await;
                continue;
            }
            Err(e) => {
                if let Some(p) = pending.take() {
                    return Err(settle_unseen(ctx, t, held, p, out, e).await);
                }
                return Err(e.into());
            }
        };
        if let Some(p) = pending.take() {
            let unclear = p.answer.is_some();
            match settle(ctx, t, held, p, &obs, out).await? {
                Settled::NotApplied if unclear => write_failures += 1,
                Settled::NotApplied => {}
                Settled::Applied {
                    new_version,
                    recorded,
                } => {
                    progress.new_version |= new_version;
                    if recorded {
                        // The read predates the record write: decide on a fresh one.
                        continue;
                    }
                }
            }
        }
        if write_failures >= MAX_ATTEMPTS {
            return Err(VaultError::BadResponse {
                path: t.path(),
                reason: format!(
                    "{MAX_ATTEMPTS} writes got unclear answers and Vault shows none applied; \
                     giving up on this key for this run"
                ),
            }
            .into());
        }
        let action = match decide(&obs, ctx.now(), progress)? {
            Decision::Done => return Ok(()),
            Decision::Drift(d) => {
                out.event(ctx.run_id(), EventKind::Drift, ctx.now(), d.join("; "));
                out.drift = d;
                return Ok(());
            }
            Decision::Act(a) => a,
        };
        steps += 1;
        if steps > MAX_STEPS {
            return Err(VaultError::BadResponse {
                path: t.path(),
                reason: format!(
                    "still not converged after {MAX_STEPS} actions; is someone else changing \
                     the key?"
                ),
            }
            .into());
        }
        match perform(ctx, t, held, &action).await {
            Ok(Performed::Vault) => {
                pending = Some(Pending {
                    action,
                    before: obs,
                    answer: None,
                })
            }
            Ok(Performed::Recorded(msg)) => {
                out.event(ctx.run_id(), EventKind::Recorded, ctx.now(), msg);
                out.actions.push(Done::planned(action));
            }
            Err(Stop::Vault(e)) if outcome_unknown(&e) && action.changes_vault_key() => {
                tracing::warn!(error = %e, action = action.verb(), "unclear answer to a write; reading again before deciding");
                retry_pause(read_failures + write_failures + 1).await;
                pending = Some(Pending {
                    action,
                    before: obs,
                    answer: Some(e),
                });
            }
            Err(stop) => return Err(stop),
        }
    }
}

/// What a step did.
enum Performed {
    /// A Vault write was answered with success; the next read settles what it changed.
    Vault,
    /// keyroll's record was updated (bookkeeping); the message for the `recorded` event.
    Recorded(String),
}

/// Carries out one action: one small function per action, each fencing the lock before it
/// writes.
async fn perform(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    action: &Action,
) -> Result<Performed, Stop> {
    match action {
        Action::Create {
            key_type,
            exportable,
            key_size,
            ..
        } => create(ctx, t, held, *key_type, *exportable, *key_size).await,
        Action::Rotate { .. } => rotate(ctx, t, held).await,
        Action::Retire {
            min_decryption_version,
            raise_min_encryption_version,
            ..
        } => {
            retire(
                ctx,
                t,
                held,
                *min_decryption_version,
                *raise_min_encryption_version,
            )
            .await
        }
        Action::Dispose {
            min_available_version,
            raise_min_encryption_version,
            ..
        } => {
            dispose(
                ctx,
                t,
                held,
                *min_available_version,
                *raise_min_encryption_version,
            )
            .await
        }
        Action::RecordCreated { versions, reason } => {
            record_created(ctx, t, held, versions, reason).await
        }
        Action::RecordRetired { versions, reason } => {
            record_retired(ctx, t, held, versions, reason).await
        }
        Action::ForgetRetired { versions, reason } => {
            forget_retired(ctx, t, held, versions, reason).await
        }
    }
}

async fn create(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    key_type: KeyType,
    exportable: bool,
    key_size: Option<u32>,
) -> Result<Performed, Stop> {
    held.fence().await?;
    let spec = NewKey {
        key_type: key_type.as_str(),
        exportable,
        key_size,
    };
    ctx.vault.create_key(t.mount, t.name, &spec).await?;
    Ok(Performed::Vault)
}

async fn rotate(ctx: &Ctx<'_>, t: Target<'_>, held: &mut KeyLock) -> Result<Performed, Stop> {
    held.fence().await?;
    ctx.vault.rotate_key(t.mount, t.name).await?;
    Ok(Performed::Vault)
}

async fn retire(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    to: u32,
    raise_enc: Option<u32>,
) -> Result<Performed, Stop> {
    held.fence().await?;
    ctx.vault
        .configure_key(t.mount, t.name, Some(to), raise_enc)
        .await?;
    Ok(Performed::Vault)
}

/// Trim, after raising `min_encryption_version` where Vault requires it (two writes, each
/// fenced; if the second fails, the next read shows the first and the plan skips it).
async fn dispose(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    to: u32,
    raise_enc: Option<u32>,
) -> Result<Performed, Stop> {
    if let Some(enc) = raise_enc {
        held.fence().await?;
        ctx.vault
            .configure_key(t.mount, t.name, None, Some(enc))
            .await?;
    }
    held.fence().await?;
    ctx.vault.trim_key(t.mount, t.name, to).await?;
    Ok(Performed::Vault)
}

async fn record_created(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    versions: &[u32],
    reason: &str,
) -> Result<Performed, Stop> {
    let now = ctx.now();
    held.fence().await?;
    update_record(ctx.vault, ctx.state, (t.mount, t.name), |r| {
        stamp_missing(&mut r.created, versions.iter().copied(), now)
    })
    .await?;
    Ok(Performed::Recorded(format!(
        "creation time of {versions:?}: {reason}"
    )))
}

async fn record_retired(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    versions: &[u32],
    reason: &str,
) -> Result<Performed, Stop> {
    let now = ctx.now();
    held.fence().await?;
    update_record(ctx.vault, ctx.state, (t.mount, t.name), |r| {
        stamp_missing(&mut r.retired, versions.iter().copied(), now)
    })
    .await?;
    Ok(Performed::Recorded(format!(
        "retirement of {versions:?}: {reason}"
    )))
}

async fn forget_retired(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    versions: &[u32],
    reason: &str,
) -> Result<Performed, Stop> {
    held.fence().await?;
    update_record(ctx.vault, ctx.state, (t.mount, t.name), |r| {
        let before = r.retired.len();
        r.retired.retain(|v, _| !versions.contains(v));
        r.retired.len() != before
    })
    .await?;
    Ok(Performed::Recorded(format!(
        "forgot the retirement time of {versions:?}: {reason}"
    )))
}

/// What the read after a write showed.
enum Settled {
    /// Nothing changed: the write was not applied.
    NotApplied,
    /// Changes were reported; whether one was a new version, and whether keyroll's record
    /// was written (so the read that showed them no longer holds the record).
    Applied { new_version: bool, recorded: bool },
}

/// Reports what the read after a write shows changed (events, `Done` entries) and records the
/// times Vault does not keep. A write answered with success that changed nothing is an error
/// (Vault and keyroll disagree about the key).
async fn settle(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    p: Pending,
    after: &Observation,
    out: &mut KeyOutcome,
) -> Result<Settled, Stop> {
    let seen = changes(&p.before, after);
    if seen.is_empty() {
        return match &p.answer {
            None => Err(VaultError::BadResponse {
                path: t.path(),
                reason: format!(
                    "Vault accepted the {} but the key shows no change",
                    p.action.verb()
                ),
            }
            .into()),
            Some(e) => {
                tracing::warn!(error = %e, action = p.action.verb(), "Vault shows the write was not applied; deciding again");
                Ok(Settled::NotApplied)
            }
        };
    }
    let now = ctx.now();
    for c in &seen {
        let (kind, action, reason) = describe(*c, &p.action, after);
        let msg = match &p.answer {
            None => reason,
            Some(e) => format!("{reason} (Vault answered \"{e}\" but shows it applied)"),
        };
        if let Some(e) = &p.answer {
            tracing::warn!(error = %e, change = ?c, "a write Vault answered with an error was applied");
        }
        tracing::info!(action = c.verb(), version = c.version(), "{msg}");
        out.event(ctx.run_id(), kind, now, msg).version = Some(c.version());
        if let Some(action) = action {
            out.actions.push(Done {
                action,
                version: Some(c.version()),
                answered: p.answer.as_ref().map(ToString::to_string),
            });
        }
    }
    let recorded = record_changes(ctx, t, held, &seen, after, now).await?;
    Ok(Settled::Applied {
        new_version: seen
            .iter()
            .any(|c| matches!(c, Change::Created { .. } | Change::Rotated { .. })),
        recorded,
    })
}

/// The event kind, the `Done` action and the message for one change. The planned action's
/// reason when the change is what it meant to do; otherwise the change as Vault shows it.
fn describe(
    c: Change,
    planned: &Action,
    after: &Observation,
) -> (EventKind, Option<Action>, String) {
    let kind = match c {
        Change::Created { .. } => EventKind::Created,
        Change::Rotated { .. } => EventKind::Rotated,
        Change::Retired { .. } => EventKind::Retired,
        Change::Disposed { .. } => EventKind::Disposed,
    };
    if c.verb() == planned.verb() {
        return (kind, Some(planned.clone()), planned.reason().to_string());
    }
    let reason = match c {
        Change::Created { latest } => format!("the key appeared (v{latest})"),
        Change::Rotated { from, to } => format!("v{from} → v{to}"),
        Change::Retired { from, to } => format!("versions below v{to} retired (were from v{from})"),
        Change::Disposed { from, to } => {
            format!("versions below v{to} trimmed (were from v{from})")
        }
    };
    let reason = format!("seen in Vault after {}: {reason}", planned.verb());
    let action = match (c, after) {
        (Change::Created { .. }, Observation::Present { key, .. }) => KeyType::parse(&key.key_type)
            .map(|key_type| Action::Create {
                key_type,
                exportable: key.exportable,
                key_size: None,
                reason: reason.clone(),
            }),
        (Change::Rotated { from, .. }, _) => Some(Action::Rotate {
            from_version: from,
            reason: reason.clone(),
        }),
        (Change::Retired { from, to }, _) => Some(Action::Retire {
            previous: from,
            min_decryption_version: to,
            raise_min_encryption_version: None,
            reason: reason.clone(),
        }),
        (Change::Disposed { from, to }, _) => Some(Action::Dispose {
            previous: from,
            min_available_version: to,
            raise_min_encryption_version: None,
            reason: reason.clone(),
        }),
        _ => None,
    };
    (kind, action, reason)
}

/// Records, for changes Vault just showed, the times it does not keep: creation of hmac
/// versions, retirement (replacing any earlier time: a version retired again restarts
/// `dispose_after`), and drops times of trimmed versions. One record write, fenced. Returns
/// whether it wrote.
async fn record_changes(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    seen: &[Change],
    after: &Observation,
    now: Timestamp,
) -> Result<bool, Stop> {
    let hmac = matches!(after, Observation::Present { key, .. } if key.key_type == "hmac");
    let relevant = seen
        .iter()
        .any(|c| hmac || matches!(c, Change::Retired { .. } | Change::Disposed { .. }));
    if !relevant {
        return Ok(false);
    }
    held.fence().await?;
    let wrote = update_record(ctx.vault, ctx.state, (t.mount, t.name), |r| {
        let mut changed = false;
        for c in seen {
            changed |= match *c {
                Change::Created { latest } if hmac => {
                    stamp_missing(&mut r.created, 1..=latest, now)
                }
                Change::Rotated { from, to } if hmac => {
                    stamp_missing(&mut r.created, from.saturating_add(1)..=to, now)
                }
                Change::Retired { from, to } => stamp_now(&mut r.retired, from..to, now),
                Change::Disposed { to, .. } => {
                    let n = r.created.len() + r.retired.len();
                    r.created.retain(|v, _| *v >= to);
                    r.retired.retain(|v, _| *v >= to);
                    n != r.created.len() + r.retired.len()
                }
                _ => false,
            };
        }
        changed
    })
    .await?;
    Ok(wrote)
}

/// The read after a write failed for good. A write Vault answered with success did happen:
/// report it (a retire or dispose with the version it set; a rotate without a number, which
/// only the read would give) and record a retirement's time. A write with an unclear answer
/// may or may not have happened: say so in the key's error.
async fn settle_unseen(
    ctx: &Ctx<'_>,
    t: Target<'_>,
    held: &mut KeyLock,
    p: Pending,
    out: &mut KeyOutcome,
    read_error: VaultError,
) -> Stop {
    if let Some(e) = &p.answer {
        return VaultError::BadResponse {
            path: t.path(),
            reason: format!(
                "the {} may have been applied (Vault answered \"{e}\") and the key cannot be \
                 read to find out: {read_error}; the next run re-reads it",
                p.action.verb()
            ),
        }
        .into();
    }
    let now = ctx.now();
    let (kind, version, change) = match &p.action {
        Action::Create { .. } => (EventKind::Created, Some(1), None),
        Action::Rotate { .. } => (EventKind::Rotated, None, None),
        Action::Retire {
            min_decryption_version: to,
            ..
        } => (
            EventKind::Retired,
            Some(*to),
            match &p.before {
                Observation::Present { key, .. } => Some(Change::Retired {
                    from: key.min_usable(),
                    to: *to,
                }),
                Observation::Missing => None,
            },
        ),
        Action::Dispose {
            min_available_version: to,
            ..
        } => (EventKind::Disposed, Some(*to), None),
        _ => return read_error.into(),
    };
    let msg = format!(
        "{} (Vault accepted it; the key could not be read back{})",
        p.action.reason(),
        if version.is_none() {
            " for the new version number"
        } else {
            ""
        }
    );
    let ev = out.event(ctx.run_id(), kind, now, msg);
    ev.version = version;
    out.actions.push(Done {
        action: p.action.clone(),
        version,
        answered: None,
    });
    if let Some(c) = change {
        let after = p.before.clone();
        if let Err(Stop::Vault(e)) = record_changes(ctx, t, held, &[c], &after, now).await {
            tracing::warn!(error = %e, "could not record the retirement time; the next run records it");
        }
    }
    read_error.into()
}

/// On-demand rotation (`keyroll rotate KEY`), optionally retiring every earlier version at once
/// (suspected compromise), under the key's lock with the same read–write–read loop as `apply`.
/// The key must exist; nothing is created. Disposal then follows the policy's `dispose_after`.
pub async fn rotate_now(
    vault: &Vault,
    state: &StateSettings,
    (mount, name): (&str, &KeyName),
    retire_previous: bool,
    opts: &ApplyOptions,
    clock: &Clock,
) -> KeyOutcome {
    let ctx = Ctx {
        vault,
        state,
        opts,
        clock,
    };
    let target = Target { mount, name };
    let mut start: Option<u32> = None;
    let mut decide = |obs: &Observation, _now: Timestamp, _done: Progress| {
        let Observation::Present { key, .. } = obs else {
            return Err(VaultError::NotFound {
                path: format!("{mount}/keys/{name}"),
                message: "key does not exist; nothing was changed (create it with `keyroll apply`)"
                    .into(),
            });
        };
        Ok(on_demand(
            *start.get_or_insert(key.latest_version),
            key,
            retire_previous,
        ))
    };
    locked(&ctx, target, &|_| false, &mut decide).await
}

/// The next step of an on-demand rotation that started at `start`: rotate once, then (with
/// `--retire-previous`) retire everything below the new latest.
fn on_demand(
    start: u32,
    key: &crate::vault::transit::TransitKey,
    retire_previous: bool,
) -> Decision {
    let latest = key.latest_version;
    if latest == start {
        return Decision::Act(Action::Rotate {
            from_version: start,
            reason: format!("on demand: v{start} → a new version"),
        });
    }
    if retire_previous && key.min_usable() < latest {
        return Decision::Act(Action::Retire {
            previous: key.min_decryption_version,
            min_decryption_version: latest,
            raise_min_encryption_version: (key.min_encryption_version != 0
                && key.min_encryption_version < latest)
                .then_some(latest),
            reason: format!(
                "on demand (--retire-previous): v{}–v{} no longer usable",
                key.min_usable(),
                latest - 1
            ),
        });
    }
    Decision::Done
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::duration::Span;
    use crate::policy::Retention;
    use crate::state::KeyRecord;
    use crate::vault::transit::TransitKey;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn key(latest: u32, min_dec: u32) -> TransitKey {
        TransitKey {
            name: "k".into(),
            key_type: "aes256-gcm96".into(),
            exportable: false,
            deletion_allowed: false,
            latest_version: latest,
            min_decryption_version: min_dec,
            min_encryption_version: 0,
            min_available_version: 0,
            versions: (min_dec.max(1)..=latest).map(|v| (v, t(0))).collect(),
            public_keys: BTreeMap::new(),
        }
    }

    fn policy() -> KeyPolicy {
        KeyPolicy {
            name: KeyName::new("k").unwrap(),
            mount: "transit".into(),
            key_type: KeyType::Aes256Gcm96,
            exportable: false,
            key_size: None,
            rotate_every: Span::from_secs(10),
            retention: Retention {
                keep_versions: Some(1),
                ..Default::default()
            },
            line: 1,
        }
    }

    fn verb(d: Decision) -> &'static str {
        match d {
            Decision::Done => "done",
            Decision::Drift(_) => "drift",
            Decision::Act(a) => a.verb(),
        }
    }

    #[test]
    fn one_new_version_per_key_per_run_however_overdue() {
        // Every version is "old" at t(1000): the planner would rotate again after each rotation.
        let obs = Observation::present(key(1, 1), KeyRecord::default());
        let fresh = Progress::default();
        assert_eq!(verb(next_action(&policy(), &obs, t(1000), fresh)), "rotate");
        let rotated = Progress { new_version: true };
        let obs = Observation::present(key(2, 1), KeyRecord::default());
        // After the run's rotation: retire what it superseded, but no second rotation.
        assert_eq!(
            verb(next_action(&policy(), &obs, t(1000), rotated)),
            "retire"
        );
        let obs = Observation::present(key(2, 2), KeyRecord::default());
        assert_eq!(verb(next_action(&policy(), &obs, t(1000), rotated)), "done");
    }

    #[test]
    fn on_demand_rotates_once_then_retires_everything_below() {
        assert_eq!(verb(on_demand(3, &key(3, 1), true)), "rotate");
        assert_eq!(verb(on_demand(3, &key(4, 1), false)), "done");
        match on_demand(3, &key(4, 1), true) {
            Decision::Act(Action::Retire {
                min_decryption_version,
                ..
            }) => assert_eq!(min_decryption_version, 4),
            _ => panic!("expected a retire"),
        }
        assert_eq!(verb(on_demand(3, &key(4, 4), true)), "done");
    }

    #[test]
    fn a_change_vault_shows_is_reported_with_the_planned_reason_or_as_seen() {
        let planned = Action::Rotate {
            from_version: 1,
            reason: "v1 is 91d old".into(),
        };
        let after = Observation::present(key(2, 1), KeyRecord::default());
        let (kind, action, reason) = describe(Change::Rotated { from: 1, to: 2 }, &planned, &after);
        assert_eq!(kind, EventKind::Rotated);
        assert_eq!(action, Some(planned.clone()));
        assert_eq!(reason, "v1 is 91d old");
        let (kind, action, reason) = describe(Change::Retired { from: 1, to: 2 }, &planned, &after);
        assert_eq!(kind, EventKind::Retired);
        assert!(matches!(
            action,
            Some(Action::Retire {
                min_decryption_version: 2,
                ..
            })
        ));
        assert!(reason.starts_with("seen in Vault after rotate"), "{reason}");
    }
}
