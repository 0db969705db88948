//! What the sidecar knows about itself, shared between the watch loop, the reloader and the HTTP
//! listener: per-key health, readiness, counters, and the `/refresh` gate.
//!
//! Everything here is plain data behind one mutex, updated in small critical sections; the HTTP
//! handlers only read it. `/metrics` is rendered from it in the Prometheus text format by hand
//! (a dozen series do not need a metrics library).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use jiff::Timestamp;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::sync::{watch, Notify};

/// Health of one configured key.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeyStatus {
    pub mount: String,
    pub format: &'static str,
    /// False while the key could not be read, exported or rendered; its last good files stay.
    pub healthy: bool,
    /// Why it is not healthy (never carries key material).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Versions in the live files (empty until first delivered).
    pub versions: Vec<u32>,
    pub latest_version: u32,
    /// DKIM keys (format opendkim): which selector signs, and what a new one waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dkim: Option<DkimStatus>,
}

/// Which version of a DKIM key signs, and (with `activation = "dns"`) why a newer one does not
/// sign yet.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DkimStatus {
    /// `timer` or `dns`.
    pub activation: &'static str,
    /// The version the live SigningTable signs with (0 before the first publish).
    pub signing_version: u32,
    pub signing_selector: String,
    /// A newer version is delivered but does not sign yet (normal during a rotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// Something an operator must fix before the rotation can finish (a record with another
    /// key): `/healthz` says "warning" (still 200).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// The newest version not signing yet, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Waiting {
    pub version: u32,
    pub selector: String,
    /// `not_checked`, `absent`, `wrong_key`, `unreachable`, `negative_ttl`, `activate_after`,
    /// `publishing` (confirmed; the switch is being published).
    pub state: &'static str,
    /// Since when the version waits (first checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// When it may sign at the earliest, if known (negative TTL or `activate_after` running).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
    pub reason: String,
}

/// Counters and gauges exported on `/metrics`.
#[derive(Debug, Default, Serialize)]
pub struct Counters {
    pub passes: u64,
    pub metadata_reads: u64,
    pub exports: u64,
    pub publishes: u64,
    pub repairs: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub config_reloads_ok: u64,
    pub config_reloads_failed: u64,
    pub dns_queries_ok: u64,
    pub dns_queries_failed: u64,
    pub reports_ok: u64,
    pub reports_failed: u64,
    pub errors: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Status {
    pub ready: bool,
    /// Vault itself unusable (down, sealed, 5xx) at the last pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vault_error: Option<String>,
    /// The last publish failed (disk full, permissions...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_error: Option<String>,
    /// The last reload of the mailer failed after all attempts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reload_error: Option<String>,
    /// The last config file change was rejected (the previous config is in force).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// The last signing report to Vault failed (retried each pass; not degraded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_error: Option<String>,
    pub last_success: Option<Timestamp>,
    pub last_publish: Option<Timestamp>,
    pub last_reload: Option<Timestamp>,
    pub keys: BTreeMap<String, KeyStatus>,
    pub counters: Counters,
}

impl Status {
    pub fn degraded(&self) -> bool {
        self.vault_error.is_some()
            || self.publish_error.is_some()
            || self.reload_error.is_some()
            || self.keys.values().any(|k| !k.healthy)
    }

    /// Conditions that need an operator but do not stop delivery: a DKIM record served with
    /// another key, a failing signing report.
    pub fn warning(&self) -> bool {
        self.report_error.is_some()
            || self
                .keys
                .values()
                .any(|k| k.dkim.as_ref().is_some_and(|d| d.warning.is_some()))
    }

    pub fn error(&mut self, kind: &'static str) {
        *self.counters.errors.entry(kind).or_default() += 1;
    }

    /// `/healthz` body.
    pub fn health_json(&self) -> String {
        #[derive(Serialize)]
        struct H<'a> {
            status: &'static str,
            #[serde(flatten)]
            s: &'a Status,
        }
        let status = if self.degraded() {
            "degraded"
        } else if self.warning() {
            "warning"
        } else {
            "ok"
        };
        serde_json::to_string_pretty(&H { status, s: self }).unwrap_or_default()
    }

    /// `/metrics` body, Prometheus text format 0.0.4.
    pub fn metrics(&self) -> String {
        let mut o = String::with_capacity(2048);
        let ts =
            |t: Option<Timestamp>| t.map(|t| t.as_millisecond() as f64 / 1000.0).unwrap_or(0.0);
        let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP keyroll_sidecar_{name} {help}");
            let _ = writeln!(o, "# TYPE keyroll_sidecar_{name} gauge");
            let _ = writeln!(o, "keyroll_sidecar_{name} {v}");
        };
        gauge(
            &mut o,
            "ready",
            "1 after the first complete publish.",
            b(self.ready),
        );
        gauge(
            &mut o,
            "degraded",
            "1 while any key, Vault, publish or reload has a problem.",
            b(self.degraded()),
        );
        gauge(
            &mut o,
            "vault_up",
            "0 while Vault is unreachable, sealed or failing.",
            b(self.vault_error.is_none()),
        );
        gauge(
            &mut o,
            "last_success_timestamp_seconds",
            "End of the last pass where every key was current and published.",
            ts(self.last_success),
        );
        gauge(
            &mut o,
            "last_publish_timestamp_seconds",
            "When a new snapshot last went live.",
            ts(self.last_publish),
        );
        gauge(
            &mut o,
            "last_reload_timestamp_seconds",
            "When the mailer was last reloaded successfully.",
            ts(self.last_reload),
        );
        let c = &self.counters;
        let counter = |o: &mut String, name: &str, help: &str, series: &[(&str, u64)]| {
            let _ = writeln!(o, "# HELP keyroll_sidecar_{name}_total {help}");
            let _ = writeln!(o, "# TYPE keyroll_sidecar_{name}_total counter");
            for (labels, v) in series {
                let _ = writeln!(o, "keyroll_sidecar_{name}_total{labels} {v}");
            }
        };
        counter(&mut o, "passes", "Reconcile passes run.", &[("", c.passes)]);
        counter(&mut o, "vault_requests", "Vault requests by kind: metadata reads (one per key per pass) and exports (only on change).",
            &[("{kind=\"read\"}", c.metadata_reads), ("{kind=\"export\"}", c.exports)]);
        counter(
            &mut o,
            "publishes",
            "Snapshots published.",
            &[("", c.publishes)],
        );
        counter(
            &mut o,
            "repairs",
            "Publishes that restored files changed or deleted by someone else.",
            &[("", c.repairs)],
        );
        counter(
            &mut o,
            "reloads",
            "Mailer reloads by result.",
            &[
                ("{result=\"ok\"}", c.reloads_ok),
                ("{result=\"error\"}", c.reloads_failed),
            ],
        );
        counter(
            &mut o,
            "config_reloads",
            "Config file reloads by result.",
            &[
                ("{result=\"ok\"}", c.config_reloads_ok),
                ("{result=\"error\"}", c.config_reloads_failed),
            ],
        );
        counter(
            &mut o,
            "dns_queries",
            "DNS queries of activation = \"dns\" by result (none once every key signs with its newest version).",
            &[
                ("{result=\"ok\"}", c.dns_queries_ok),
                ("{result=\"error\"}", c.dns_queries_failed),
            ],
        );
        counter(
            &mut o,
            "signing_reports",
            "Signing reports written to Vault KV by result.",
            &[
                ("{result=\"ok\"}", c.reports_ok),
                ("{result=\"error\"}", c.reports_failed),
            ],
        );
        gauge(
            &mut o,
            "warning",
            "1 while a DKIM record is served with another key or signing reports fail.",
            b(self.warning()),
        );
        let errs: Vec<(String, u64)> = [
            "vault", "key", "render", "publish", "reload", "config", "dns", "report",
        ]
        .iter()
        .map(|k| {
            (
                format!("{{kind=\"{k}\"}}"),
                c.errors.get(k).copied().unwrap_or(0),
            )
        })
        .collect();
        let errs: Vec<(&str, u64)> = errs.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        counter(&mut o, "errors", "Errors by kind.", &errs);
        let _ = writeln!(
            o,
            "# HELP keyroll_sidecar_key_healthy 1 if the key's files are current."
        );
        let _ = writeln!(o, "# TYPE keyroll_sidecar_key_healthy gauge");
        for (name, k) in &self.keys {
            let _ = writeln!(
                o,
                "keyroll_sidecar_key_healthy{{key=\"{name}\",mount=\"{}\",format=\"{}\"}} {}",
                k.mount,
                k.format,
                b(k.healthy)
            );
        }
        let _ = writeln!(
            o,
            "# HELP keyroll_sidecar_key_versions_published Versions of the key in the live files."
        );
        let _ = writeln!(o, "# TYPE keyroll_sidecar_key_versions_published gauge");
        for (name, k) in &self.keys {
            let _ = writeln!(o, "keyroll_sidecar_key_versions_published{{key=\"{name}\",mount=\"{}\",format=\"{}\"}} {}", k.mount, k.format, k.versions.len());
        }
        let _ = writeln!(o, "# HELP keyroll_sidecar_key_latest_version_published Highest version of the key in the live files.");
        let _ = writeln!(
            o,
            "# TYPE keyroll_sidecar_key_latest_version_published gauge"
        );
        for (name, k) in &self.keys {
            let _ = writeln!(o, "keyroll_sidecar_key_latest_version_published{{key=\"{name}\",mount=\"{}\",format=\"{}\"}} {}", k.mount, k.format, k.versions.last().copied().unwrap_or(0));
        }
        let dkim: Vec<(&String, &KeyStatus, &DkimStatus)> = self
            .keys
            .iter()
            .filter_map(|(n, k)| k.dkim.as_ref().map(|d| (n, k, d)))
            .collect();
        let per_key = |o: &mut String, name: &str, help: &str, f: &dyn Fn(&DkimStatus) -> f64| {
            let _ = writeln!(o, "# HELP keyroll_sidecar_key_{name} {help}");
            let _ = writeln!(o, "# TYPE keyroll_sidecar_key_{name} gauge");
            for (key, k, d) in &dkim {
                let _ = writeln!(
                    o,
                    "keyroll_sidecar_key_{name}{{key=\"{key}\",mount=\"{}\",activation=\"{}\"}} {}",
                    k.mount,
                    d.activation,
                    f(d)
                );
            }
        };
        per_key(
            &mut o,
            "signing_version",
            "Version the live SigningTable signs with.",
            &|d| f64::from(d.signing_version),
        );
        per_key(
            &mut o,
            "dns_waiting",
            "1 while a newer version is delivered but waits for DNS (or activate_after).",
            &|d| b(d.waiting.is_some()),
        );
        per_key(
            &mut o,
            "dns_waiting_since_timestamp_seconds",
            "Since when the newer version waits (0: not waiting).",
            &|d| ts(d.waiting.as_ref().and_then(|w| w.since)),
        );
        per_key(
            &mut o,
            "dns_wrong_key",
            "1 while a server answers the waiting version's record with another key.",
            &|d| b(d.waiting.as_ref().is_some_and(|w| w.state == "wrong_key")),
        );
        o
    }
}

fn b(v: bool) -> f64 {
    if v {
        1.0
    } else {
        0.0
    }
}

/// State shared by every task.
pub struct Shared {
    pub status: Mutex<Status>,
    /// Wakes the watch loop for a full pass (`POST /refresh`).
    pub refresh: Notify,
    /// Ticket of the last refresh asked for.
    requested: Mutex<u64>,
    /// Highest ticket whose pass has finished, with that pass's outcome.
    completed: watch::Sender<(u64, PassSummary)>,
    /// Bearer token `POST /refresh` requires (from `listen.token_file`; follows config reloads).
    refresh_token: Mutex<Option<SecretString>>,
}

/// What a pass did, as `/refresh` reports it.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PassSummary {
    pub published: bool,
    pub complete: bool,
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    pub fn new() -> Self {
        Shared {
            status: Mutex::new(Status::default()),
            refresh: Notify::new(),
            requested: Mutex::new(0),
            completed: watch::channel((0, PassSummary::default())).0,
            refresh_token: Mutex::new(None),
        }
    }

    pub fn set_refresh_token(&self, t: Option<SecretString>) {
        *self.refresh_token.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    /// Does `given` match the configured token (true when none is configured)? Compares
    /// digests, so the time taken does not depend on where the strings differ.
    pub fn token_ok(&self, given: Option<&str>) -> bool {
        use sha2::{Digest, Sha256};
        let guard = self.refresh_token.lock().unwrap_or_else(|p| p.into_inner());
        let Some(want) = guard.as_ref() else {
            return true;
        };
        let Some(given) = given else { return false };
        let a = Sha256::digest(want.expose_secret().as_bytes());
        let b = Sha256::digest(given.as_bytes());
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        let mut g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Asks for a full pass; returns a receiver and the ticket a finished pass must reach.
    pub fn request_refresh(&self) -> (watch::Receiver<(u64, PassSummary)>, u64) {
        let rx = self.completed.subscribe();
        let ticket = {
            let mut r = self.requested.lock().unwrap_or_else(|p| p.into_inner());
            *r += 1;
            *r
        };
        self.refresh.notify_one();
        (rx, ticket)
    }

    /// Called by the watch loop as a full pass starts: the refreshes it will satisfy.
    pub fn pass_started(&self) -> u64 {
        *self.requested.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pass_finished(&self, ticket: u64, summary: PassSummary) {
        self.completed.send_replace((ticket, summary));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_prometheus_text() {
        let mut s = Status::default();
        s.keys.insert(
            "k".into(),
            KeyStatus {
                mount: "transit".into(),
                format: "pem",
                healthy: true,
                versions: vec![1, 2],
                latest_version: 2,
                error: None,
                dkim: None,
            },
        );
        s.error("vault");
        let m = s.metrics();
        assert!(
            m.contains("keyroll_sidecar_errors_total{kind=\"vault\"} 1"),
            "{m}"
        );
        assert!(m.contains("keyroll_sidecar_key_latest_version_published{key=\"k\",mount=\"transit\",format=\"pem\"} 2"));
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.split(' ').count(), 2, "{line}");
        }
    }

    #[tokio::test]
    async fn a_refresh_waits_for_a_pass_that_started_after_it() {
        let s = Shared::new();
        let before = s.pass_started();
        let (mut rx, ticket) = s.request_refresh();
        s.pass_finished(before, PassSummary::default());
        assert!(rx.borrow_and_update().0 < ticket);
        let t = s.pass_started();
        s.pass_finished(
            t,
            PassSummary {
                published: true,
                complete: true,
            },
        );
        assert!(rx.borrow_and_update().0 >= ticket);
    }
}
