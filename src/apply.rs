//! The executor: turns plans into Vault writes, one key at a time under that key's lock, and
//! reports what happened as events.
//!
//! Per key it is a small reconcile loop (see kube-runtime's controller): take the lock, read
//! state fresh, plan, act; after any ambiguous failure (5xx, timeout) read again and re-plan
//! rather than retrying the same write, because a "failed" rotate may have been applied.

use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::watch;
use tracing::Instrument;

use crate::events::{Event, EventKind};
use crate::lock::{self, LockError};
use crate::observe::{observe_all, observe_key, read_record, write_record};
use crate::planner::{plan_key, Action, KeyPlan};
use crate::policy::{KeyPolicy, Policy, StateSettings};
use crate::state::Observation;
use crate::vault::transit::NewKey;
use crate::vault::{Vault, VaultError};
use crate::KeyName;

/// How many times one key is re-read and re-planned after ambiguous failures.
pub const MAX_ATTEMPTS: u32 = 3;

/// Why a key could not be handled: the class decides the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// Vault unreachable, sealed, or timing out.
    Unavailable,
    /// The token lacks a capability.
    Denied,
    /// Anything else (bad answer, missing key, lock busy).
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
}

/// What happened to one key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyOutcome {
    pub key: String,
    pub mount: String,
    /// Actions carried out (or, in a dry run, that would be).
    pub actions: Vec<Action>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureClass>,
    /// Whether the key was skipped because shutdown was requested.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// The result of one `apply`.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub run_id: String,
    pub dry_run: bool,
    pub keys: Vec<KeyOutcome>,
    #[serde(skip)]
    pub events: Vec<Event>,
}

impl ApplyReport {
    pub fn failures(&self) -> impl Iterator<Item = &KeyOutcome> {
        self.keys.iter().filter(|k| k.error.is_some())
    }
    pub fn has_drift(&self) -> bool {
        self.keys.iter().any(|k| !k.drift.is_empty())
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

/// Source of "now"; a function so tests and `--at` can pin it.
pub type Clock = dyn Fn() -> Timestamp + Send + Sync;

/// Plans every key from one fresh concurrent read (what `plan` and `apply --dry-run` show).
pub async fn plan_all(
    vault: &Vault,
    policy: &Policy,
    now: Timestamp,
) -> Vec<(KeyPolicy, Result<(Observation, KeyPlan), VaultError>)> {
    let obs = observe_all(vault, &policy.state, &policy.keys, policy.run.concurrency).await;
    policy
        .keys
        .iter()
        .cloned()
        .zip(obs)
        .map(|(k, o)| {
            let r = o.map(|o| {
                let p = plan_key(&k, &o, now);
                (o, p)
            });
            (k, r)
        })
        .collect()
}

/// Applies the policy: reads everything concurrently, then handles each key that has work,
/// `run.concurrency` keys at a time, each under its own lock. Stops starting new keys once
/// `shutdown` turns true (the key in progress finishes).
pub async fn apply(
    vault: &Vault,
    policy: &Policy,
    opts: &ApplyOptions,
    clock: &Clock,
    shutdown: &watch::Receiver<bool>,
) -> ApplyReport {
    let planned = plan_all(vault, policy, clock()).await;
    let work = planned.into_iter().map(|(k, r)| async move {
        let mut out = KeyOutcome {
            key: k.name.to_string(),
            mount: k.mount.clone(),
            actions: Vec::new(),
            drift: Vec::new(),
            error: None,
            failure: None,
            skipped: false,
        };
        let mut events = Vec::new();
        match r {
            Err(e) => fail(&mut out, &mut events, opts, clock(), &e),
            Ok((_, plan)) if !plan.drift.is_empty() => {
                out.drift = plan.drift;
                if !opts.dry_run {
                    events.push(
                        Event::new(
                            &opts.run_id,
                            EventKind::Drift,
                            clock(),
                            out.drift.join("; "),
                        )
                        .for_key(&k.mount, k.name.as_str()),
                    );
                }
            }
            Ok((_, plan)) if plan.actions.is_empty() => {}
            Ok((_, plan)) if opts.dry_run => out.actions = plan.actions,
            Ok(_) if *shutdown.borrow() => out.skipped = true,
            Ok(_) => {
                let span = tracing::info_span!("key", key = %k.name, mount = %k.mount);
                converge_key(vault, policy, &k, opts, clock, &mut out, &mut events)
                    .instrument(span)
                    .await
            }
        }
        (out, events)
    });
    let results: Vec<(KeyOutcome, Vec<Event>)> = futures::stream::iter(work)
        .buffered(policy.run.concurrency.max(1))
        .collect()
        .await;
    let mut report = ApplyReport {
        run_id: opts.run_id.clone(),
        dry_run: opts.dry_run,
        keys: Vec::with_capacity(results.len()),
        events: Vec::new(),
    };
    for (o, ev) in results {
        report.keys.push(o);
        report.events.extend(ev);
    }
    report
}

fn fail(
    out: &mut KeyOutcome,
    events: &mut Vec<Event>,
    opts: &ApplyOptions,
    now: Timestamp,
    e: &VaultError,
) {
    out.error = Some(e.to_string());
    out.failure = Some(FailureClass::of(e));
    events.push(
        Event::new(&opts.run_id, EventKind::Failed, now, e.to_string())
            .for_key(&out.mount, &out.key),
    );
}

/// Lock, re-read, re-plan, act; repeat after ambiguous failures.
async fn converge_key(
    vault: &Vault,
    policy: &Policy,
    k: &KeyPolicy,
    opts: &ApplyOptions,
    clock: &Clock,
    out: &mut KeyOutcome,
    events: &mut Vec<Event>,
) {
    let held = match lock::acquire(
        vault,
        &policy.state,
        &k.mount,
        &k.name,
        &opts.holder,
        opts.lock_wait,
    )
    .await
    {
        Ok(l) => l,
        Err(LockError::Vault { source, .. }) => return fail(out, events, opts, clock(), &source),
        Err(e @ LockError::Busy { .. }) => {
            out.error = Some(e.to_string());
            out.failure = Some(FailureClass::Other);
            events.push(
                Event::new(&opts.run_id, EventKind::Failed, clock(), e.to_string())
                    .for_key(&k.mount, k.name.as_str()),
            );
            return;
        }
    };
    for attempt in 1..=MAX_ATTEMPTS {
        let obs = match observe_key(vault, &policy.state, k).await {
            Ok(o) => o,
            Err(e) if e.is_ambiguous() && attempt < MAX_ATTEMPTS => continue,
            Err(e) => {
                fail(out, events, opts, clock(), &e);
                break;
            }
        };
        let plan = plan_key(k, &obs, clock());
        if !plan.drift.is_empty() {
            out.drift = plan.drift;
            break;
        }
        match execute(vault, policy, k, &plan.actions, opts, clock, out, events).await {
            Ok(()) => break,
            Err(e) if e.is_ambiguous() && attempt < MAX_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "ambiguous failure; re-reading state before deciding again");
            }
            Err(e) => {
                fail(out, events, opts, clock(), &e);
                break;
            }
        }
    }
    held.release().await;
}

#[allow(clippy::too_many_arguments)]
async fn execute(
    vault: &Vault,
    policy: &Policy,
    k: &KeyPolicy,
    actions: &[Action],
    opts: &ApplyOptions,
    clock: &Clock,
    out: &mut KeyOutcome,
    events: &mut Vec<Event>,
) -> Result<(), VaultError> {
    let (m, n) = (k.mount.as_str(), &k.name);
    let ev = |kind, msg: &str| Event::new(&opts.run_id, kind, clock(), msg).for_key(m, n.as_str());
    for a in actions {
        match a {
            Action::Create {
                key_type,
                exportable,
                key_size,
                reason,
            } => {
                vault
                    .create_key(
                        m,
                        n,
                        &NewKey {
                            key_type: key_type.as_str(),
                            exportable: *exportable,
                            key_size: *key_size,
                        },
                    )
                    .await?;
                tracing::info!(action = "create", reason = %reason, "key created");
                events.push(ev(EventKind::Created, reason).version(1));
                if *key_type == crate::KeyType::Hmac {
                    record(
                        vault,
                        &policy.state,
                        (m, n),
                        |r, now| {
                            r.created.insert(1, now);
                        },
                        clock,
                    )
                    .await?;
                }
            }
            Action::RecordCreated { versions, reason } => {
                record(
                    vault,
                    &policy.state,
                    (m, n),
                    |r, now| stamp(&mut r.created, versions.iter().copied(), now),
                    clock,
                )
                .await?;
                events.push(ev(
                    EventKind::Recorded,
                    &format!("creation time of {versions:?}: {reason}"),
                ));
            }
            Action::Rotate {
                from_version,
                reason,
            } => {
                vault.rotate_key(m, n).await?;
                let latest = vault
                    .read_key(m, n)
                    .await?
                    .map(|k| k.latest_version)
                    .unwrap_or(from_version + 1);
                tracing::info!(action = "rotate", from = from_version, to = latest, reason = %reason, "key rotated");
                events.push(ev(EventKind::Rotated, reason).version(latest));
                if k.key_type == crate::KeyType::Hmac {
                    record(
                        vault,
                        &policy.state,
                        (m, n),
                        |r, now| {
                            r.created.insert(latest, now);
                        },
                        clock,
                    )
                    .await?;
                }
            }
            Action::Retire {
                previous,
                min_decryption_version: to,
                raise_min_encryption_version,
                reason,
            } => {
                vault
                    .configure_key(m, n, Some(*to), *raise_min_encryption_version)
                    .await?;
                tracing::info!(action = "retire", from = previous, to, reason = %reason, "versions retired");
                events.push(ev(EventKind::Retired, reason).version(*to));
                let from = (*previous).max(1);
                record(
                    vault,
                    &policy.state,
                    (m, n),
                    |r, now| stamp(&mut r.retired, from..*to, now),
                    clock,
                )
                .await?;
            }
            Action::RecordRetired { versions, reason } => {
                record(
                    vault,
                    &policy.state,
                    (m, n),
                    |r, now| stamp(&mut r.retired, versions.iter().copied(), now),
                    clock,
                )
                .await?;
                events.push(ev(
                    EventKind::Recorded,
                    &format!("retirement of {versions:?}: {reason}"),
                ));
            }
            Action::Dispose {
                previous,
                min_available_version: to,
                raise_min_encryption_version,
                reason,
            } => {
                if let Some(enc) = raise_min_encryption_version {
                    vault.configure_key(m, n, None, Some(*enc)).await?;
                }
                vault.trim_key(m, n, *to).await?;
                tracing::info!(action = "dispose", from = previous, to, reason = %reason, "versions trimmed");
                events.push(ev(EventKind::Disposed, reason).version(*to));
                record(
                    vault,
                    &policy.state,
                    (m, n),
                    |r, _| {
                        r.created.retain(|v, _| v >= to);
                        r.retired.retain(|v, _| v >= to);
                    },
                    clock,
                )
                .await?;
            }
        }
        out.actions.push(a.clone());
    }
    Ok(())
}

/// Records `now` for each version that has no time yet (first record wins: times only ever
/// make disposal and rotation later, never earlier).
fn stamp(
    times: &mut std::collections::BTreeMap<u32, Timestamp>,
    versions: impl IntoIterator<Item = u32>,
    now: Timestamp,
) {
    for v in versions {
        times.entry(v).or_insert(now);
    }
}

/// Read-modify-write of keyroll's record for `k` (we hold the key's lock).
async fn record(
    vault: &Vault,
    state: &StateSettings,
    (mount, name): (&str, &KeyName),
    change: impl FnOnce(&mut crate::state::KeyRecord, Timestamp),
    clock: &Clock,
) -> Result<(), VaultError> {
    let (mut rec, version) = read_record(vault, state, mount, name).await?;
    change(&mut rec, clock());
    write_record(vault, state, mount, name, &rec, version)
        .await
        .map(drop)
}

/// On-demand rotation (`keyroll rotate KEY`), optionally retiring every earlier version at once
/// (suspected compromise). The key must exist; nothing is created.
pub async fn rotate_now(
    vault: &Vault,
    state: &StateSettings,
    (m, n): (&str, &KeyName),
    retire_previous: bool,
    opts: &ApplyOptions,
    clock: &Clock,
) -> Result<(u32, Vec<Event>), RotateError> {
    let held = lock::acquire(vault, state, m, n, &opts.holder, opts.lock_wait)
        .await
        .map_err(RotateError::Lock)?;
    let result = async {
        let before = vault
            .read_key(m, n)
            .await?
            .ok_or_else(|| VaultError::NotFound {
                path: format!("{m}/keys/{n}"),
                message: "key does not exist; nothing was changed (create it with `keyroll apply`)"
                    .into(),
            })?;
        let mut events = Vec::new();
        let ev =
            |kind, msg: String| Event::new(&opts.run_id, kind, clock(), msg).for_key(m, n.as_str());
        // An ambiguous failure may still have rotated: re-read instead of rotating twice.
        match vault.rotate_key(m, n).await {
            Ok(()) => {}
            Err(e) if e.is_ambiguous() => {
                tracing::warn!(error = %e, "ambiguous failure on rotate; re-reading");
            }
            Err(e) => return Err(e),
        }
        let after = vault
            .read_key(m, n)
            .await?
            .ok_or_else(|| VaultError::NotFound {
                path: format!("{m}/keys/{n}"),
                message: "key vanished during rotation".into(),
            })?;
        if after.latest_version <= before.latest_version {
            return Err(VaultError::BadResponse {
                path: format!("{m}/keys/{n}/rotate"),
                reason: "Vault accepted the rotation but latest_version did not advance".into(),
            });
        }
        let latest = after.latest_version;
        events.push(
            ev(
                EventKind::Rotated,
                format!("on demand: v{} → v{latest}", before.latest_version),
            )
            .version(latest),
        );
        if after.key_type == "hmac" {
            record(
                vault,
                state,
                (m, n),
                |r, now| {
                    r.created.insert(latest, now);
                },
                clock,
            )
            .await?;
        }
        if retire_previous && after.min_decryption_version < latest {
            let enc = (after.min_encryption_version != 0).then_some(latest);
            vault.configure_key(m, n, Some(latest), enc).await?;
            let from = after.min_decryption_version.max(1);
            events.push(
                ev(
                    EventKind::Retired,
                    format!(
                        "on demand (--retire-previous): v{from}–v{} no longer usable",
                        latest - 1
                    ),
                )
                .version(latest),
            );
            record(
                vault,
                state,
                (m, n),
                |r, now| stamp(&mut r.retired, from..latest, now),
                clock,
            )
            .await?;
        }
        Ok((latest, events))
    }
    .await;
    held.release().await;
    result.map_err(RotateError::Vault)
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Lock(LockError),
    #[error(transparent)]
    Vault(VaultError),
}
