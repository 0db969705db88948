//! Guarded retention in the executor (issue 8): reading a data key's latest census, turning it
//! into the planner's holds, reporting blocked steps as events, and `rewrap_before_retire`
//! (census → rewrap → census before the key's reconcile loop).
//!
//! The rewrap runs before the key's lock is taken: it writes only the application's rows (each
//! by compare-and-swap) and its own checkpoint (check-and-set), never the transit key, and it
//! may take far longer than a lock's TTL. The retire/trim it enables is decided afterwards
//! under the lock, on a fresh read of the key and of the census stored after the rewrap.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::{Ctx, KeyOutcome};
use crate::census::{self, CensusError};
use crate::datasource::DataSource;
use crate::dns::{check_servers, query_soa, retire_hold, DnsState, DnsTarget, KeyDns, KeyFacts};
use crate::events::EventKind;
use crate::holds::{data_holds, gather, thousands, DataGuard, DataGuardSettings, LatestCensus};
use crate::planner::{Blocked, Holds};
use crate::policy::{KeyPolicy, Policy, StateSettings};
use crate::rewrap::{self, RewrapOptions};
use crate::signing::{read_reports, signing_version};
use crate::state::Observation;
use crate::store::read_record;
use crate::vault::{Vault, VaultError};

/// A key's data sources and guard settings, from the policy (no sources: no data holds).
#[derive(Debug, Clone, Copy)]
pub struct KeyData<'p> {
    pub sources: &'p [DataSource],
    pub settings: DataGuardSettings,
    /// A DKIM key's `[keys.dns]` and its target (its retire hold waits for the successor to
    /// sign).
    pub dns: Option<(&'p KeyDns, &'p DnsTarget)>,
}

impl<'p> KeyData<'p> {
    pub fn of(policy: &'p Policy, k: &KeyPolicy) -> Self {
        KeyData {
            sources: policy.data_sources(k),
            settings: policy.data_guard(k),
            dns: policy
                .key_dns(k)
                .and_then(|kd| policy.dns.targets.get(&kd.target).map(|t| (kd, t))),
        }
    }
}

/// Negative-caching TTL assumed when no authoritative server tells the zone's SOA: three hours,
/// the longest that common resolvers cache a "no such name" (BIND's `max-ncache-ttl`, Unbound's
/// `cache-max-negative-ttl` defaults). Erring long keeps the old selector usable longer, never
/// shorter.
pub const FALLBACK_NEGATIVE_TTL: Duration = Duration::from_secs(3 * 3600);

/// What a DKIM key's retire hold needs besides Vault's key: which version the sidecars report
/// signing, the zone's negative-caching TTL and keyroll's recorded DNS stages.
#[derive(Debug, Clone)]
pub struct DnsGuard {
    pub signing: Option<u32>,
    pub negative_ttl: Duration,
    pub state: DnsState,
}

/// Everything that may hold a key's destructive steps, read once per plan.
#[derive(Debug, Default)]
pub struct Guards<'p> {
    pub data: Option<DataGuard<'p>>,
    pub dns: Option<DnsGuard>,
}

/// The data guard ([`read_guard`]) and, for a DKIM key with `[keys.dns]`, its DNS guard. DNS
/// trouble never fails the key here: unreadable reports count as "unknown", an unanswered SOA
/// as [`FALLBACK_NEGATIVE_TTL`] (the DNS step reports both).
pub async fn read_guards<'p>(
    vault: &Vault,
    state: &StateSettings,
    k: &KeyPolicy,
    data: KeyData<'p>,
    now: Timestamp,
) -> Result<Guards<'p>, VaultError> {
    let dns = match data.dns {
        None => None,
        Some((kd, target)) => Some(read_dns_guard(vault, state, k, kd, target, now).await?),
    };
    Ok(Guards {
        data: read_guard(vault, state, k, data).await?,
        dns,
    })
}

async fn read_dns_guard(
    vault: &Vault,
    state: &StateSettings,
    k: &KeyPolicy,
    kd: &KeyDns,
    target: &DnsTarget,
    now: Timestamp,
) -> Result<DnsGuard, VaultError> {
    let (record, _) = read_record(vault, state, &k.mount, &k.name).await?;
    let signing = match read_reports(vault, state, &k.mount, k.name.as_str()).await {
        Ok(r) => signing_version(&r, now, kd.signing_report_max_age.std()),
        Err(_) => None,
    };
    let mut negative_ttl: Option<Duration> = None;
    if let Ok(servers) = check_servers(target).await {
        for s in &servers {
            match query_soa(s, &target.zone, target.timeout).await {
                Ok(soa) => {
                    negative_ttl = Some(negative_ttl.unwrap_or_default().max(soa.negative_ttl()))
                }
                Err(_) => {
                    negative_ttl = None;
                    break;
                }
            }
        }
    }
    Ok(DnsGuard {
        signing,
        negative_ttl: negative_ttl.unwrap_or(FALLBACK_NEGATIVE_TTL),
        state: record.dns,
    })
}

/// The latest stored census of a data key; a record that is not a census becomes a hold's
/// reason, not an error (it must never read as "no rows left"). None for keys without sources.
pub async fn read_guard<'p>(
    vault: &Vault,
    state: &StateSettings,
    k: &KeyPolicy,
    data: KeyData<'p>,
) -> Result<Option<DataGuard<'p>>, VaultError> {
    if data.sources.is_empty() {
        return Ok(None);
    }
    let census = match census::latest(vault, state, &k.mount, k.name.as_str()).await {
        Ok(None) => LatestCensus::Missing,
        Ok(Some(c)) => LatestCensus::Taken(c),
        Err(CensusError::Vault(e)) => return Err(e),
        Err(e) => LatestCensus::Unreadable(e.to_string()),
    };
    Ok(Some(DataGuard {
        sources: data.sources,
        census,
        settings: data.settings,
        suspended: None,
    }))
}

/// The planner's holds for a key as observed now: the data holds, and a DKIM key's DNS retire
/// hold (never retire the version that signs until its successor signs; see `dns::hold`).
pub fn holds_for(guards: &Guards<'_>, obs: &Observation, now: Timestamp) -> Holds {
    let Observation::Present { key, record } = obs else {
        return Holds::default();
    };
    let data = match &guards.data {
        Some(g) => data_holds(key, record, g, now),
        None => Vec::new(),
    };
    let dns = guards.dns.as_ref().and_then(|d| {
        let facts = KeyFacts::from_transit(key, &record.retired, d.signing).ok()?;
        let ttl = SignedDuration::try_from(d.negative_ttl).unwrap_or(SignedDuration::MAX);
        retire_hold(&facts, &d.state, ttl, now)
    });
    gather(data, dns)
}

/// One `blocked` event per distinct hold reason (a reason covering several versions or both
/// steps is told once), with the lowest version it concerns.
pub(super) fn blocked_events(out: &mut KeyOutcome, run_id: &str, now: Timestamp) {
    let mut seen: Vec<(&Blocked, Vec<String>)> = Vec::new();
    for b in &out.blocked {
        let what = format!("{} v{}", b.step.as_str(), b.version);
        match seen
            .iter_mut()
            .find(|(f, _)| f.by == b.by && f.reason == b.reason)
        {
            Some((_, steps)) => steps.push(what),
            None => seen.push((b, vec![what])),
        }
    }
    let msgs: Vec<(u32, String)> = seen
        .into_iter()
        .map(|(b, steps)| {
            (
                b.version,
                format!(
                    "{} blocked ({}): {}",
                    steps.join(", "),
                    b.by.as_str(),
                    b.reason
                ),
            )
        })
        .collect();
    for (v, m) in msgs {
        out.event(run_id, EventKind::Blocked, now, m).version = Some(v);
    }
}

/// `rewrap_before_retire`: census → rewrap → census, each census stored as the key's latest.
/// Ok: a summary for the `rewrapped` event. Err: why the key's versions stay held this run.
pub(super) async fn rewrap_before_retire(
    ctx: &Ctx<'_>,
    k: &KeyPolicy,
    sources: &[DataSource],
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<String, String> {
    let clock: &(dyn Fn() -> Timestamp + Sync) = ctx.clock;
    let take = || async {
        let c = census::take(ctx.vault, k, sources, clock)
            .await
            .map_err(|e| format!("census: {e}"))?;
        census::store(ctx.vault, ctx.state, &c)
            .await
            .map_err(|e| format!("storing the census: {e}"))?;
        Ok::<_, String>(c)
    };
    let before = take().await?;
    let rctx = rewrap::Ctx {
        vault: ctx.vault,
        state: ctx.state,
        opts: RewrapOptions::default(),
        now: clock,
        progress: &|_| {},
        stop,
    };
    let r = rewrap::rewrap_key(&rctx, k, sources)
        .await
        .map_err(|e| format!("rewrap: {e}"))?;
    if r.interrupted {
        return Err("rewrap: interrupted by shutdown; run again to resume".into());
    }
    if r.failed() > 0 {
        let reasons: Vec<String> = r
            .sources
            .iter()
            .flat_map(|s| {
                s.failures
                    .iter()
                    .map(move |(why, f)| format!("{}: {} row(s): {why}", s.source, f.rows))
            })
            .collect();
        return Err(format!(
            "rewrap: {} row(s) could not be rewrapped to v{} ({})",
            thousands(r.failed()),
            r.target_version,
            reasons.join("; ")
        ));
    }
    let after = take().await?;
    Ok(format!(
        "rewrap_before_retire: census found {} row(s) below v{}; rewrapped {} to v{} ({} skipped \
         as changed by the application); census after: {} row(s) below v{}",
        thousands(before.rows_at_or_below(r.target_version.saturating_sub(1))),
        r.target_version,
        thousands(r.rewrapped()),
        r.target_version,
        thousands(r.skipped_changed()),
        thousands(after.rows_at_or_below(r.target_version.saturating_sub(1))),
        r.target_version,
    ))
}
