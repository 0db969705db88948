//! Which version each mailer signs with, as its sidecar reports it: the record that closes the
//! DKIM loop between `keyroll-sidecar` (writer) and `keyroll` (reader).
//!
//! keyroll cannot see what a mailer signs with; the sidecar can. After every publish that
//! changes the selector a key signs with (and at most every [`REFRESH_AFTER`] otherwise), the
//! sidecar writes one small KV v2 entry per key to keyroll's state mount:
//! `<state.mount>/data/<state.path>/signing/<transit mount>/<key>/<sidecar id>`. keyroll lists
//! the key's directory and takes the **lowest** version over reports younger than the key's
//! `signing_report_max_age`: a mailer that has not switched yet keeps the old version signing.
//! A report is a fact about a mailer, never a secret: it carries versions and selectors only.

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::policy::StateSettings;
use crate::vault::{Vault, VaultError};

/// How often an unchanged report is refreshed, so that keyroll can tell a live sidecar from
/// one that went away.
pub const REFRESH_AFTER: Duration = Duration::from_secs(3600);
/// Default age beyond which keyroll ignores a report (a sidecar gone for good must not hold
/// a key's old version for ever).
pub const DEFAULT_REPORT_MAX_AGE: Duration = Duration::from_secs(2 * 86_400);
/// Most reports read per key (one per mailer; more is a misconfiguration).
pub const MAX_REPORTS_PER_KEY: usize = 256;

/// One sidecar's report for one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningReport {
    /// The version the mailer signs with.
    pub version: u32,
    /// The selector that version is published under.
    pub selector: String,
    /// When the mailer started signing with `version`.
    pub since: Timestamp,
    /// The reporting sidecar's id (host name by default).
    pub sidecar: String,
    /// When this report was last written.
    pub reported_at: Timestamp,
}

/// The directory holding every sidecar's report for a key.
pub fn reports_dir(state: &StateSettings, mount: &str, key: &str) -> String {
    format!("{}/signing/{mount}/{key}", state.path)
}

/// One sidecar's report path for a key.
pub fn report_path(state: &StateSettings, mount: &str, key: &str, sidecar: &str) -> String {
    format!("{}/{sidecar}", reports_dir(state, mount, key))
}

/// Writes (replaces) a sidecar's report.
pub async fn write_report(
    vault: &Vault,
    state: &StateSettings,
    mount: &str,
    key: &str,
    report: &SigningReport,
) -> Result<(), VaultError> {
    let path = report_path(state, mount, key, &report.sidecar);
    let data = serde_json::to_value(report).expect("a signing report serializes");
    vault
        .kv_write(&state.mount, &path, &data, None)
        .await
        .map(drop)
}

/// Every sidecar's report for a key (at most [`MAX_REPORTS_PER_KEY`]). A malformed entry is
/// skipped with a warning: it says nothing reliable about any mailer.
pub async fn read_reports(
    vault: &Vault,
    state: &StateSettings,
    mount: &str,
    key: &str,
) -> Result<Vec<SigningReport>, VaultError> {
    let dir = reports_dir(state, mount, key);
    let mut out = Vec::new();
    for name in vault
        .kv_list(&state.mount, &dir)
        .await?
        .into_iter()
        .filter(|n| !n.ends_with('/'))
        .take(MAX_REPORTS_PER_KEY)
    {
        let path = format!("{dir}/{name}");
        if let Some(e) = vault.kv_read(&state.mount, &path).await? {
            match serde_json::from_value::<SigningReport>(e.data) {
                Ok(r) => out.push(r),
                Err(err) => {
                    tracing::warn!(path, error = %err, "ignoring a malformed signing report")
                }
            }
        }
    }
    Ok(out)
}

/// The version a key signs with across mailers: the lowest over reports younger than
/// `max_age` at `now`; `None` when no report is fresh.
pub fn signing_version(
    reports: &[SigningReport],
    now: Timestamp,
    max_age: Duration,
) -> Option<u32> {
    let max_age = jiff::SignedDuration::try_from(max_age).unwrap_or(jiff::SignedDuration::MAX);
    reports
        .iter()
        .filter(|r| now.duration_since(r.reported_at) <= max_age)
        .map(|r| r.version)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(version: u32, reported_at: &str) -> SigningReport {
        SigningReport {
            version,
            selector: format!("kr{version}"),
            since: "2026-01-01T00:00:00Z".parse().unwrap(),
            sidecar: format!("mx{version}"),
            reported_at: reported_at.parse().unwrap(),
        }
    }

    #[test]
    fn the_lowest_fresh_report_wins_and_stale_ones_are_ignored() {
        let now: Timestamp = "2026-01-10T00:00:00Z".parse().unwrap();
        let day = Duration::from_secs(86_400);
        let reports = [
            report(3, "2026-01-09T23:00:00Z"),
            report(2, "2026-01-09T12:00:00Z"),
            report(1, "2026-01-01T00:00:00Z"), // a sidecar gone for nine days
        ];
        assert_eq!(signing_version(&reports, now, day), Some(2));
        assert_eq!(signing_version(&reports[..1], now, day), Some(3));
        assert_eq!(signing_version(&reports[2..], now, day), None);
        assert_eq!(signing_version(&[], now, day), None);
    }
}
