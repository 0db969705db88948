//! The DNS step of a run, for each key with `[keys.dns]`, after its Vault actions: read the
//! transit key, keyroll's record and the sidecars' signing reports; ask the servers about the
//! key's selector records; plan with the pure `dns::plan_dns`; carry out the writes (RFC 2136
//! compare-and-swap UPDATEs, or the zone-file target's `$INCLUDE` file + reload); record each
//! step in the key's KV record, under the key's lock.
//!
//! A DNS failure (REFUSED, NOTAUTH/BADKEY, timeout, reload failed, a primary that cannot be
//! asked) is a `dns_failed` event and the key's [`DnsOutcome::error`] (exit 5); it never stops
//! the run's other keys nor undoes the key's Vault work. The first failed write ends this key's
//! DNS step for the run (later steps may depend on it); the next run starts again from what
//! the servers answer. `plan`, `status` and `apply --dry-run` use [`preview`]: the same reads
//! and queries, no writes.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::Serialize;

use super::{Ctx, KeyOutcome};
use crate::dns::config::{DnsTarget, KeyDns, TargetKind, ZoneFileTarget};
use crate::dns::lifecycle::{
    owners_to_check, plan_dns, DnsAction, DnsPlan, DnsState, KeyFacts, OwnerObservation, Stage,
};
use crate::dns::observe::observe;
use crate::dns::query::{check_servers, AuthServer};
use crate::dns::{zonefile, DnsError, Rfc2136Client};
use crate::events::EventKind;
use crate::lock;
use crate::policy::{KeyPolicy, Policy, StateSettings};
use crate::signing::{read_reports, signing_version};
use crate::state::KeyRecord;
use crate::store::{read_record, update_record};
use crate::vault::transit::TransitKey;
use crate::vault::Vault;

/// One version's record as keyroll last recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionStage {
    pub version: u32,
    pub owner: String,
    pub stage: Stage,
}

/// A key's DNS step: what its records look like, what was done (or, in a preview, would be),
/// and what went wrong.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DnsOutcome {
    pub target: String,
    /// The version the mailer signs with, from fresh sidecar reports (`None`: no report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing: Option<u32>,
    /// Each version's stage after the step (in a preview: before it).
    pub versions: Vec<VersionStage>,
    /// Steps carried out (apply) or planned (plan, status, dry run).
    pub actions: Vec<DnsAction>,
    /// Things a person should look at; nothing is done about them (exit 3).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Why the step failed (exit 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DnsOutcome {
    /// Versions the plan would publish first appear as `unpublished`.
    fn add_unpublished(&mut self) {
        for a in &self.actions {
            if !self.versions.iter().any(|v| v.version == a.version()) {
                self.versions.push(VersionStage {
                    version: a.version(),
                    owner: a.owner().to_string(),
                    stage: Stage::Unpublished,
                });
            }
        }
        self.versions.sort_by_key(|v| v.version);
    }

    fn new(target: &str) -> Self {
        DnsOutcome {
            target: target.to_string(),
            ..Default::default()
        }
    }

    fn stages(&mut self, state: &DnsState) {
        self.versions = state
            .versions
            .iter()
            .map(|(v, r)| VersionStage {
                version: *v,
                owner: r.owner.clone(),
                stage: r.stage(),
            })
            .collect();
    }
}

/// The event a carried-out action is reported as.
fn event_kind(a: &DnsAction) -> EventKind {
    match a {
        DnsAction::Publish { .. } => EventKind::DnsPublished,
        DnsAction::Restore { .. } => EventKind::DnsRestored,
        DnsAction::Confirm { .. } => EventKind::DnsConfirmed,
        DnsAction::MarkSigning { .. } => EventKind::DnsSigning,
        DnsAction::NoteRetired { .. } => EventKind::Recorded,
        DnsAction::Revoke { .. } => EventKind::DnsRevoked,
        DnsAction::Remove { .. } => EventKind::DnsRemoved,
    }
}

/// Everything the planner needs about one key, read fresh.
struct Inputs {
    facts: KeyFacts,
    state: DnsState,
    observed: BTreeMap<u32, OwnerObservation>,
    /// Problems found while reading (unreadable reports, an unreadable secondary).
    problems: Vec<String>,
}

/// How keyroll writes to a target.
enum Writer<'t> {
    Rfc2136(Rfc2136Client),
    ZoneFile(&'t ZoneFileTarget),
}

impl<'t> Writer<'t> {
    fn new(target: &'t DnsTarget) -> Result<Self, DnsError> {
        Ok(match &target.kind {
            TargetKind::Rfc2136(spec) => Writer::Rfc2136(Rfc2136Client::new(target, spec)?),
            TargetKind::ZoneFile(z) => Writer::ZoneFile(z),
        })
    }
}

/// The sidecars' view of which version signs (an unreadable report directory is a problem,
/// not a failure: keyroll then knows no more than without sidecars).
async fn signing(
    vault: &Vault,
    state: &StateSettings,
    k: &KeyPolicy,
    kd: &KeyDns,
    now: Timestamp,
    problems: &mut Vec<String>,
) -> Option<u32> {
    match read_reports(vault, state, &k.mount, k.name.as_str()).await {
        Ok(r) => signing_version(&r, now, kd.signing_report_max_age.std()),
        Err(e) => {
            problems.push(format!(
                "cannot read the sidecars' signing reports ({e}); treating the signing version \
                 as unknown"
            ));
            None
        }
    }
}

/// Reads and asks everything the plan needs. `Err` is a DNS failure (exit 5).
async fn gather(
    vault: &Vault,
    policy_state: &StateSettings,
    (k, kd, target, writer): (&KeyPolicy, &KeyDns, &DnsTarget, &Writer<'_>),
    key: &TransitKey,
    record: &KeyRecord,
    now: Timestamp,
) -> Result<Inputs, String> {
    let mut problems = Vec::new();
    let signing = signing(vault, policy_state, k, kd, now, &mut problems).await;
    let facts = KeyFacts::from_transit(key, &record.retired, signing).map_err(|e| e.to_string())?;
    let state = record.dns.clone();
    let checks = owners_to_check(kd, &facts, &state);
    let servers: Vec<AuthServer> = check_servers(target).await.map_err(|e| e.to_string())?;
    let primary = match writer {
        Writer::Rfc2136(c) => Some(c.primary().await.map_err(|e| e.to_string())?),
        Writer::ZoneFile(_) => None,
    };
    let observed = observe(
        primary.as_ref(),
        &servers,
        &target.zone,
        &checks,
        target.timeout,
    )
    .await;
    // The primary is where keyroll writes: if it cannot be asked, nothing reliable can be
    // planned (a secondary that cannot be asked only delays confirmation, a problem).
    if let Some(e) = observed.values().find_map(|o| match &o.primary {
        Some(Err(e)) => Some(e.clone()),
        _ => None,
    }) {
        return Err(format!("cannot ask the primary: {e}"));
    }
    Ok(Inputs {
        facts,
        state,
        observed,
        problems,
    })
}

/// What the DNS step would do for `k`, from a read already made (`plan`, `status`, dry run):
/// the same queries as a run, no writes.
pub async fn preview(
    vault: &Vault,
    policy: &Policy,
    k: &KeyPolicy,
    key: &TransitKey,
    now: Timestamp,
) -> Option<DnsOutcome> {
    let kd = policy.key_dns(k)?;
    let target = policy.dns.targets.get(&kd.target)?;
    let mut out = DnsOutcome::new(&target.name);
    // The planning read skips keyroll's record when the Vault planner does not need it.
    let record = match read_record(vault, &policy.state, &k.mount, &k.name).await {
        Ok((r, _)) => r,
        Err(e) => {
            out.error = Some(format!("cannot read keyroll's record: {e}"));
            return Some(out);
        }
    };
    let record = &record;
    out.stages(&record.dns);
    let writer = match Writer::new(target) {
        Ok(w) => w,
        Err(e) => {
            out.error = Some(e.to_string());
            return Some(out);
        }
    };
    match gather(
        vault,
        &policy.state,
        (k, kd, target, &writer),
        key,
        record,
        now,
    )
    .await
    {
        Err(e) => out.error = Some(e),
        Ok(i) => {
            let plan = plan_dns(kd, &i.facts, &i.state, &i.observed, now);
            out.signing = i.facts.signing;
            out.actions = plan.actions;
            out.problems = i.problems;
            out.problems.extend(plan.problems);
            out.add_unpublished();
        }
    }
    Some(out)
}

/// The DNS step of `apply` for one key, after its Vault work (a no-op for keys without
/// `[keys.dns]`, skipped keys, and dry runs, which get a [`preview`]).
pub(super) async fn after_vault(
    ctx: &Ctx<'_>,
    policy: &Policy,
    k: &KeyPolicy,
    mut out: KeyOutcome,
) -> KeyOutcome {
    let Some(kd) = policy.key_dns(k) else {
        return out;
    };
    let Some(target) = policy.dns.targets.get(&kd.target) else {
        return out;
    };
    if out.skipped {
        return out;
    }
    if ctx.opts.dry_run {
        let read = async {
            let key = ctx.vault.read_key(&k.mount, &k.name).await?;
            Ok::<_, crate::vault::VaultError>(key)
        };
        out.dns = match read.await {
            Ok(Some(key)) => preview(ctx.vault, policy, k, &key, ctx.now()).await,
            Ok(None) => None,
            Err(e) => Some(DnsOutcome {
                error: Some(e.to_string()),
                ..DnsOutcome::new(&target.name)
            }),
        };
        return out;
    }
    let dns = run_locked(ctx, policy, k, kd, target, &mut out).await;
    out.dns = Some(dns);
    out
}

/// Takes the key's lock, runs the step, releases it.
async fn run_locked(
    ctx: &Ctx<'_>,
    policy: &Policy,
    k: &KeyPolicy,
    kd: &KeyDns,
    target: &DnsTarget,
    out: &mut KeyOutcome,
) -> DnsOutcome {
    // At steady state there is nothing to write: look first without the lock (two KV writes
    // saved per key and run). A zone file is always checked under the lock, since a hand edit
    // of the file shows only when it is rendered and compared.
    if matches!(target.kind, TargetKind::Rfc2136(_)) {
        if let Ok(Some(key)) = ctx.vault.read_key(&k.mount, &k.name).await {
            if let Some(p) = preview(ctx.vault, policy, k, &key, ctx.now()).await {
                if p.error.is_none() && p.actions.is_empty() {
                    return p;
                }
            }
        }
    }
    let mut dns = DnsOutcome::new(&target.name);
    let mut held = match lock::acquire(
        ctx.vault,
        ctx.state,
        &k.mount,
        &k.name,
        &ctx.opts.holder,
        ctx.opts.lock_wait,
    )
    .await
    {
        Ok(l) => l,
        Err(e) => {
            fail(
                ctx,
                out,
                &mut dns,
                format!("cannot take the key's lock: {e}"),
            );
            return dns;
        }
    };
    let lost = step(ctx, policy, (k, kd, target), &mut held, out, &mut dns).await;
    if !lost {
        held.release().await;
    }
    dns
}

fn fail(ctx: &Ctx<'_>, out: &mut KeyOutcome, dns: &mut DnsOutcome, msg: String) {
    tracing::error!(key = %out.key, error = %msg, "DNS step failed");
    out.event(ctx.run_id(), EventKind::DnsFailed, ctx.now(), msg.clone());
    dns.error = Some(msg);
}

/// The step under the lock; returns whether the lock was lost (then it is not released).
async fn step(
    ctx: &Ctx<'_>,
    policy: &Policy,
    (k, kd, target): (&KeyPolicy, &KeyDns, &DnsTarget),
    held: &mut lock::KeyLock,
    out: &mut KeyOutcome,
    dns: &mut DnsOutcome,
) -> bool {
    let read = async {
        let key = ctx.vault.read_key(&k.mount, &k.name).await?;
        let (rec, _) = read_record(ctx.vault, ctx.state, &k.mount, &k.name).await?;
        Ok::<_, crate::vault::VaultError>((key, rec))
    };
    let (key, record) = match read.await {
        Ok((Some(key), rec)) => (key, rec),
        Ok((None, rec)) => {
            // The key is missing (a Vault failure already reported it): show what is recorded.
            dns.stages(&rec.dns);
            return false;
        }
        Err(e) => {
            fail(
                ctx,
                out,
                dns,
                format!("cannot read the key for its DNS step: {e}"),
            );
            return false;
        }
    };
    dns.stages(&record.dns);
    let writer = match Writer::new(target) {
        Ok(w) => w,
        Err(e) => {
            fail(ctx, out, dns, e.to_string());
            return false;
        }
    };
    let now = ctx.now();
    let inputs = match gather(
        ctx.vault,
        &policy.state,
        (k, kd, target, &writer),
        &key,
        &record,
        now,
    )
    .await
    {
        Ok(i) => i,
        Err(e) => {
            fail(ctx, out, dns, e);
            return false;
        }
    };
    let plan = plan_dns(kd, &inputs.facts, &inputs.state, &inputs.observed, now);
    dns.signing = inputs.facts.signing;
    dns.problems = inputs.problems.clone();
    dns.problems.extend(plan.problems.iter().cloned());
    let lost = match &writer {
        Writer::Rfc2136(client) => carry_out_rfc2136(ctx, (k, client), held, &plan, out, dns).await,
        Writer::ZoneFile(z) => {
            carry_out_zonefile(ctx, (k, target, z), held, &inputs, &plan, out, dns).await
        }
    };
    // Stages as recorded now.
    if let Ok((rec, _)) = read_record(ctx.vault, ctx.state, &k.mount, &k.name).await {
        dns.stages(&rec.dns);
    }
    lost
}

/// Records `actions` in the key's record (one check-and-set write), fencing the lock first.
async fn record(
    ctx: &Ctx<'_>,
    k: &KeyPolicy,
    held: &mut lock::KeyLock,
    actions: &[DnsAction],
    now: Timestamp,
) -> Result<(), (bool, String)> {
    held.fence().await.map_err(|e| {
        (
            matches!(e, lock::LockError::Lost { .. }),
            format!("the key's lock: {e}"),
        )
    })?;
    update_record(ctx.vault, ctx.state, (&k.mount, &k.name), |rec| {
        let before = rec.dns.clone();
        for a in actions {
            rec.dns.record(a, now);
        }
        rec.dns != before
    })
    .await
    .map(drop)
    .map_err(|e| (false, format!("cannot record the DNS step in Vault: {e}")))
}

/// One action done: event, outcome entry.
fn report(
    ctx: &Ctx<'_>,
    out: &mut KeyOutcome,
    dns: &mut DnsOutcome,
    a: &DnsAction,
    now: Timestamp,
) {
    tracing::info!(key = %out.key, action = a.verb(), version = a.version(), "{}", a.reason());
    out.event(ctx.run_id(), event_kind(a), now, a.reason().to_string())
        .version = Some(a.version());
    dns.actions.push(a.clone());
}

/// RFC 2136: each write is a compare-and-swap UPDATE (nothing sent when the primary already
/// answers the wanted record), recorded right after it succeeded.
async fn carry_out_rfc2136(
    ctx: &Ctx<'_>,
    (k, client): (&KeyPolicy, &Rfc2136Client),
    held: &mut lock::KeyLock,
    plan: &DnsPlan,
    out: &mut KeyOutcome,
    dns: &mut DnsOutcome,
) -> bool {
    for a in &plan.actions {
        let now = ctx.now();
        if let Some(w) = a.write() {
            // Fence before writing to DNS too: a holder that lost the lock must not write.
            if let Err(e) = held.fence().await {
                let lost = matches!(e, lock::LockError::Lost { .. });
                fail(ctx, out, dns, format!("the key's lock: {e}"));
                return lost;
            }
            if let Err(e) = client.apply(&w).await {
                fail(ctx, out, dns, format!("{} v{}: {e}", a.verb(), a.version()));
                return false;
            }
        }
        if let Err((lost, e)) = record(ctx, k, held, std::slice::from_ref(a), now).await {
            fail(ctx, out, dns, e);
            return lost;
        }
        report(ctx, out, dns, a, now);
    }
    false
}

/// Zone file: every action is recorded in memory first, the file rendered from the result and
/// written (if changed) and reloaded; only then is the record written. A failed write or reload
/// records nothing, so the next run plans the same steps again.
async fn carry_out_zonefile(
    ctx: &Ctx<'_>,
    (k, target, z): (&KeyPolicy, &DnsTarget, &ZoneFileTarget),
    held: &mut lock::KeyLock,
    inputs: &Inputs,
    plan: &DnsPlan,
    out: &mut KeyOutcome,
    dns: &mut DnsOutcome,
) -> bool {
    let now = ctx.now();
    let mut state = inputs.state.clone();
    for a in &plan.actions {
        state.record(a, now);
    }
    let records = crate::dns::lifecycle::zone_records(&inputs.facts, &state);
    let content = zonefile::render(&target.zone, &records, target.ttl);
    if let Err(e) = held.fence().await {
        let lost = matches!(e, lock::LockError::Lost { .. });
        fail(ctx, out, dns, format!("the key's lock: {e}"));
        return lost;
    }
    let writes = plan.actions.iter().any(|a| a.write().is_some());
    match zonefile::publish(z, &content).await {
        Ok(o) if o.written && !writes => {
            // keyroll's records did not change, the file did: someone edited it.
            let msg = format!(
                "{} differed from keyroll's records for {} (edited by hand?); rewritten and \
                 reloaded",
                z.path.display(),
                k.name
            );
            tracing::warn!(key = %k.name, "{msg}");
            out.event(ctx.run_id(), EventKind::DnsRestored, now, msg);
        }
        Ok(o) if o.written => {
            tracing::info!(key = %k.name, path = %z.path.display(), "zone file written and reloaded")
        }
        Ok(_) => {}
        Err(e) => {
            fail(ctx, out, dns, e.to_string());
            return false;
        }
    }
    if plan.actions.is_empty() {
        return false;
    }
    if let Err((lost, e)) = record(ctx, k, held, &plan.actions, now).await {
        fail(ctx, out, dns, e);
        return lost;
    }
    for a in &plan.actions {
        report(ctx, out, dns, a, now);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records written before DNS publishing existed still read, and keys without DNS keep
    /// writing records without a `dns` field.
    #[test]
    fn old_records_read_and_records_without_dns_stay_as_they_were() {
        let old = r#"{"created":{},"retired":{"1":"2026-01-01T00:00:00Z"}}"#;
        let rec: KeyRecord = serde_json::from_str(old).unwrap();
        assert!(rec.dns.is_empty());
        assert_eq!(rec.retired.len(), 1);
        assert_eq!(serde_json::to_string(&rec).unwrap(), old);
    }

    #[test]
    fn every_dns_step_has_its_own_event_and_bookkeeping_is_not_notified() {
        let a = |verb: &str| -> DnsAction {
            let (version, owner, reason) = (1, "o".to_string(), String::new());
            match verb {
                "publish" => DnsAction::Publish {
                    version,
                    owner,
                    value: "v".into(),
                    reason,
                },
                "restore" => DnsAction::Restore {
                    version,
                    owner,
                    value: "v".into(),
                    found: "x".into(),
                    reason,
                },
                "confirm" => DnsAction::Confirm {
                    version,
                    owner,
                    reason,
                },
                "signing" => DnsAction::MarkSigning {
                    version,
                    owner,
                    reason,
                },
                "note" => DnsAction::NoteRetired {
                    version,
                    owner,
                    reason,
                },
                "revoke" => DnsAction::Revoke {
                    version,
                    owner,
                    value: "v".into(),
                    reason,
                },
                _ => DnsAction::Remove {
                    version,
                    owner,
                    reason,
                },
            }
        };
        let kinds: Vec<&str> = [
            "publish", "restore", "confirm", "signing", "note", "revoke", "remove",
        ]
        .iter()
        .map(|v| event_kind(&a(v)).as_str())
        .collect();
        assert_eq!(
            kinds,
            [
                "dns_published",
                "dns_restored",
                "dns_confirmed",
                "dns_signing",
                "recorded",
                "dns_revoked",
                "dns_removed"
            ]
        );
        assert!(!event_kind(&a("note")).is_notifiable());
        assert!(EventKind::DnsFailed.is_notifiable() && EventKind::DnsFailed.is_failure());
    }
}
