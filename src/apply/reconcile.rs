//! The per-key reconcile loop of the executor: read, settle what the previous write did,
//! decide, fence the lock, write — until nothing is left, a lost lock, or too many unclear
//! answers. See the parent module for the rules it keeps.

use std::time::Duration;

use jiff::Timestamp;

use super::actions::{perform, Performed};
use super::settle::{settle, settle_unseen, Settled};
use super::{
    Ctx, Done, FailureClass, KeyOutcome, FIRST_RETRY_PAUSE, MAX_ATTEMPTS, MAX_RETRY_PAUSE,
    MAX_STEPS,
};
use crate::events::EventKind;
use crate::lock::{self, KeyLock, LockError};
use crate::observe::observe;
use crate::planner::Action;
use crate::state::Observation;
use crate::store::outcome_unknown;
use crate::vault::transit::TransitKey;
use crate::vault::VaultError;
use crate::KeyName;

/// Waits before the `n`th re-read (n ≥ 1) after unclear answers.
async fn retry_pause(n: u32) {
    use rand::Rng;
    let base = FIRST_RETRY_PAUSE
        .saturating_mul(1u32 << n.saturating_sub(1).min(5))
        .min(MAX_RETRY_PAUSE);
    let jitter = rand::rng().random_range(0..=base.as_millis() as u64 / 2);
    tokio::time::sleep(base + Duration::from_millis(jitter)).await;
}

/// Which key the reconcile loop works on.
#[derive(Clone, Copy)]
pub(super) struct Target<'a> {
    pub(super) mount: &'a str,
    pub(super) name: &'a KeyName,
}

impl Target<'_> {
    pub(super) fn path(&self) -> String {
        format!("{}/keys/{}", self.mount, self.name)
    }
}

/// What to do next, given a fresh read.
pub(super) enum Decision {
    /// Nothing left to do.
    Done,
    /// Vault disagrees with the policy: leave the key alone.
    Drift(Vec<String>),
    Act(Action),
}

/// Why a key's loop stopped early.
pub(super) enum Stop {
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
pub(super) struct Pending {
    pub(super) action: Action,
    pub(super) before: Observation,
    /// Vault's answer when it was an error that may hide an applied write.
    pub(super) answer: Option<VaultError>,
}

/// What a key's loop has done so far in this run.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Progress {
    /// A new version appeared (created or rotated): one per key per run, however overdue.
    pub(super) new_version: bool,
}

pub(super) type Decide<'d> =
    dyn FnMut(&Observation, Timestamp, Progress) -> Result<Decision, VaultError> + 'd;
pub(super) type WantsRecord<'w> = dyn Fn(&TransitKey) -> bool + Sync + 'w;

/// Takes the key's lock, runs the reconcile loop, releases the lock (unless it was lost).
pub(super) async fn locked(
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
pub(super) async fn reconcile(
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
