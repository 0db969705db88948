//! Events: what keyroll did or failed to do, as values. The executor produces them; the audit
//! log and the notifiers consume them. Events never carry key material or tokens.

use jiff::Timestamp;
use serde::Serialize;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Created,
    Rotated,
    Retired,
    Disposed,
    /// keyroll recorded a time Vault does not keep (bookkeeping; not notified).
    Recorded,
    /// Vault disagrees with the policy; the key was left alone.
    Drift,
    /// An action or a read failed.
    Failed,
    /// A notifier could not deliver (recorded in the audit log).
    NotifyFailed,
    /// A due retire or trim was stopped by a hold (stored data, DNS); the message says why.
    Blocked,
    /// `rewrap_before_retire`: apply took a census, rewrapped and took another census.
    Rewrapped,
    /// A version's DKIM record was written to DNS (first publication, or again).
    DnsPublished,
    /// Every authoritative server answers a version's exact record.
    DnsConfirmed,
    /// The mailer signs with a version (as its sidecar reports).
    DnsSigning,
    /// A record someone deleted or edited was put back.
    DnsRestored,
    /// A retired version's record was replaced by `p=` (RFC 6376 §3.6.1).
    DnsRevoked,
    /// A version's record was deleted.
    DnsRemoved,
    /// A DNS step failed (REFUSED, NOTAUTH/BADKEY, timeout, reload failed); exit 5.
    DnsFailed,
}

impl EventKind {
    /// Bookkeeping stays in the audit log; everything else reaches people.
    pub fn is_notifiable(self) -> bool {
        !matches!(self, EventKind::Recorded | EventKind::NotifyFailed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Rotated => "rotated",
            EventKind::Retired => "retired",
            EventKind::Disposed => "disposed",
            EventKind::Recorded => "recorded",
            EventKind::Drift => "drift",
            EventKind::Failed => "failed",
            EventKind::NotifyFailed => "notify_failed",
            EventKind::Blocked => "blocked",
            EventKind::Rewrapped => "rewrapped",
            EventKind::DnsPublished => "dns_published",
            EventKind::DnsConfirmed => "dns_confirmed",
            EventKind::DnsSigning => "dns_signing",
            EventKind::DnsRestored => "dns_restored",
            EventKind::DnsRevoked => "dns_revoked",
            EventKind::DnsRemoved => "dns_removed",
            EventKind::DnsFailed => "dns_failed",
        }
    }

    /// Something went wrong (counted as a failure in notification subjects).
    pub fn is_failure(self) -> bool {
        matches!(self, EventKind::Failed | EventKind::DnsFailed)
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub time: Timestamp,
    pub run_id: String,
    pub kind: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The version the event concerns: the new latest (created/rotated), the new minimum
    /// (retired: `min_decryption_version`, disposed: `min_available_version`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// A person-readable reason or error.
    pub message: String,
}

impl Event {
    pub fn new(run_id: &str, kind: EventKind, time: Timestamp, message: impl Into<String>) -> Self {
        Event {
            time,
            run_id: run_id.to_string(),
            kind,
            mount: None,
            key: None,
            version: None,
            message: message.into(),
        }
    }

    pub fn for_key(mut self, mount: &str, key: &str) -> Self {
        self.mount = Some(mount.to_string());
        self.key = Some(key.to_string());
        self
    }

    pub fn version(mut self, v: u32) -> Self {
        self.version = Some(v);
        self
    }

    /// One line for e-mails and text output.
    pub fn summary(&self) -> String {
        let what = match (&self.mount, &self.key) {
            (Some(m), Some(k)) => format!("{m}/keys/{k}"),
            _ => "keyroll".into(),
        };
        let v = self.version.map(|v| format!(" v{v}")).unwrap_or_default();
        format!(
            "{} {}{v} {what}: {}",
            self.time,
            self.kind.as_str(),
            self.message
        )
    }
}

/// A random identifier for one run, to correlate its events.
pub fn new_run_id() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}
