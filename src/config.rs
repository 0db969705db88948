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
    address: Option<String>,
    namespace: Option<String>,
    ca_cert: Option<PathBuf>,
    timeout: Option<Span>,
    allow_insecure_http: Option<bool>,
    token_file: Option<PathBuf>,
    approle: Option<RawAppRole>,
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
        if let Some(a) = &raw.address {
            url::Url::parse(a)
                .map_err(|e| ("vault.address", format!("{a:?} is not a URL: {e}")))?;
        }
        let approle = raw
            .approle
            .map(|a| -> Result<AppRoleSettings, (&'static str, String)> {
                let mount = a.mount.unwrap_or_else(|| "approle".into());
                crate::paths::check_mount(&mount).map_err(|r| ("vault.approle.mount", r))?;
                Ok(AppRoleSettings {
                    mount,
                    role_id_file: a.role_id_file.map(|p| resolve(base, p)),
                    secret_id_file: a.secret_id_file.map(|p| resolve(base, p)),
                })
            })
            .transpose()?;
        Ok(VaultSettings {
            address: raw.address,
            namespace: raw.namespace,
            ca_cert: raw.ca_cert.map(|p| resolve(base, p)),
            timeout: raw.timeout,
            allow_insecure_http: raw.allow_insecure_http.unwrap_or(false),
            token_file: raw.token_file.map(|p| resolve(base, p)),
            approle,
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

    #[test]
    fn line_col_is_one_based() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
