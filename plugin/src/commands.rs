//! The subcommands: each loads what it needs, calls the library, prints, and returns an exit
//! code. Nothing here decides policy; that is the planner's job.

use std::collections::BTreeSet;

use anyhow::Context;
use futures::StreamExt as _;
use jiff::Timestamp;
use keyroll::apply::{self, ApplyOptions, ApplyReport, Done, FailureClass};
use keyroll::audit::AuditLog;
use keyroll::duration::{human, Span};
use keyroll::events::{Event, EventKind};
use keyroll::observe::observe_all;
use keyroll::planner::{key_status, plan_key_held, Action, Blocked};
use keyroll::policy::Policy;
use keyroll::vault::client::env_var;
use keyroll::vault::{ClientConfig, ClientOverrides, Vault};
use keyroll::KeyName;
use serde::Serialize;
use tokio::sync::watch;

use crate::cli::{Cli, Command};
use crate::exit;
use crate::output::{emit, table};

use crate::exit::UsageError;

/// `apply --at` is refused unless this environment variable is `1` (see the flag's help).
const ALLOW_APPLY_AT: &str = "KEYROLL_ALLOW_APPLY_AT";

pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    let policy = Policy::load(&cli.config)?;
    match &cli.command {
        Command::Validate => {
            let mounts: BTreeSet<&str> = policy.keys.iter().map(|k| k.mount.as_str()).collect();
            println!(
                "{}: OK ({} key(s) on {} mount(s))",
                policy.path.display(),
                policy.keys.len(),
                mounts.len()
            );
            Ok(exit::OK)
        }
        Command::Plan { at } => plan(&cli, &policy, parse_at(at.as_deref())?).await,
        Command::Apply { dry_run, at } => {
            let at = match at {
                None => None,
                Some(_) if env_var(ALLOW_APPLY_AT).as_deref() != Some("1") => {
                    return Err(UsageError(format!(
                        "--at: apply acts on Vault as of another instant and records times that \
                         follow it, which can trim versions early in a real Vault; set \
                         {ALLOW_APPLY_AT}=1 to allow it (tests, rehearsals on a scratch Vault)"
                    ))
                    .into())
                }
                Some(s) => Some(parse_at(Some(s))?),
            };
            apply_cmd(&cli, &policy, *dry_run, at).await
        }
        Command::Rotate {
            key,
            retire_previous,
            mount,
        } => rotate(&cli, &policy, key, *retire_previous, mount.as_deref()).await,
        Command::Status { at, grace } => {
            let grace = Span::parse(grace)
                .and_then(|s| s.at_most(keyroll::bounds::MAX_GRACE))
                .map(|s| s.signed())
                .or_else(|e| {
                    if grace.trim() == "0s" || grace.trim() == "0" {
                        Ok(jiff::SignedDuration::ZERO)
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| UsageError(format!("--grace: {e}")))?;
            status(&cli, &policy, parse_at(at.as_deref())?, grace).await
        }
        Command::Inventory { mount } => inventory(&cli, &policy, mount).await,
        Command::Census { keys } => crate::data::census_cmd(&cli, &policy, keys).await,
        Command::Rewrap(args) => crate::data::rewrap_cmd(&cli, &policy, args).await,
        Command::Run { interval } => {
            let interval = match interval {
                Some(s) => Span::parse(s)
                    .and_then(|s| s.at_most(keyroll::bounds::MAX_INTERVAL))
                    .map_err(|e| UsageError(format!("--interval: {e}")))?,
                None => policy.run.interval,
            };
            daemon(&cli, policy, interval).await
        }
    }
}

fn parse_at(at: Option<&str>) -> Result<Timestamp, UsageError> {
    let now = Timestamp::now();
    match at {
        None => Ok(now),
        Some(s) if s.starts_with('+') => {
            let d = Span::parse(&s[1..]).map_err(|e| UsageError(format!("--at: {e}")))?;
            now.checked_add(d.signed())
                .map_err(|e| UsageError(format!("--at: {e}")))
        }
        Some(s) => s.parse::<Timestamp>().map_err(|e| {
            UsageError(format!(
                "--at: {s:?} is not an RFC 3339 time like 2027-02-01T00:00:00Z or +90d ({e})"
            ))
        }),
    }
}

pub(crate) async fn connect(cli: &Cli, policy: &Policy) -> anyhow::Result<Vault> {
    let flags = ClientOverrides {
        address: cli.vault.vault_addr.clone(),
        namespace: cli.vault.namespace.clone(),
        ca_cert: cli.vault.ca_cert.clone(),
        allow_insecure_http: cli.vault.allow_insecure_http,
    };
    let cfg = ClientConfig::resolve(&policy.vault, &env_var, &flags)?;
    Ok(Vault::connect(cfg).await?)
}

/// One line per failed key on stderr: `keyroll: error: KEY: what went wrong`.
fn print_errors(failed: impl Iterator<Item = (String, String)>) {
    for (key, err) in failed {
        eprintln!("keyroll: error: {key}: {err}");
    }
}

#[derive(Serialize)]
struct PlanOut<'a> {
    at: Timestamp,
    keys: Vec<PlanKey<'a>>,
}

#[derive(Serialize)]
struct PlanKey<'a> {
    key: &'a str,
    mount: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    drift: Vec<String>,
    actions: Vec<Action>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    blocked: Vec<Blocked>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// DNS stages and the DNS steps apply would take (queries only; nothing is written).
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<keyroll::apply::dns::DnsOutcome>,
}

/// Exit codes for a key's DNS outcome: 5 for a failed step, 3 for problems to look at.
fn dns_codes(d: Option<&keyroll::apply::dns::DnsOutcome>) -> Vec<u8> {
    let mut codes = Vec::new();
    if let Some(d) = d {
        if d.error.is_some() {
            codes.push(exit::DNS_FAILED);
        }
        if !d.problems.is_empty() {
            codes.push(exit::ATTENTION);
        }
    }
    codes
}

/// Table rows for a key's DNS outcome: one per step, problem and error.
fn dns_rows(
    key: &str,
    mount: &str,
    d: Option<&keyroll::apply::dns::DnsOutcome>,
) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let Some(d) = d else { return rows };
    for a in &d.actions {
        rows.push(vec![
            key.into(),
            mount.into(),
            a.verb().into(),
            a.reason().into(),
        ]);
    }
    for p in &d.problems {
        rows.push(vec![key.into(), mount.into(), "DNS".into(), p.clone()]);
    }
    if let Some(e) = &d.error {
        rows.push(vec![
            key.into(),
            mount.into(),
            "DNS FAILED".into(),
            e.clone(),
        ]);
    }
    rows
}

async fn plan(cli: &Cli, policy: &Policy, at: Timestamp) -> anyhow::Result<u8> {
    let vault = connect(cli, policy).await?;
    let planned = apply::plan_all(&vault, policy, at).await;
    let mut codes = vec![exit::OK];
    let mut out = PlanOut {
        at,
        keys: Vec::new(),
    };
    let mut errors = Vec::new();
    for (k, r) in &planned {
        let mut pk = PlanKey {
            key: k.name.as_str(),
            mount: &k.mount,
            drift: Vec::new(),
            actions: Vec::new(),
            blocked: Vec::new(),
            error: None,
            dns: None,
        };
        match r {
            Ok((o, p)) => {
                if !p.drift.is_empty() || !p.blocked.is_empty() {
                    codes.push(exit::ATTENTION);
                }
                pk.drift = p.drift.clone();
                pk.actions = p.actions.clone();
                pk.blocked = p.blocked.clone();
                if let keyroll::state::Observation::Present { key, .. } = o {
                    pk.dns = apply::dns::preview(&vault, policy, k, key, at).await;
                    codes.extend(dns_codes(pk.dns.as_ref()));
                }
            }
            Err(e) => {
                codes.push(exit::of_class(FailureClass::of(e)));
                errors.push((k.name.to_string(), e.to_string()));
                pk.error = Some(e.to_string());
            }
        }
        out.keys.push(pk);
    }
    emit(cli.output, &out, || {
        let mut rows = Vec::new();
        for k in &out.keys {
            if let Some(e) = &k.error {
                rows.push(vec![
                    k.key.into(),
                    k.mount.into(),
                    "ERROR".into(),
                    e.clone(),
                ]);
            } else if !k.drift.is_empty() {
                rows.push(vec![
                    k.key.into(),
                    k.mount.into(),
                    "DRIFT".into(),
                    k.drift.join("; "),
                ]);
            } else if k.actions.is_empty()
                && k.blocked.is_empty()
                && k.dns.as_ref().is_none_or(|d| {
                    d.actions.is_empty() && d.problems.is_empty() && d.error.is_none()
                })
            {
                rows.push(vec![
                    k.key.into(),
                    k.mount.into(),
                    "-".into(),
                    "up to date".into(),
                ]);
            }
            for a in &k.actions {
                rows.push(vec![
                    k.key.into(),
                    k.mount.into(),
                    a.verb().into(),
                    a.reason().into(),
                ]);
            }
            rows.extend(blocked_rows(k.key, k.mount, &k.blocked));
            rows.extend(dns_rows(k.key, k.mount, k.dns.as_ref()));
        }
        let n = out
            .keys
            .iter()
            .map(|k| k.actions.len() + k.dns.as_ref().map_or(0, |d| d.actions.len()))
            .sum::<usize>();
        let b = out.keys.iter().map(|k| k.blocked.len()).sum::<usize>();
        format!(
            "{}\nplan at {}: {n} action(s), {b} blocked",
            table(&["KEY", "MOUNT", "ACTION", "REASON"], &rows),
            secs(at)
        )
    });
    print_errors(errors.into_iter());
    Ok(exit::worst(codes))
}

/// Table rows for blocked steps: ACTION "BLOCKED", the reason naming step, version and hold.
fn blocked_rows(key: &str, mount: &str, blocked: &[Blocked]) -> Vec<Vec<String>> {
    blocked
        .iter()
        .map(|b| vec![key.into(), mount.into(), "BLOCKED".into(), b.summary()])
        .collect()
}

/// The audit log of one command: events are appended as each key finishes (a killed run
/// loses at most the keys it had in flight); a write failure is reported once and makes the
/// exit status 1.
struct Audit {
    log: Option<AuditLog>,
    failed: bool,
}

impl Audit {
    fn none() -> Self {
        Audit {
            log: None,
            failed: false,
        }
    }

    fn open(policy: &Policy) -> anyhow::Result<Self> {
        Ok(Audit {
            log: policy
                .audit
                .as_ref()
                .map(|a| AuditLog::open(&a.path))
                .transpose()?,
            failed: false,
        })
    }

    fn append(&mut self, events: &[Event]) {
        let Some(log) = self.log.as_mut() else { return };
        if events.is_empty() {
            return;
        }
        if let Err(e) = log.append(events) {
            tracing::error!(error = %e, "cannot write the audit log");
            if !self.failed {
                eprintln!("keyroll: error: {e}");
            }
            self.failed = true;
        }
    }
}

/// Notifies (one batch per run), audits the notifier failures, returns their exit codes.
async fn notify(policy: &Policy, run_id: &str, events: &[Event], audit: &mut Audit) -> Vec<u8> {
    let mut codes = Vec::new();
    for f in keyroll::notify::deliver(&policy.notify, run_id, events).await {
        tracing::error!(error = %f, "notification failed (rotation is not affected)");
        eprintln!("keyroll: error: {f}");
        codes.push(exit::NOTIFY_FAILED);
        audit.append(&[Event::new(
            run_id,
            EventKind::NotifyFailed,
            Timestamp::now(),
            f.to_string(),
        )]);
    }
    codes
}

/// A `Done` action's reason, with Vault's error answer when the write was applied anyway.
fn done_reason(d: &Done) -> String {
    match &d.answered {
        None => d.action.reason().to_string(),
        Some(a) => format!(
            "{} (Vault answered \"{a}\" but shows it applied)",
            d.action.reason()
        ),
    }
}

/// Notify, print; returns the exit code of an apply (the events are already audited).
async fn finish(cli: &Cli, policy: &Policy, report: &ApplyReport, audit: &mut Audit) -> u8 {
    let mut codes = vec![exit::OK];
    if !report.dry_run {
        let events: Vec<Event> = report.events().cloned().collect();
        codes.extend(notify(policy, &report.run_id, &events, audit).await);
    }
    if audit.failed {
        codes.push(exit::FAILURE);
    }
    for k in &report.keys {
        if let Some(f) = k.failure {
            codes.push(exit::of_class(f));
        }
        if !k.drift.is_empty() || !k.blocked.is_empty() {
            codes.push(exit::ATTENTION);
        }
        codes.extend(dns_codes(k.dns.as_ref()));
    }
    emit(cli.output, report, || {
        let mut rows = Vec::new();
        for k in &report.keys {
            for a in &k.actions {
                rows.push(vec![
                    k.key.clone(),
                    k.mount.clone(),
                    a.action.verb().into(),
                    done_reason(a),
                ]);
            }
            rows.extend(blocked_rows(&k.key, &k.mount, &k.blocked));
            if !k.drift.is_empty() {
                rows.push(vec![
                    k.key.clone(),
                    k.mount.clone(),
                    "DRIFT".into(),
                    format!("{} (left untouched)", k.drift.join("; ")),
                ]);
            }
            if let Some(e) = &k.error {
                rows.push(vec![
                    k.key.clone(),
                    k.mount.clone(),
                    "FAILED".into(),
                    e.clone(),
                ]);
            }
            rows.extend(dns_rows(&k.key, &k.mount, k.dns.as_ref()));
        }
        let changed = report
            .keys
            .iter()
            .filter(|k| {
                !k.actions.is_empty() || k.dns.as_ref().is_some_and(|d| !d.actions.is_empty())
            })
            .count();
        let failed = report.failures().count();
        let dns_failed = report.dns_failures().count();
        let drifted = report.keys.iter().filter(|k| !k.drift.is_empty()).count();
        let blocked = report.keys.iter().filter(|k| !k.blocked.is_empty()).count();
        let skipped = report.keys.iter().filter(|k| k.skipped).count();
        let verb = if report.dry_run {
            "would change"
        } else {
            "changed"
        };
        let mut s = String::new();
        if !rows.is_empty() {
            s.push_str(&table(&["KEY", "MOUNT", "ACTION", "REASON"], &rows));
        }
        s.push_str(&format!(
            "{}: {} key(s), {changed} {verb}, {failed} failed, {drifted} drifted, {blocked} \
             blocked{}{}",
            if report.dry_run {
                "apply --dry-run"
            } else {
                "apply"
            },
            report.keys.len(),
            if dns_failed > 0 {
                format!(", {dns_failed} DNS step(s) failed")
            } else {
                String::new()
            },
            if skipped > 0 {
                format!(", {skipped} skipped (shutdown)")
            } else {
                String::new()
            }
        ));
        s
    });
    print_errors(
        report
            .failures()
            .map(|k| (k.key.clone(), k.error.clone().unwrap_or_default())),
    );
    print_errors(report.dns_failures().map(|k| {
        let e = k.dns.as_ref().and_then(|d| d.error.clone());
        (k.key.clone(), format!("DNS: {}", e.unwrap_or_default()))
    }));
    exit::worst(codes)
}

async fn apply_cmd(
    cli: &Cli,
    policy: &Policy,
    dry_run: bool,
    at: Option<Timestamp>,
) -> anyhow::Result<u8> {
    let mut audit = if dry_run {
        Audit::none()
    } else {
        Audit::open(policy)?
    };
    let vault = connect(cli, policy).await?;
    let (_tx, rx) = watch::channel(false);
    let fixed = move || at.unwrap_or_else(Timestamp::now);
    let opts = ApplyOptions::for_policy(policy, dry_run);
    let report = apply::apply(&vault, policy, &opts, &fixed, &rx, &mut |k| {
        audit.append(&k.events)
    })
    .await;
    Ok(finish(cli, policy, &report, &mut audit).await)
}

async fn rotate(
    cli: &Cli,
    policy: &Policy,
    key: &str,
    retire_previous: bool,
    mount: Option<&str>,
) -> anyhow::Result<u8> {
    let name = KeyName::new(key).map_err(|e| UsageError(format!("KEY: {e}")))?;
    let mount = match (mount, policy.key(key)) {
        (Some(m), _) => m.to_string(),
        (None, Some(k)) => k.mount.clone(),
        (None, None) => keyroll::policy::DEFAULT_MOUNT.to_string(),
    };
    keyroll::policy::check_mount(&mount).map_err(|e| UsageError(format!("--mount: {e}")))?;
    let mut audit = Audit::open(policy)?;
    let vault = connect(cli, policy).await?;
    let opts = ApplyOptions::for_policy(policy, false);
    let out = apply::rotate_now(
        &vault,
        &policy.state,
        (&mount, &name),
        retire_previous,
        &opts,
        &Timestamp::now,
    )
    .await;
    audit.append(&out.events);
    let mut codes = vec![exit::OK];
    codes.extend(notify(policy, &opts.run_id, &out.events, &mut audit).await);
    if audit.failed {
        codes.push(exit::FAILURE);
    }
    if let (Some(class), Some(e)) = (out.failure, &out.error) {
        codes.push(exit::of_class(class));
        print_errors(std::iter::once((key.to_string(), e.clone())));
        return Ok(exit::worst(codes));
    }
    let latest = out
        .actions
        .iter()
        .find(|d| d.action.verb() == "rotate")
        .and_then(|d| d.version);
    #[derive(Serialize)]
    struct RotateOut<'a> {
        key: &'a str,
        mount: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        latest_version: Option<u32>,
        retired_previous: bool,
        events: &'a [Event],
    }
    emit(
        cli.output,
        &RotateOut {
            key,
            mount: &mount,
            latest_version: latest,
            retired_previous: retire_previous,
            events: &out.events,
        },
        || {
            format!(
                "rotated {mount}/keys/{key} to {}{}",
                latest.map_or("a new version".to_string(), |v| format!("v{v}")),
                if retire_previous {
                    "; earlier versions retired"
                } else {
                    ""
                }
            )
        },
    );
    Ok(exit::worst(codes))
}

async fn status(
    cli: &Cli,
    policy: &Policy,
    at: Timestamp,
    grace: jiff::SignedDuration,
) -> anyhow::Result<u8> {
    let vault = connect(cli, policy).await?;
    let obs = observe_all(&vault, &policy.state, &policy.keys, policy.run.concurrency).await;
    let mut codes = vec![exit::OK];
    let mut statuses = Vec::new();
    let mut errors = Vec::new();
    for (k, o) in policy.keys.iter().zip(obs) {
        let o = match o {
            Ok(o) => {
                apply::read_guards(&vault, &policy.state, k, apply::KeyData::of(policy, k), at)
                    .await
                    .map(|g| (o, g))
            }
            Err(e) => Err(e),
        };
        match o {
            Ok((o, guard)) => {
                let mut s = key_status(k, &o, at, grace);
                let holds = apply::holds_for(&guard, &o, at);
                s.blocked = plan_key_held(k, &o, &holds, at).blocked;
                if s.overdue || !s.drift.is_empty() || !s.blocked.is_empty() {
                    codes.push(exit::ATTENTION);
                }
                let census = guard.data.and_then(|g| match g.census {
                    keyroll::holds::LatestCensus::Taken(c) => Some(c),
                    _ => None,
                });
                let dns = match &o {
                    keyroll::state::Observation::Present { key, .. } => {
                        apply::dns::preview(&vault, policy, k, key, at).await
                    }
                    keyroll::state::Observation::Missing => None,
                };
                codes.extend(dns_codes(dns.as_ref()));
                statuses.push(StatusRow {
                    status: s,
                    census,
                    dns,
                });
            }
            Err(e) => {
                codes.push(exit::of_class(FailureClass::of(&e)));
                errors.push((k.name.to_string(), e.to_string()));
            }
        }
    }
    emit(cli.output, &statuses, || {
        let rows: Vec<Vec<String>> = statuses
            .iter()
            .map(|r| &r.status)
            .map(|s| {
                let state = if !s.exists {
                    "MISSING".to_string()
                } else if !s.drift.is_empty() {
                    format!("DRIFT: {}", s.drift.join("; "))
                } else if !s.blocked.is_empty() {
                    format!(
                        "BLOCKED{}: {}",
                        if s.overdue { ", OVERDUE" } else { "" },
                        s.blocked
                            .iter()
                            .map(Blocked::summary)
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                } else if s.overdue {
                    "OVERDUE".into()
                } else {
                    "ok".into()
                };
                vec![
                    s.key.to_string(),
                    s.key_type.clone().unwrap_or_else(|| "-".into()),
                    if s.exists {
                        format!("v{}", s.latest_version)
                    } else {
                        "-".into()
                    },
                    s.latest_age_seconds
                        .map(|a| human(jiff::SignedDuration::from_secs(a)))
                        .unwrap_or_else(|| "-".into()),
                    s.next_rotation_due
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "-".into()),
                    versions(&s.usable_versions),
                    versions(&s.retired_versions),
                    if s.disposed_below > 1 {
                        format!("<v{}", s.disposed_below)
                    } else {
                        "-".into()
                    },
                    state,
                ]
            })
            .collect();
        let t = table(
            &[
                "KEY",
                "TYPE",
                "LATEST",
                "AGE",
                "NEXT ROTATION",
                "USABLE",
                "RETIRED",
                "DISPOSED",
                "STATE",
            ],
            &rows,
        );
        let mut s = t;
        for c in statuses.iter().filter_map(|r| r.census.as_ref()) {
            s.push_str(&census_line(c));
        }
        s + &dns_status_table(&statuses)
    });
    print_errors(errors.into_iter());
    Ok(exit::worst(codes))
}

/// `status` per key: the planner's status; for a key with `[[keys.data]]`, its latest stored
/// census; for DKIM keys with `[keys.dns]`, each version's DNS stage and what the next run would
/// do.
#[derive(Serialize)]
struct StatusRow {
    #[serde(flatten)]
    status: keyroll::planner::KeyStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    census: Option<keyroll::census::KeyCensus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<keyroll::apply::dns::DnsOutcome>,
}

/// "census of transit/k at T: subscribers.c v1 1,200, v2 3; ..." for `status`'s text output.
fn census_line(c: &keyroll::census::KeyCensus) -> String {
    use keyroll::holds::thousands;
    let per: Vec<String> = c
        .sources
        .iter()
        .map(|s| {
            let v: Vec<String> = s
                .versions
                .iter()
                .map(|(v, n)| format!("v{v} {}", thousands(*n)))
                .collect();
            format!(
                "{} {}",
                s.source,
                if v.is_empty() {
                    "no ciphertexts".to_string()
                } else {
                    v.join(", ")
                }
            )
        })
        .collect();
    format!(
        "census of {}/{} at {}: {}\n",
        c.mount,
        c.key,
        secs(c.taken_at),
        per.join("; ")
    )
}

/// The DNS table under `status` (empty when no key publishes DNS records).
fn dns_status_table(rows: &[StatusRow]) -> String {
    let mut t = Vec::new();
    for r in rows {
        let Some(d) = &r.dns else { continue };
        let key = r.status.key.to_string();
        for v in &d.versions {
            let next: Vec<&str> = d
                .actions
                .iter()
                .filter(|a| a.version() == v.version)
                .map(|a| a.verb())
                .collect();
            t.push(vec![
                key.clone(),
                format!("v{}", v.version),
                v.owner.clone(),
                format!("{:?}", v.stage).to_lowercase(),
                if d.signing == Some(v.version) {
                    "yes".into()
                } else {
                    "-".into()
                },
                if next.is_empty() {
                    "-".into()
                } else {
                    next.join(", ")
                },
            ]);
        }
        for p in &d.problems {
            t.push(vec![
                key.clone(),
                "-".into(),
                "-".into(),
                "PROBLEM".into(),
                "-".into(),
                p.clone(),
            ]);
        }
        if let Some(e) = &d.error {
            t.push(vec![
                key.clone(),
                "-".into(),
                "-".into(),
                "DNS FAILED".into(),
                "-".into(),
                e.clone(),
            ]);
        }
    }
    if t.is_empty() {
        return String::new();
    }
    format!(
        "\n{}",
        table(
            &["KEY", "VERSION", "RECORD", "DNS STAGE", "SIGNING", "NEXT"],
            &t
        )
    )
}

fn versions(v: &[u32]) -> String {
    match (v.first(), v.last()) {
        (None, _) | (_, None) => "-".into(),
        (Some(a), Some(b)) if a == b => format!("v{a}"),
        (Some(a), Some(b)) => format!("v{a}–v{b}"),
    }
}

#[derive(Serialize)]
struct InventoryRow {
    mount: String,
    name: String,
    managed: bool,
    #[serde(rename = "type")]
    key_type: String,
    latest_version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    latest_created: Option<Timestamp>,
    exportable: bool,
    min_decryption_version: u32,
    min_available_version: u32,
    /// False when the token may list the key but not read it.
    readable: bool,
}

async fn inventory(cli: &Cli, policy: &Policy, mounts: &[String]) -> anyhow::Result<u8> {
    let mounts: BTreeSet<String> = if mounts.is_empty() {
        let mut m: BTreeSet<String> = policy.keys.iter().map(|k| k.mount.clone()).collect();
        if m.is_empty() {
            m.insert(keyroll::policy::DEFAULT_MOUNT.into());
        }
        m
    } else {
        mounts.iter().cloned().collect()
    };
    let vault = connect(cli, policy).await?;
    let mut rows = Vec::new();
    for mount in &mounts {
        keyroll::policy::check_mount(mount).map_err(|e| UsageError(format!("--mount: {e}")))?;
        let names = vault.list_keys(mount).await?;
        let reads: Vec<_> =
            futures::stream::iter(names.into_iter().filter_map(|n| KeyName::new(&n).ok()))
                .map(|n| {
                    let vault = vault.clone();
                    let mount = mount.clone();
                    async move {
                        let k = vault.read_key(&mount, &n).await;
                        (n, k)
                    }
                })
                .buffered(policy.run.concurrency)
                .collect()
                .await;
        for (n, k) in reads {
            // A key the token may list but not read is still "in use": show it, don't stop.
            let k = match k {
                Ok(Some(k)) => k,
                Ok(None) => continue,
                Err(keyroll::vault::VaultError::PermissionDenied { .. }) => {
                    rows.push(InventoryRow {
                        managed: policy.keys.iter().any(|p| p.mount == *mount && p.name == n),
                        mount: mount.clone(),
                        name: n.to_string(),
                        key_type: "(unreadable: permission denied)".into(),
                        latest_version: 0,
                        latest_created: None,
                        exportable: false,
                        min_decryption_version: 0,
                        min_available_version: 0,
                        readable: false,
                    });
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            rows.push(InventoryRow {
                readable: true,
                managed: policy.keys.iter().any(|p| p.mount == *mount && p.name == n),
                mount: mount.clone(),
                name: n.to_string(),
                latest_created: k.versions.get(&k.latest_version).copied(),
                key_type: k.key_type,
                latest_version: k.latest_version,
                exportable: k.exportable,
                min_decryption_version: k.min_decryption_version,
                min_available_version: k.min_available_version,
            });
        }
    }
    emit(cli.output, &rows, || {
        let t: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.mount.clone(),
                    r.name.clone(),
                    if r.managed {
                        "managed".into()
                    } else {
                        "UNMANAGED".into()
                    },
                    r.key_type.clone(),
                    format!("v{}", r.latest_version),
                    r.latest_created
                        .map(|c| human(Timestamp::now().duration_since(c)))
                        .unwrap_or_else(|| "-".into()),
                    r.exportable.to_string(),
                ]
            })
            .collect();
        table(
            &[
                "MOUNT",
                "NAME",
                "POLICY",
                "TYPE",
                "LATEST",
                "AGE",
                "EXPORTABLE",
            ],
            &t,
        )
    });
    Ok(exit::OK)
}

/// SIGTERM or SIGINT flips the returned receiver to true.
fn shutdown_signal() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested; finishing the key in progress");
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn daemon(cli: &Cli, mut policy: Policy, interval: Span) -> anyhow::Result<u8> {
    let mut shutdown = shutdown_signal()?;
    let mut audit = Audit::open(&policy)?;
    let vault = connect(cli, &policy).await?;
    let keepalive = {
        let vault = vault.clone();
        let rx = shutdown.clone();
        tokio::spawn(async move { vault.keep_token_alive(rx).await })
    };
    tracing::info!(keys = policy.keys.len(), interval = %interval, "keyroll run started");
    loop {
        audit.failed = false;
        let report = apply::apply(
            &vault,
            &policy,
            &ApplyOptions::for_policy(&policy, false),
            &Timestamp::now,
            &shutdown,
            &mut |k| audit.append(&k.events),
        )
        .await;
        let code = finish(cli, &policy, &report, &mut audit).await;
        tracing::info!(
            run_id = %report.run_id,
            changed = report.keys.iter().filter(|k| !k.actions.is_empty()).count(),
            failed = report.failures().count(),
            exit_code = code,
            "pass finished"
        );
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval.std()) => {}
            _ = shutdown.changed() => break,
        }
        // A changed policy applies at the next pass; an invalid one is refused, the old kept.
        match Policy::load(&cli.config) {
            Ok(p) => policy = p,
            Err(e) => {
                tracing::error!(error = %e, "policy file is invalid; keeping the previous policy")
            }
        }
    }
    keepalive.abort();
    tracing::info!("keyroll run stopped");
    Ok(exit::OK)
}

/// A timestamp rounded to the second, for text output.
fn secs(t: Timestamp) -> Timestamp {
    t.round(jiff::Unit::Second).unwrap_or(t)
}
