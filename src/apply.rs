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
//!
//! This module holds the run (reading and planning every key, handing out outcomes) and the
//! report types; `reconcile` the per-key loop, `actions` one small function per action,
//! `settle` what a write changed, `guard` the holds (a data key's census) every plan is made
//! under, blocked-step events and `rewrap_before_retire`.

mod actions;
pub mod dns;
mod guard;
mod reconcile;
mod settle;

pub use guard::{holds_for, read_guard, read_guards, DnsGuard, Guards, KeyData};

use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::watch;
use tracing::Instrument;

use reconcile::{locked, Decision, Progress, Target};

use crate::events::{Event, EventKind};
use crate::holds::rewrap_could_help;
use crate::lock::{self, LockError};
use crate::observe::observe_all;
use crate::planner::{plan_key_held, Action, Blocked, Holds, KeyPlan};
use crate::policy::{KeyPolicy, Policy, StateSettings};
use crate::state::{KeyView, Observation};
use crate::vault::{Vault, VaultError};
use crate::KeyName;

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
    /// Retire/dispose steps that holds stopped (as of the key's last plan in this run).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<Blocked>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureClass>,
    /// Whether the key was skipped because shutdown was requested.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// The key's DNS step (keys with `[keys.dns]` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<dns::DnsOutcome>,
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
            blocked: Vec::new(),
            error: None,
            failure: None,
            skipped: false,
            dns: None,
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
    /// Keys whose DNS step failed (exit 5).
    pub fn dns_failures(&self) -> impl Iterator<Item = &KeyOutcome> {
        self.keys
            .iter()
            .filter(|k| k.dns.as_ref().is_some_and(|d| d.error.is_some()))
    }
    pub fn has_drift(&self) -> bool {
        self.keys.iter().any(|k| !k.drift.is_empty())
    }
    pub fn has_blocked(&self) -> bool {
        self.keys.iter().any(|k| !k.blocked.is_empty())
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
    let mut out = Vec::with_capacity(policy.keys.len());
    for (k, o) in policy.keys.iter().zip(obs) {
        let r = match o {
            Err(e) => Err(e),
            // Keys with data sources also need their latest census (one KV read each).
            Ok(o) => {
                match read_guards(vault, &policy.state, k, KeyData::of(policy, k), now).await {
                    Err(e) => Err(e),
                    Ok(g) => {
                        let holds = holds_for(&g, &o, now);
                        let p = plan_key_held(k, &o, &holds, now);
                        Ok((o, p))
                    }
                }
            }
        };
        out.push((k, r));
    }
    out
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
    // Every write checks the clocks anyway; checking once up front stops a skewed pass before
    // it reads (and locks) every key only to be refused at each first write.
    if !opts.dry_run {
        if let Err(e) = vault.check_clock().await {
            let keys = policy
                .keys
                .iter()
                .map(|k| {
                    let mut out = KeyOutcome::new(&k.mount, &k.name);
                    out.fail(&opts.run_id, clock(), FailureClass::of(&e), e.to_string());
                    on_key(&out);
                    out
                })
                .collect();
            return ApplyReport {
                run_id: opts.run_id.clone(),
                dry_run: opts.dry_run,
                keys,
            };
        }
    }
    let planned = plan_all(vault, policy, clock()).await;
    let ctx = &ctx;
    let work = planned.into_iter().map(|(k, r)| async move {
        let out = key_work(ctx, k, KeyData::of(policy, k), r, shutdown).await;
        dns::after_vault(ctx, policy, k, out).await
    });
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
    data: KeyData<'_>,
    planned: Result<(Observation, KeyPlan), VaultError>,
    shutdown: &watch::Receiver<bool>,
) -> KeyOutcome {
    let mut out = KeyOutcome::new(&k.mount, &k.name);
    // `rewrap_before_retire`: a due step that only data holds stop is worth a rewrap.
    let auto_rewrap = |p: &KeyPlan| {
        data.settings.rewrap_before_retire
            && !data.sources.is_empty()
            && rewrap_could_help(&p.blocked)
    };
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
        Ok((_, plan)) if ctx.opts.dry_run => {
            out.actions = plan.actions.into_iter().map(Done::planned).collect();
            out.blocked = plan.blocked;
        }
        Ok((_, plan)) if plan.actions.is_empty() && !auto_rewrap(&plan) => {
            out.blocked = plan.blocked;
            guard::blocked_events(&mut out, ctx.run_id(), ctx.now());
        }
        Ok(_) if *shutdown.borrow() => out.skipped = true,
        Ok((_, plan)) => {
            let span = tracing::info_span!("key", key = %k.name, mount = %k.mount);
            out = guarded_converge(ctx, k, data, auto_rewrap(&plan), shutdown)
                .instrument(span)
                .await;
        }
    }
    out
}

/// Reconciles a key under its holds, after `rewrap_before_retire` when `rewrap` is set. A
/// failed rewrap is the key's failure (exit 1, a `failed` event) and suspends every data hold's
/// release for this run: nothing is retired or trimmed, other steps (rotation) still happen.
async fn guarded_converge(
    ctx: &Ctx<'_>,
    k: &KeyPolicy,
    data: KeyData<'_>,
    rewrap: bool,
    shutdown: &watch::Receiver<bool>,
) -> KeyOutcome {
    let mut pre = KeyOutcome::new(&k.mount, &k.name);
    let mut suspended = None;
    if rewrap {
        match guard::rewrap_before_retire(ctx, k, data.sources, shutdown).await {
            Ok(msg) => {
                tracing::info!("{msg}");
                pre.event(ctx.run_id(), EventKind::Rewrapped, ctx.now(), msg);
            }
            Err(why) => {
                tracing::error!(error = %why, "rewrap_before_retire failed");
                pre.fail(
                    ctx.run_id(),
                    ctx.now(),
                    FailureClass::Other,
                    format!("rewrap_before_retire: {why}"),
                );
                suspended = Some(format!(
                    "rewrap_before_retire failed ({why}); nothing is retired or trimmed until \
                     a rewrap succeeds"
                ));
            }
        }
    }
    let guards = match read_guards(ctx.vault, ctx.state, k, data, ctx.now()).await {
        Ok(mut g) => {
            if let Some(d) = g.data.as_mut() {
                d.suspended = suspended;
            }
            g
        }
        Err(e) => {
            pre.fail(ctx.run_id(), ctx.now(), FailureClass::of(&e), e.to_string());
            return pre;
        }
    };
    let mut out = converge_key(ctx, k, &guards).await;
    guard::blocked_events(&mut out, ctx.run_id(), ctx.now());
    pre.events.append(&mut out.events);
    out.events = pre.events;
    if out.error.is_none() {
        out.error = pre.error;
        out.failure = pre.failure;
    }
    out
}

/// The policy planner's next action for a key under `holds`, given what this run already did,
/// and the steps the holds block.
fn next_action(
    k: &KeyPolicy,
    obs: &Observation,
    holds: &Holds,
    now: Timestamp,
    done: Progress,
) -> (Decision, Vec<Blocked>) {
    let plan = plan_key_held(k, obs, holds, now);
    if !plan.drift.is_empty() {
        return (Decision::Drift(plan.drift), Vec::new());
    }
    let d = plan
        .actions
        .into_iter()
        .find(|a| !(done.new_version && matches!(a, Action::Rotate { .. })))
        .map_or(Decision::Done, Decision::Act);
    (d, plan.blocked)
}

/// Lock, then reconcile the key with the policy's planner under its holds (recomputed from
/// every fresh read); release. The outcome's `blocked` is the last plan's.
async fn converge_key(ctx: &Ctx<'_>, k: &KeyPolicy, guards: &Guards<'_>) -> KeyOutcome {
    let target = Target {
        mount: &k.mount,
        name: &k.name,
    };
    let mut blocked = Vec::new();
    let mut decide = |obs: &Observation, now: Timestamp, done: Progress| {
        let holds = holds_for(guards, obs, now);
        let (d, b) = next_action(k, obs, &holds, now, done);
        blocked = b;
        Ok(d)
    };
    let wants_record =
        |key: &crate::vault::transit::TransitKey| crate::observe::needs_record(k, key);
    let mut out = locked(ctx, target, &wants_record, &mut decide).await;
    out.blocked = blocked;
    out
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
    use crate::KeyType;

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
        assert_eq!(
            verb(next_action(&policy(), &obs, &Holds::default(), t(1000), fresh).0),
            "rotate"
        );
        let rotated = Progress { new_version: true };
        let obs = Observation::present(key(2, 1), KeyRecord::default());
        // After the run's rotation: retire what it superseded, but no second rotation.
        assert_eq!(
            verb(next_action(&policy(), &obs, &Holds::default(), t(1000), rotated).0),
            "retire"
        );
        let obs = Observation::present(key(2, 2), KeyRecord::default());
        assert_eq!(
            verb(next_action(&policy(), &obs, &Holds::default(), t(1000), rotated).0),
            "done"
        );
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
}
