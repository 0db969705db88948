//! Config sections both binaries share (`[vault]`, `[audit]`, `[notify]`), the error type
//! every config loader returns, and the helpers that put a line number on every error.
//!
//! Raw shapes here are the serde half of the two-stage load; each has a `from_raw` that turns
//! it into a validated settings type or a `(field, reason)` pair that the loader decorates with
//! the file name and line (`from_raw_at` also gives the byte span of the offending value, so
//! the loader can name its exact line).

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::bounds::{
    MAX_MAX_CLOCK_SKEW, MAX_NOTIFY_TIMEOUT, MAX_VAULT_TIMEOUT, MIN_MAX_CLOCK_SKEW,
};
use crate::duration::Span;

/// Default HTTP timeout for every Vault request: keyroll never waits forever on Vault.
pub const DEFAULT_VAULT_TIMEOUT_SECS: u64 = 30;
/// Default `[vault] max_clock_skew`: how far the local clock may be from Vault's (its `Date`
/// header) before keyroll refuses to change anything. Schedules are days; 30 s is noise there,
/// while a clock minutes off is a broken NTP worth stopping for.
pub const DEFAULT_MAX_CLOCK_SKEW_SECS: u64 = 30;
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
    #[error("{}:{line}: {field}: {message} (column {col})", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        col: usize,
        /// The dotted field the line belongs to (`keys.rotate_every`), or the table.
        field: String,
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
    /// Turns a toml error into `file:line: field: message (column c)`, without echoing the
    /// source line (a misplaced secret must not be printed back).
    pub fn from_toml(path: &Path, text: &str, e: toml::de::Error) -> Self {
        let lines = LineIndex::new(text);
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        let (line, col) = lines.line_col(offset);
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            col,
            field: field_at(text, &lines, line),
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

/// 1-based line and column of a byte offset. Scans from the start: for one lookup; a loader
/// that needs many uses a [`LineIndex`].
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    LineIndex::new(text).line_col(offset)
}

/// Byte offsets of line starts, built once per file, so each lookup is a binary search rather
/// than a scan from the top (which made loading a policy quadratic in its keys).
#[derive(Debug, Clone)]
pub struct LineIndex {
    starts: Vec<usize>,
    len: usize,
}

impl LineIndex {
    pub fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex {
            starts,
            len: text.len(),
        }
    }

    /// 1-based line of a byte offset (offsets past the end count as the last line).
    pub fn line(&self, offset: usize) -> usize {
        self.line_col(offset).0
    }

    /// 1-based line and (byte) column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.len);
        let i = self.starts.partition_point(|s| *s <= offset).max(1) - 1;
        (i + 1, offset - self.starts[i] + 1)
    }

    /// The text of 1-based `line` (without its newline).
    fn text<'t>(&self, text: &'t str, line: usize) -> &'t str {
        let start = self
            .starts
            .get(line.wrapping_sub(1))
            .copied()
            .unwrap_or(self.len);
        let end = self
            .starts
            .get(line)
            .map(|e| e.saturating_sub(1))
            .unwrap_or(self.len);
        text.get(start..end.max(start)).unwrap_or("")
    }
}

/// The dotted field a line of a TOML file belongs to, for a syntax error's message: the table
/// header in force (`[vault]`, `[[keys]]` → `keys`) joined with the key written on that line,
/// if any. Only names are shown, never values. `(top level)` before any header.
fn field_at(text: &str, lines: &LineIndex, line: usize) -> String {
    let key_of = |l: &str| -> Option<String> {
        let (k, _) = l.split_once('=')?;
        let k = k.trim().trim_matches('"');
        let plain = !k.is_empty()
            && k.len() <= 64
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        plain.then(|| k.to_string())
    };
    let header_of = |l: &str| -> Option<String> {
        let l = l.trim();
        let inner = l
            .strip_prefix("[[")
            .and_then(|r| r.split("]]").next())
            .or_else(|| l.strip_prefix('[').and_then(|r| r.split(']').next()))?;
        let h = inner.trim();
        let plain = !h.is_empty()
            && h.len() <= 64
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        plain.then(|| h.to_string())
    };
    let this = lines.text(text, line);
    if let Some(h) = header_of(this) {
        return h;
    }
    let key = if this.trim_start().starts_with('[') {
        None
    } else {
        key_of(this)
    };
    let header = (1..line).rev().find_map(|l| {
        let t = lines.text(text, l);
        t.trim_start()
            .starts_with('[')
            .then(|| header_of(t))
            .flatten()
    });
    match (header, key) {
        (Some(h), Some(k)) => format!("{h}.{k}"),
        (Some(h), None) => h,
        (None, Some(k)) => k,
        (None, None) => "(top level)".into(),
    }
}

/// A field that failed validation: its dotted name, why, and where its value sits in the file
/// (when known), so the loader can name the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
    pub span: Option<Range<usize>>,
}

impl FieldError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        FieldError {
            field,
            reason: reason.into(),
            span: None,
        }
    }

    pub fn at(mut self, span: Range<usize>) -> Self {
        self.span = Some(span);
        self
    }

    /// Into the `ConfigError` of `path`, on the line of its span (else `fallback_line`).
    pub fn into_config(self, path: &Path, lines: &LineIndex, fallback_line: usize) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line: self
                .span
                .map(|s| lines.line(s.start))
                .unwrap_or(fallback_line),
            field: self.field.to_string(),
            reason: self.reason,
        }
    }
}

impl From<FieldError> for (&'static str, String) {
    fn from(e: FieldError) -> Self {
        (e.field, e.reason)
    }
}

/// Parses a spanned duration string and checks it against `cap`.
pub fn span_field(
    field: &'static str,
    value: &Spanned<String>,
    cap: std::time::Duration,
) -> Result<Span, FieldError> {
    Span::parse(value.get_ref())
        .and_then(|s| s.at_most(cap))
        .map_err(|r| FieldError::new(field, r).at(value.span()))
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
    address: Option<Spanned<RawAddresses>>,
    namespace: Option<String>,
    ca_cert: Option<PathBuf>,
    timeout: Option<Spanned<String>>,
    allow_insecure_http: Option<bool>,
    token_file: Option<PathBuf>,
    approle: Option<RawAppRole>,
    max_clock_skew: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawAppRole {
    mount: Option<Spanned<String>>,
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
    /// At most [`MAX_VAULT_TIMEOUT`].
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
        Self::from_raw_at(raw, base).map_err(Into::into)
    }

    /// As [`VaultSettings::from_raw`], with the span of the offending value.
    pub fn from_raw_at(raw: RawVault, base: &Path) -> Result<Self, FieldError> {
        // Several addresses (a Raft cluster's nodes) are kept as one comma-separated string.
        let address = match raw.address {
            None => None,
            Some(spanned) => {
                let span = spanned.span();
                let at = |r: String| FieldError::new("vault.address", r).at(span.clone());
                let joined = match spanned.into_inner() {
                    RawAddresses::One(a) => a,
                    RawAddresses::Many(list) => {
                        if list.iter().any(|a| a.contains(',')) {
                            return Err(at(
                                "a list entry contains a comma; give one address per entry".into(),
                            ));
                        }
                        list.join(",")
                    }
                };
                split_vault_addresses(&joined).map_err(at)?;
                Some(joined)
            }
        };
        let timeout = raw
            .timeout
            .as_ref()
            .map(|t| span_field("vault.timeout", t, MAX_VAULT_TIMEOUT))
            .transpose()?;
        let approle = raw
            .approle
            .map(|a| -> Result<AppRoleSettings, FieldError> {
                let mount = match a.mount {
                    None => "approle".to_string(),
                    Some(m) => {
                        crate::paths::check_mount(m.get_ref())
                            .map_err(|r| FieldError::new("vault.approle.mount", r).at(m.span()))?;
                        m.into_inner()
                    }
                };
                Ok(AppRoleSettings {
                    mount,
                    role_id_file: a.role_id_file.map(|p| resolve(base, p)),
                    secret_id_file: a.secret_id_file.map(|p| resolve(base, p)),
                })
            })
            .transpose()?;
        let max_clock_skew = raw
            .max_clock_skew
            .as_ref()
            .map(|m| {
                let d = span_field("vault.max_clock_skew", m, MAX_MAX_CLOCK_SKEW)?;
                if d.std() < MIN_MAX_CLOCK_SKEW {
                    return Err(FieldError::new(
                        "vault.max_clock_skew",
                        format!(
                            "{d} is below the minimum of {}s (the Date header is only good to \
                             about a second; fix NTP rather than widening this)",
                            MIN_MAX_CLOCK_SKEW.as_secs()
                        ),
                    )
                    .at(m.span()));
                }
                Ok(d)
            })
            .transpose()?;
        Ok(VaultSettings {
            address,
            namespace: raw.namespace,
            ca_cert: raw.ca_cert.map(|p| resolve(base, p)),
            timeout,
            allow_insecure_http: raw.allow_insecure_http.unwrap_or(false),
            token_file: raw.token_file.map(|p| resolve(base, p)),
            approle,
            max_clock_skew,
        })
    }

    /// The per-request timeout in force (the configured one, else the default).
    pub fn timeout_or_default(&self) -> std::time::Duration {
        self.timeout
            .map(Span::std)
            .unwrap_or(std::time::Duration::from_secs(DEFAULT_VAULT_TIMEOUT_SECS))
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
    url: Spanned<String>,
    secret_file: Option<PathBuf>,
    bearer_token_file: Option<PathBuf>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawEmail {
    host: String,
    port: Option<u16>,
    tls: Option<SmtpTls>,
    from: Spanned<String>,
    to: Spanned<Vec<String>>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    timeout: Option<Spanned<String>>,
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
        Self::from_raw_at(raw, base).map_err(Into::into)
    }

    /// As [`NotifySettings::from_raw`], with the span of the offending value.
    pub fn from_raw_at(raw: RawNotify, base: &Path) -> Result<Self, FieldError> {
        let timeout_default = Span::from_secs(DEFAULT_NOTIFY_TIMEOUT_SECS);
        let mut webhooks = Vec::new();
        for w in raw.webhook {
            let bad_url = |r: String| FieldError::new("notify.webhook.url", r).at(w.url.span());
            let url = url::Url::parse(w.url.get_ref())
                .map_err(|e| bad_url(format!("{:?} is not a URL: {e}", w.url.get_ref())))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(bad_url(format!("{url} must be http or https")));
            }
            let timeout = w
                .timeout
                .as_ref()
                .map(|t| span_field("notify.webhook.timeout", t, MAX_NOTIFY_TIMEOUT))
                .transpose()?;
            webhooks.push(WebhookSettings {
                url,
                secret_file: w.secret_file.map(|p| resolve(base, p)),
                bearer_token_file: w.bearer_token_file.map(|p| resolve(base, p)),
                timeout: timeout.unwrap_or(timeout_default),
            });
        }
        let email = match raw.email {
            None => None,
            Some(e) => {
                if e.to.get_ref().is_empty() {
                    return Err(
                        FieldError::new("notify.email.to", "give at least one recipient")
                            .at(e.to.span()),
                    );
                }
                for (addr, span) in std::iter::once((e.from.get_ref(), e.from.span()))
                    .chain(e.to.get_ref().iter().map(|a| (a, e.to.span())))
                {
                    addr.parse::<lettre::Address>().map_err(|err| {
                        FieldError::new(
                            "notify.email",
                            format!("{addr:?} is not an e-mail address: {err}"),
                        )
                        .at(span)
                    })?;
                }
                let timeout = e
                    .timeout
                    .as_ref()
                    .map(|t| span_field("notify.email.timeout", t, MAX_NOTIFY_TIMEOUT))
                    .transpose()?;
                let tls = e.tls.unwrap_or(SmtpTls::Starttls);
                Some(EmailSettings {
                    port: e.port.unwrap_or(match tls {
                        SmtpTls::None => 25,
                        SmtpTls::Starttls => 587,
                        SmtpTls::Tls => 465,
                    }),
                    host: e.host,
                    tls,
                    from: e.from.into_inner(),
                    to: e.to.into_inner(),
                    username: e.username,
                    password_file: e.password_file.map(|p| resolve(base, p)),
                    timeout: timeout.unwrap_or(timeout_default),
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
        assert_eq!(line_col("ab\ncd", 99), (2, 3));
        assert_eq!(line_col("", 0), (1, 1));
        let idx = LineIndex::new("a\n\nb\n");
        assert_eq!(idx.line(0), 1);
        assert_eq!(idx.line(2), 2);
        assert_eq!(idx.line(3), 3);
        assert_eq!(idx.line(5), 4);
    }

    #[test]
    fn a_syntax_error_names_the_field_of_its_line_but_not_its_value() {
        let text =
            "[vault]\naddress = \"https://v\"\n[[keys]]\nname = \"a\"\nrotate_every = \"hunter2\n";
        let e: toml::de::Error = toml::from_str::<toml::Table>(text).unwrap_err();
        let msg = ConfigError::from_toml(Path::new("/p.toml"), text, e).to_string();
        assert!(msg.starts_with("/p.toml:5: keys.rotate_every: "), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        let lines = LineIndex::new("x = 1\n[a.b]\n\n");
        assert_eq!(field_at("x = 1\n[a.b]\n\n", &lines, 1), "x");
        assert_eq!(field_at("x = 1\n[a.b]\n\n", &lines, 3), "a.b");
        assert_eq!(
            field_at("[[keys]\n", &LineIndex::new("[[keys]\n"), 1),
            "(top level)"
        );
    }

    #[test]
    fn vault_and_notify_timeouts_are_capped_at_their_line() {
        let raw: RawVault =
            toml::from_str("address = \"http://127.0.0.1:1\"\ntimeout = \"11m\"\n").unwrap();
        let e = VaultSettings::from_raw_at(raw, Path::new("/")).unwrap_err();
        assert_eq!(e.field, "vault.timeout");
        assert!(e.reason.contains("cap of 10m"), "{}", e.reason);
        assert!(e.span.is_some());
        let raw: RawNotify =
            toml::from_str("[[webhook]]\nurl = \"https://h/\"\ntimeout = \"1000d\"\n").unwrap();
        let e = NotifySettings::from_raw_at(raw, Path::new("/")).unwrap_err();
        assert_eq!(e.field, "notify.webhook.timeout");
    }
}
