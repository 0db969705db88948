//! The sidecar's config file (`sidecar.toml`): where to write, how to reach Vault, how to reload
//! the mailer, and which keys to deliver in which format.
//!
//! Two stages, as for the rotator's policy: `toml` deserializes a raw shape that refuses unknown
//! fields, then [`Config::from_toml`] validates it into types nothing downstream checks again.
//! Every error names the file, the line and the field (`sidecar.toml:14: keys.domain: ...`):
//! a bad value points at its own line, a missing field at the line of the table that lacks it
//! (line 1 for the top level), and TOML's own errors (wrong type, unknown field) are given the
//! field written on the line they point at. Every duration has a named upper bound, and
//! everything that ends up in a file name or KeyTable (domains, selectors, the output directory)
//! is checked here, so a bad value stops the sidecar at load (exit 64), not at its first render.
//! Loading reads two small files besides the config itself: the `/refresh` bearer token (so a
//! changed token file is picked up by a config reload) and, for `owner`, the user database.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyroll::config::{line_col, ConfigError, RawVault, VaultSettings};
use keyroll::render::{opendkim, OutputSpec};
use keyroll::KeyName;
use secrecy::SecretString;
use serde::Deserialize;
use toml::Spanned;

/// Defaults for fields a file may leave out. Named so the README can cite them.
pub const DEFAULT_MOUNT: &str = "transit";
pub const DEFAULT_FILE_MODE: u32 = keyroll::publish::DEFAULT_FILE_MODE;
pub const DEFAULT_PUBLIC_FILE_MODE: u32 = keyroll::publish::DEFAULT_PUBLIC_FILE_MODE;
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(30);
/// Shortest poll interval accepted: one metadata read per key per interval must stay cheap.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Longest poll interval accepted: a day. Longer would leave a rotation undelivered for days
/// (and an absurd value would overflow the clock).
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// How long a superseded snapshot stays readable (see `keyroll::publish`).
pub const DEFAULT_SNAPSHOT_GRACE: Duration = keyroll::publish::DEFAULT_SNAPSHOT_GRACE;
/// Longest grace accepted for superseded snapshots: a day.
pub const MAX_SNAPSHOT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Longest staged activation accepted: 90 days (DNS propagation takes hours, not months).
pub const MAX_ACTIVATE_AFTER: Duration = Duration::from_secs(90 * 86_400);
/// Longest reload timeout accepted: 10 minutes.
pub const MAX_RELOAD_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_POLL_JITTER: f64 = 0.10;
/// Jitter above this would make "poll interval" meaningless.
pub const MAX_POLL_JITTER: f64 = 0.5;
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8901";
pub const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed attempts before a reload failure is reported (`/healthz`, ERROR); retries go on.
pub const DEFAULT_RELOAD_ATTEMPTS: u32 = 5;
pub const MAX_RELOAD_ATTEMPTS: u32 = 20;
/// Longest process name the kernel keeps in `/proc/<pid>/comm`.
pub const MAX_PROCESS_NAME: usize = 255;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    vault: Option<Spanned<RawVault>>,
    output_dir: Option<Spanned<PathBuf>>,
    file_mode: Option<Spanned<String>>,
    public_file_mode: Option<Spanned<String>>,
    owner: Option<Spanned<String>>,
    poll_interval: Option<Spanned<String>>,
    poll_jitter: Option<Spanned<String>>,
    snapshot_grace: Option<Spanned<String>>,
    listen: Option<Spanned<RawListen>>,
    reload: Option<Spanned<RawReload>>,
    dns: Option<Spanned<RawDnsCheck>>,
    report: Option<Spanned<RawReport>>,
    #[serde(default)]
    keys: Vec<Spanned<RawKey>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawListen {
    enabled: Option<bool>,
    address: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReload {
    signal: Option<String>,
    pidfile: Option<PathBuf>,
    process: Option<Spanned<String>>,
    command: Option<Vec<String>>,
    url: Option<String>,
    method: Option<String>,
    timeout: Option<Spanned<String>>,
    attempts: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Option<String>,
    mount: Option<String>,
    format: Option<String>,
    // opendkim
    domain: Option<Spanned<String>>,
    selector: Option<Spanned<String>>,
    activate_after: Option<Spanned<String>>,
    activation: Option<Spanned<String>>,
    dns_zone: Option<Spanned<String>>,
    // pem
    private: Option<bool>,
    public: Option<bool>,
}

/// The HTTP listener (`/refresh`, `/healthz`, `/readyz`, `/metrics`).
#[derive(Debug, Clone)]
pub struct ListenSettings {
    pub enabled: bool,
    pub address: SocketAddr,
    pub token_file: Option<PathBuf>,
    /// The bearer token `POST /refresh` requires, read from `token_file` at load.
    pub token: Option<SecretString>,
}

impl PartialEq for ListenSettings {
    fn eq(&self, o: &Self) -> bool {
        use secrecy::ExposeSecret;
        self.enabled == o.enabled
            && self.address == o.address
            && self.token_file == o.token_file
            && self.token.as_ref().map(|t| t.expose_secret().to_string())
                == o.token.as_ref().map(|t| t.expose_secret().to_string())
    }
}

/// A signal the sidecar may send to the mailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadSignal {
    Hup,
    Usr1,
    Usr2,
}

impl ReloadSignal {
    fn parse(s: &str) -> Option<Self> {
        match s.trim_start_matches("SIG").to_ascii_uppercase().as_str() {
            "HUP" => Some(Self::Hup),
            "USR1" => Some(Self::Usr1),
            "USR2" => Some(Self::Usr2),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hup => "SIGHUP",
            Self::Usr1 => "SIGUSR1",
            Self::Usr2 => "SIGUSR2",
        }
    }
}

/// How the mailer is told to re-read its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadMethod {
    /// Send `signal` to the PID in `pidfile` (re-read on every reload), once that PID is
    /// checked to be the mailer (`process`: its expected name, if given).
    Signal {
        signal: ReloadSignal,
        pidfile: PathBuf,
        process: Option<String>,
    },
    /// Run a program (no shell); success is exit status 0 within the timeout.
    Command { argv: Vec<String> },
    /// An HTTP request; success is any 2xx within the timeout.
    Url { url: String, method: String },
}

/// `[reload]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadSettings {
    pub method: ReloadMethod,
    pub timeout: Duration,
    /// Failed attempts before the failure is reported; retries go on with capped backoff.
    pub attempts: u32,
}

/// One `[[keys]]` entry: a transit key and the format it is delivered in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub name: KeyName,
    pub mount: String,
    pub output: OutputSpec,
    /// `activation = "dns"`: the zone holding the key's records (None: the timer decides).
    pub dns_zone: Option<String>,
    /// Line of the entry in the config file, for messages.
    pub line: usize,
}

impl KeySpec {
    pub fn format(&self) -> &'static str {
        format_name(&self.output)
    }
}

pub fn format_name(o: &OutputSpec) -> &'static str {
    match o {
        OutputSpec::OpenDkim(_) => "opendkim",
        OutputSpec::Pem(_) => "pem",
        OutputSpec::KeyringJson => "keyring-json",
    }
}

/// The validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub vault: VaultSettings,
    /// Absolute: OpenDKIM's KeyTable carries paths under it.
    pub output_dir: PathBuf,
    pub file_mode: u32,
    pub public_file_mode: u32,
    pub owner: Option<(Option<u32>, Option<u32>)>,
    pub poll_interval: Duration,
    /// Fraction of `poll_interval` each wait may be shortened by (never lengthened).
    pub poll_jitter: f64,
    /// How long a superseded snapshot stays readable.
    pub snapshot_grace: Duration,
    pub listen: ListenSettings,
    pub reload: Option<ReloadSettings>,
    /// `[dns]`: how records are checked for keys with `activation = "dns"`.
    pub dns: Option<DnsCheck>,
    /// `[report]`: signing reports to keyroll's KV.
    pub report: ReportSettings,
    pub keys: Vec<KeySpec>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml(path, &keyroll::config::read_file(path)?)
    }

    /// Validates config text; `path` names the file in messages and anchors relative paths.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(path, text, e))?;
        let line_of = |span: std::ops::Range<usize>| line_col(text, span.start).0;
        let at = |line: usize, field: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            field: field.to_string(),
            reason,
        };
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = std::path::absolute(&base).unwrap_or(base);

        let (vault_line, raw_vault) = match raw.vault {
            Some(v) => (line_of(v.span()), v.into_inner()),
            None => (TOP_LINE, RawVault::default()),
        };
        let vault =
            VaultSettings::from_raw(raw_vault, &base).map_err(|(f, r)| at(vault_line, f, r))?;

        let output_dir = raw.output_dir.ok_or_else(|| {
            at(
                TOP_LINE,
                "output_dir",
                "missing; give the directory the mailer reads, e.g. \"/etc/opendkim/keyroll\""
                    .into(),
            )
        })?;
        let od_line = line_of(output_dir.span());
        let output_dir = std::path::absolute(base.join(output_dir.into_inner()))
            .map_err(|e| at(od_line, "output_dir", e.to_string()))?;
        if output_dir.parent().is_none() {
            return Err(at(
                od_line,
                "output_dir",
                "is the root directory; use a directory of its own".into(),
            ));
        }

        let mode = |v: Option<Spanned<String>>, field: &str, default: u32| match v {
            None => Ok(default),
            Some(s) => {
                let line = line_of(s.span());
                parse_mode(s.get_ref()).map_err(|r| at(line, field, r))
            }
        };
        let file_mode = mode(raw.file_mode, "file_mode", DEFAULT_FILE_MODE)?;
        let public_file_mode = mode(
            raw.public_file_mode,
            "public_file_mode",
            DEFAULT_PUBLIC_FILE_MODE,
        )?;
        let owner = match raw.owner {
            None => None,
            Some(s) => {
                let line = line_of(s.span());
                Some(parse_owner(s.get_ref()).map_err(|r| at(line, "owner", r))?)
            }
        };
        let bounded = |v: Option<Spanned<String>>,
                       field: &str,
                       default: Duration,
                       (min, max): (Duration, Duration)| match v {
            None => Ok(default),
            Some(s) => {
                let line = line_of(s.span());
                parse_bounded(s.get_ref(), min, max).map_err(|r| at(line, field, r))
            }
        };
        let poll_interval = bounded(
            raw.poll_interval,
            "poll_interval",
            DEFAULT_POLL_INTERVAL,
            (MIN_POLL_INTERVAL, MAX_POLL_INTERVAL),
        )?;
        let snapshot_grace = bounded(
            raw.snapshot_grace,
            "snapshot_grace",
            DEFAULT_SNAPSHOT_GRACE,
            (Duration::from_secs(1), MAX_SNAPSHOT_GRACE),
        )?;
        let poll_jitter = match raw.poll_jitter {
            None => DEFAULT_POLL_JITTER,
            Some(s) => {
                let line = line_of(s.span());
                parse_percent(s.get_ref()).map_err(|r| at(line, "poll_jitter", r))?
            }
        };

        let listen = {
            let (line, l) = match raw.listen {
                Some(s) => (line_of(s.span()), s.into_inner()),
                None => (TOP_LINE, RawListen::default()),
            };
            let address_text = l.address.unwrap_or_else(|| DEFAULT_LISTEN.into());
            let address: SocketAddr = address_text.parse().map_err(|_| {
                at(
                    line,
                    "listen.address",
                    format!("{address_text:?} is not an ip:port, e.g. \"127.0.0.1:8901\""),
                )
            })?;
            let token_file = l.token_file.map(|p| base.join(p));
            let token = match &token_file {
                None => None,
                Some(p) => Some(read_token(p).map_err(|r| at(line, "listen.token_file", r))?),
            };
            if !address.ip().is_loopback() && token.is_none() {
                return Err(at(
                    line,
                    "listen.address",
                    format!(
                        "{address} is not a loopback address; anyone who can reach it could trigger \
                         refreshes, so set listen.token_file (a bearer token for POST /refresh) or \
                         listen on 127.0.0.1"
                    ),
                ));
            }
            ListenSettings {
                enabled: l.enabled.unwrap_or(true),
                address,
                token_file,
                token,
            }
        };

        let reload = match raw.reload {
            None => None,
            Some(s) => {
                let line = line_of(s.span());
                Some(
                    reload_settings(s.into_inner(), &base, &line_of)
                        .map_err(|(l, f, r)| at(l.unwrap_or(line), f, r))?,
                )
            }
        };

        let dns = match raw.dns {
            None => None,
            Some(s) => {
                let line = line_of(s.span());
                Some(
                    dnsgate::dns_check(s.into_inner(), &line_of)
                        .map_err(|(l, f, r)| at(l.unwrap_or(line), f, r))?,
                )
            }
        };
        let report = dnsgate::report(raw.report, &line_of)
            .map_err(|(l, f, r)| at(l.unwrap_or(TOP_LINE), f, r))?;

        let mut keys = Vec::with_capacity(raw.keys.len());
        let mut seen = BTreeSet::new();
        for spanned in raw.keys {
            let line = line_of(spanned.span());
            let key = key_spec(spanned.into_inner(), line, dns.as_ref(), &line_of)
                .map_err(|(l, f, r)| at(l.unwrap_or(line), f, r))?;
            if !seen.insert((key.mount.clone(), key.name.clone(), key.format())) {
                return Err(at(
                    line,
                    "keys.name",
                    format!(
                        "key {} on mount {:?} is already delivered as {}; give each key and \
                         format once",
                        key.name,
                        key.mount,
                        key.format()
                    ),
                ));
            }
            if matches!(key.output, OutputSpec::OpenDkim(_)) {
                opendkim::keytable_dir(&output_dir)
                    .map_err(|e| at(od_line, "output_dir", e.to_string()))?;
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(at(
                TOP_LINE,
                "keys",
                "no [[keys]] entries; the sidecar would have nothing to deliver".into(),
            ));
        }

        Ok(Config {
            path: path.to_path_buf(),
            vault,
            output_dir,
            file_mode,
            public_file_mode,
            owner,
            poll_interval,
            poll_jitter,
            snapshot_grace,
            listen,
            reload,
            dns,
            report,
            keys,
        })
    }

    pub fn publish_options(&self) -> keyroll::publish::PublishOptions {
        keyroll::publish::PublishOptions {
            file_mode: self.file_mode,
            public_file_mode: self.public_file_mode,
            owner: self.owner,
            grace: self.snapshot_grace,
            ..Default::default()
        }
    }
}

/// The line reported for a field missing from the top-level table (which starts at line 1).
const TOP_LINE: usize = 1;

/// A field's problem: the line of its value when known (else the caller's table line), the
/// field, the reason.
type FieldError = (Option<usize>, &'static str, String);

mod dnsgate;
mod sections;
mod values;

pub use dnsgate::{DnsCheck, GateServers, ReportSettings};
use dnsgate::{RawDnsCheck, RawReport};

use sections::{key_spec, reload_settings};
pub use values::{parse_bounded, parse_mode, parse_owner, parse_percent};
use values::{read_token, toml_error};

#[cfg(test)]
mod tests;
