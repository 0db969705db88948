//! Config sections both binaries share (`[vault]`, `[audit]`, `[notify]`) and the error type
//! every config loader returns.
//!
//! Raw shapes here are the serde half of the two-stage load; each has a `from_raw` that turns
//! it into a validated settings type or a `(field, reason)` pair that the loader decorates with
//! the file name and line.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::duration::Span;

/// Default HTTP timeout for every Vault request: keyroll never waits forever on Vault.
pub const DEFAULT_VAULT_TIMEOUT_SECS: u64 = 30;
/// Longest `[vault] timeout` accepted: a request that may hang longer is as bad as no timeout.
pub const MAX_VAULT_TIMEOUT_SECS: u64 = 600;
/// Default `[vault] max_clock_skew`: how far the local clock may be from Vault's (its `Date`
/// header) before keyroll refuses to change anything. Schedules are days; 30 s is noise there,
/// while a clock minutes off is a broken NTP worth stopping for.
pub const DEFAULT_MAX_CLOCK_SKEW_SECS: u64 = 30;
/// Smallest `max_clock_skew` accepted: `Date` has whole seconds and the request takes time, so
/// the measurement itself is only good to about a second.
pub const MIN_MAX_CLOCK_SKEW_SECS: u64 = 2;
/// Largest `max_clock_skew` accepted (one hour): beyond that the check would mean nothing.
pub const MAX_MAX_CLOCK_SKEW_SECS: u64 = 3600;
/// Most Vault addresses one `[vault] address` may list (Raft clusters have 3, 5 or 7 nodes).
pub const MAX_VAULT_ADDRESSES: usize = 16;

/// Splits a Vault address list (`"https://a:8200, https://b:8200"`), checking each entry is a
/// URL and none repeats. Used for the config file and, by the client, for the environment.
pub fn split_vault_addresses(list: &str) -> Result<Vec<url::Url>, String> {
    let mut out: Vec<url::Url> = Vec::new();
    for (i, part) in list.split(',').map(str::trim).enumerate() {
        if part.is_empty() {
            return Err(format!(
                "entry {} of {list:?} is empty; separate addresses with single commas",
                i + 1
            ));
        }
        let u = url::Url::parse(part).map_err(|e| format!("{part:?} is not a URL: {e}"))?;
        if out.iter().any(|o| o.origin() == u.origin()) {
            return Err(format!("{part:?} is listed twice"));
        }
        out.push(u);
    }
    if out.len() > MAX_VAULT_ADDRESSES {
        return Err(format!(
            "{} addresses; at most {MAX_VAULT_ADDRESSES} are accepted",
            out.len()
        ));
    }
    Ok(out)
}

/// `address = "https://a:8200"`, `"https://a:8200,https://b:8200"` or a list of strings.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum RawAddresses {
    One(String),
    Many(Vec<String>),
}
/// Default timeout for a notifier (webhook POST, SMTP session).
pub const DEFAULT_NOTIFY_TIMEOUT_SECS: u64 = 10;

/// A config file that could not be used. Display is one line: `file:line: field: reason`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{col}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{}{}: {field}: {reason}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        reason: String,
    },
}

impl ConfigError {
    /// Turns a toml error into `file:line:col: message`, without echoing the source line (a
    /// misplaced secret must not be printed back).
    pub fn from_toml(path: &Path, text: &str, e: toml::de::Error) -> Self {
        let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            col,
            message: e.message().trim().replace('\n', " "),
        }
    }
}

/// Reads a config file's text, naming the file on failure (shared by every loader).
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawVault {
    address: Option<RawAddresses>,
    namespace: Option<String>,
    ca_cert: Option<PathBuf>,
    timeout: Option<Span>,
    allow_insecure_http: Option<bool>,
    token_file: Option<PathBuf>,
    approle: Option<RawAppRole>,
    max_clock_skew: Option<Span>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawAppRole {
    mount: Option<String>,
    role_id_file: Option<PathBuf>,
    secret_id_file: Option<PathBuf>,
}

/// The `[vault]` section: how to reach and authenticate to Vault. Environment variables
/// (`VAULT_ADDR`, …) override these at client construction, as they do for Vault Agent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VaultSettings {
    pub address: Option<String>,
    pub namespace: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub timeout: Option<Span>,
    pub allow_insecure_http: bool,
    pub token_file: Option<PathBuf>,
    pub approle: Option<AppRoleSettings>,
    /// How far the local clock may be from Vault's; default [`DEFAULT_MAX_CLOCK_SKEW_SECS`].
    pub max_clock_skew: Option<Span>,
}

/// AppRole login; the IDs come from files (or `KEYROLL_ROLE_ID`/`KEYROLL_SECRET_ID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRoleSettings {
    pub mount: String,
    pub role_id_file: Option<PathBuf>,
    pub secret_id_file: Option<PathBuf>,
}

impl VaultSettings {
    pub fn from_raw(raw: RawVault, base: &Path) -> Result<Self, (&'static str, String)> {
        // Several addresses (a Raft cluster's nodes) are kept as one comma-separated string.
        let address = match raw.address {
            None => None,
            Some(RawAddresses::One(a)) => Some(a),
            Some(RawAddresses::Many(list)) => {
                if list.iter().any(|a| a.contains(',')) {
                    return Err((
                        "vault.address",
                        "a list entry contains a comma; give one address per entry".into(),
                    ));
                }
                Some(list.join(","))
            }
        };
        if let Some(a) = &address {
            split_vault_addresses(a).map_err(|r| ("vault.address", r))?;
        }
        let approle = raw
            .approle
            .map(|a| -> Result<AppRoleSettings, (&'static str, String)> {
                let mount = a.mount.unwrap_or_else(|| "approle".into());
                crate::policy::check_mount(&mount).map_err(|r| ("vault.approle.mount", r))?;
                Ok(AppRoleSettings {
                    mount,
                    role_id_file: a.role_id_file.map(|p| resolve(base, p)),
                    secret_id_file: a.secret_id_file.map(|p| resolve(base, p)),
                })
            })
            .transpose()?;
        if let Some(t) = raw.timeout {
            if t.std().as_secs() > MAX_VAULT_TIMEOUT_SECS {
                return Err((
                    "vault.timeout",
                    format!("{t} is longer than the maximum of {MAX_VAULT_TIMEOUT_SECS}s"),
                ));
            }
        }
        if let Some(m) = raw.max_clock_skew {
            let d = m.std();
            if d < std::time::Duration::from_secs(MIN_MAX_CLOCK_SKEW_SECS)
                || d > std::time::Duration::from_secs(MAX_MAX_CLOCK_SKEW_SECS)
            {
                return Err((
                    "vault.max_clock_skew",
                    format!(
                        "{m} is outside {MIN_MAX_CLOCK_SKEW_SECS}s..={MAX_MAX_CLOCK_SKEW_SECS}s \
                         (the Date header is only good to about a second; fix NTP rather than \
                         widening this)"
                    ),
                ));
            }
        }
        Ok(VaultSettings {
            address,
            namespace: raw.namespace,
            ca_cert: raw.ca_cert.map(|p| resolve(base, p)),
            timeout: raw.timeout,
            allow_insecure_http: raw.allow_insecure_http.unwrap_or(false),
            token_file: raw.token_file.map(|p| resolve(base, p)),
            approle,
            max_clock_skew: raw.max_clock_skew,
        })
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    path: PathBuf,
}

/// `[audit]`: append one JSON object per event to this file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub path: PathBuf,
}

impl AuditSettings {
    pub fn from_raw(raw: RawAudit, base: &Path) -> Result<Self, (&'static str, String)> {
        Ok(AuditSettings {
            path: resolve(base, raw.path),
        })
    }
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    #[serde(default)]
    webhook: Vec<RawWebhook>,
    email: Option<RawEmail>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    secret_file: Option<PathBuf>,
    bearer_token_file: Option<PathBuf>,
    timeout: Option<Span>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawEmail {
    host: String,
    port: Option<u16>,
    tls: Option<SmtpTls>,
    from: String,
    to: Vec<String>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    timeout: Option<Span>,
    subject_prefix: Option<String>,
}

/// How the SMTP session is protected.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP: only for a relay on loopback or a trusted network.
    None,
    /// STARTTLS, required (port 587).
    Starttls,
    /// Implicit TLS (port 465).
    Tls,
}

/// `[[notify.webhook]]`: POST each event as JSON; with a secret, sign it (HMAC-SHA256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    pub url: url::Url,
    pub secret_file: Option<PathBuf>,
    /// Sent as `Authorization: Bearer <token>` (e.g. keyroll-sidecar's `/refresh` token).
    pub bearer_token_file: Option<PathBuf>,
    pub timeout: Span,
}

/// `[notify.email]`: one summary mail per run to the people affected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub from: String,
    pub to: Vec<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub timeout: Span,
    pub subject_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NotifySettings {
    pub webhooks: Vec<WebhookSettings>,
    pub email: Option<EmailSettings>,
}

impl NotifySettings {
    pub fn from_raw(raw: RawNotify, base: &Path) -> Result<Self, (&'static str, String)> {
        let timeout_default = Span::from_secs(DEFAULT_NOTIFY_TIMEOUT_SECS);
        let mut webhooks = Vec::new();
        for w in raw.webhook {
            let url = url::Url::parse(&w.url).map_err(|e| {
                (
                    "notify.webhook.url",
                    format!("{:?} is not a URL: {e}", w.url),
                )
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(("notify.webhook.url", format!("{url} must be http or https")));
            }
            webhooks.push(WebhookSettings {
                url,
                secret_file: w.secret_file.map(|p| resolve(base, p)),
                bearer_token_file: w.bearer_token_file.map(|p| resolve(base, p)),
                timeout: w.timeout.unwrap_or(timeout_default),
            });
        }
        let email = match raw.email {
            None => None,
            Some(e) => {
                if e.to.is_empty() {
                    return Err(("notify.email.to", "give at least one recipient".into()));
                }
                for addr in std::iter::once(&e.from).chain(e.to.iter()) {
                    addr.parse::<lettre::Address>().map_err(|err| {
                        (
                            "notify.email",
                            format!("{addr:?} is not an e-mail address: {err}"),
                        )
                    })?;
                }
                let tls = e.tls.unwrap_or(SmtpTls::Starttls);
                Some(EmailSettings {
                    port: e.port.unwrap_or(match tls {
                        SmtpTls::None => 25,
                        SmtpTls::Starttls => 587,
                        SmtpTls::Tls => 465,
                    }),
                    host: e.host,
                    tls,
                    from: e.from,
                    to: e.to,
                    username: e.username,
                    password_file: e.password_file.map(|p| resolve(base, p)),
                    timeout: e.timeout.unwrap_or(timeout_default),
                    subject_prefix: e.subject_prefix.unwrap_or_else(|| "[keyroll]".into()),
                })
            }
        };
        Ok(NotifySettings { webhooks, email })
    }

    pub fn is_empty(&self) -> bool {
        self.webhooks.is_empty() && self.email.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault(toml_text: &str) -> Result<VaultSettings, (&'static str, String)> {
        let raw: RawVault = toml::from_str(toml_text).unwrap();
        VaultSettings::from_raw(raw, Path::new("/etc/keyroll"))
    }

    #[test]
    fn several_vault_addresses_as_a_list_or_a_comma_string() {
        let a = vault("address = [\"https://a:8200\", \"https://b:8200\"]").unwrap();
        assert_eq!(a.address.as_deref(), Some("https://a:8200,https://b:8200"));
        let b = vault("address = \"https://a:8200, https://b:8200\"").unwrap();
        assert_eq!(
            split_vault_addresses(b.address.as_deref().unwrap())
                .unwrap()
                .len(),
            2
        );
        for (bad, why) in [
            ("address = \"https://a:8200,,https://b:8200\"", "empty"),
            (
                "address = [\"https://a:8200\", \"https://a:8200/\"]",
                "twice",
            ),
            ("address = [\"https://a:8200,https://b:8200\"]", "comma"),
            ("address = \"a b\"", "not a URL"),
        ] {
            let (field, reason) = vault(bad).unwrap_err();
            assert_eq!(field, "vault.address");
            assert!(reason.contains(why), "{bad}: {reason}");
        }
        let many: Vec<String> = (0..=MAX_VAULT_ADDRESSES)
            .map(|i| format!("\"https://n{i}:8200\""))
            .collect();
        let (_, reason) = vault(&format!("address = [{}]", many.join(","))).unwrap_err();
        assert!(reason.contains("at most"), "{reason}");
    }

    #[test]
    fn vault_timeout_and_clock_skew_bounds_are_enforced() {
        assert!(vault("timeout = \"600s\"").is_ok());
        assert_eq!(vault("timeout = \"601s\"").unwrap_err().0, "vault.timeout");
        assert!(vault("max_clock_skew = \"2s\"").is_ok());
        assert!(vault("max_clock_skew = \"1h\"").is_ok());
        for bad in ["1s", "61m"] {
            let e = vault(&format!("max_clock_skew = \"{bad}\"")).unwrap_err();
            assert_eq!(e.0, "vault.max_clock_skew");
        }
    }

    #[test]
    fn line_col_is_one_based() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
