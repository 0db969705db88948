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
use keyroll::duration::Span;
use keyroll::render::{opendkim, OpenDkimSpec, OutputSpec, PemSpec, DEFAULT_SELECTOR_TEMPLATE};
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

        let mut keys = Vec::with_capacity(raw.keys.len());
        let mut seen = BTreeSet::new();
        for spanned in raw.keys {
            let line = line_of(spanned.span());
            let key = key_spec(spanned.into_inner(), line, &line_of)
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

/// Turns a TOML error into `file:line: field: message` when it points at a `key = value` line
/// (wrong type, unknown field, bad value), else `file:line:col: message` (broken syntax). Never
/// echoes the source line: a misplaced secret must not be printed back.
fn toml_error(path: &Path, text: &str, e: toml::de::Error) -> ConfigError {
    let field = e.span().and_then(|s| field_at(text, s.start));
    match (field, e.span()) {
        (Some(field), Some(span)) => ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_col(text, span.start).0,
            field,
            reason: e.message().trim().replace('\n', " "),
        },
        _ => ConfigError::from_toml(path, text, e),
    }
}

/// The dotted field name written on the line holding byte `offset` (`keys.format` for a
/// `format = ...` line under `[[keys]]`), if that line is a `key = value` line.
pub(crate) fn field_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[start..].lines().next().unwrap_or("");
    let (key, _) = line.split_once('=')?;
    let key: String = key
        .trim()
        .split('.')
        .map(|p| p.trim().trim_matches('"').trim_matches('\''))
        .collect::<Vec<_>>()
        .join(".");
    if key.is_empty()
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return None;
    }
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        .unwrap_or_default();
    Some(if table.is_empty() {
        key
    } else {
        format!("{table}.{key}")
    })
}

/// A duration in `[min, max]`, written like `30s`.
pub fn parse_bounded(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = Span::parse(s)?.std();
    if d < min {
        return Err(format!("{s:?} is below the minimum of {}", human(min)));
    }
    if d > max {
        return Err(format!("{s:?} is above the maximum of {}", human(max)));
    }
    Ok(d)
}

fn human(d: Duration) -> String {
    Span::from(d).to_string()
}

fn key_spec(
    k: RawKey,
    line: usize,
    line_of: &dyn Fn(std::ops::Range<usize>) -> usize,
) -> Result<KeySpec, FieldError> {
    let name = k.name.ok_or((
        None,
        "keys.name",
        "every [[keys]] entry needs a name".to_string(),
    ))?;
    let name = KeyName::new(&name).map_err(|e| (None, "keys.name", e.to_string()))?;
    let mount = k.mount.unwrap_or_else(|| DEFAULT_MOUNT.into());
    keyroll::policy::check_mount(&mount).map_err(|r| (None, "keys.mount", r))?;
    let format = k.format.ok_or((
        None,
        "keys.format",
        format!("key {name} has no format; use opendkim, pem or keyring-json"),
    ))?;
    let only = |field: &'static str, set: bool, fmt: &str| -> Result<(), FieldError> {
        if set {
            Err((
                None,
                field,
                format!("applies to format = \"{fmt}\" only; key {name} is {format}"),
            ))
        } else {
            Ok(())
        }
    };
    // Fields only the opendkim format reads, refused elsewhere (pem and keyring-json).
    let no_opendkim_fields = || -> Result<(), FieldError> {
        only("keys.domain", k.domain.is_some(), "opendkim")?;
        only("keys.selector", k.selector.is_some(), "opendkim")?;
        only(
            "keys.activate_after",
            k.activate_after.is_some(),
            "opendkim",
        )
    };
    let output = match format.as_str() {
        "opendkim" => {
            only("keys.private", k.private.is_some(), "pem")?;
            only("keys.public", k.public.is_some(), "pem")?;
            let domain = k.domain.clone().ok_or((
                None,
                "keys.domain",
                format!("key {name} is delivered for OpenDKIM and needs the signing domain"),
            ))?;
            let domain_line = Some(line_of(domain.span()));
            let domain = domain.into_inner();
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            opendkim::validate_domain(&domain).map_err(|r| (domain_line, "keys.domain", r))?;
            let (selector_line, selector_template) = match k.selector.clone() {
                Some(s) => (Some(line_of(s.span())), s.into_inner()),
                None => (None, DEFAULT_SELECTOR_TEMPLATE.to_string()),
            };
            // The first and the largest version bound every selector the template can give.
            for v in [1, u32::MAX] {
                opendkim::selector(&selector_template, name.as_str(), v)
                    .map_err(|r| (selector_line, "keys.selector", r))?;
            }
            let activate_after = match k.activate_after.clone() {
                None => None,
                Some(s) => {
                    let l = Some(line_of(s.span()));
                    Some(
                        parse_bounded(s.get_ref(), Duration::from_secs(1), MAX_ACTIVATE_AFTER)
                            .map_err(|r| (l, "keys.activate_after", r))?,
                    )
                }
            };
            OutputSpec::OpenDkim(OpenDkimSpec {
                domain,
                selector_template,
                activate_after,
            })
        }
        "pem" => {
            no_opendkim_fields()?;
            let spec = PemSpec {
                private: k.private.unwrap_or(true),
                public: k.public.unwrap_or(true),
            };
            if !spec.private && !spec.public {
                return Err((
                    None,
                    "keys.private",
                    "private = false and public = false leaves nothing to write".into(),
                ));
            }
            OutputSpec::Pem(spec)
        }
        "keyring-json" => {
            no_opendkim_fields()?;
            only("keys.private", k.private.is_some(), "pem")?;
            only("keys.public", k.public.is_some(), "pem")?;
            OutputSpec::KeyringJson
        }
        other => {
            return Err((
                None,
                "keys.format",
                format!("{other:?} is not a format; use opendkim, pem or keyring-json"),
            ))
        }
    };
    Ok(KeySpec {
        name,
        mount,
        output,
        line,
    })
}

fn reload_settings(
    r: RawReload,
    base: &Path,
    line_of: &dyn Fn(std::ops::Range<usize>) -> usize,
) -> Result<ReloadSettings, FieldError> {
    let timeout = match r.timeout {
        None => DEFAULT_RELOAD_TIMEOUT,
        Some(s) => {
            let l = Some(line_of(s.span()));
            parse_bounded(s.get_ref(), Duration::from_millis(1), MAX_RELOAD_TIMEOUT)
                .map_err(|e| (l, "reload.timeout", e))?
        }
    };
    let attempts = match r.attempts {
        None => DEFAULT_RELOAD_ATTEMPTS,
        Some(s) => {
            let a = *s.get_ref();
            if a == 0 || a > MAX_RELOAD_ATTEMPTS {
                return Err((
                    Some(line_of(s.span())),
                    "reload.attempts",
                    format!("{a} is out of range; use 1..={MAX_RELOAD_ATTEMPTS}"),
                ));
            }
            a
        }
    };
    let exactly_one = "give exactly one of signal + pidfile, command, or url";
    if r.process.is_some() && r.pidfile.is_none() {
        let s = r.process.as_ref().map(|p| line_of(p.span()));
        return Err((
            s,
            "reload.process",
            "names the process a pidfile must point at; it needs signal + pidfile".into(),
        ));
    }
    let method = match (r.signal, r.pidfile, r.command, r.url) {
        (Some(sig), Some(pidfile), None, None) => {
            let signal = ReloadSignal::parse(&sig).ok_or((
                None,
                "reload.signal",
                format!("{sig:?} is not a reload signal; use SIGHUP, SIGUSR1 or SIGUSR2"),
            ))?;
            let process = match r.process {
                None => None,
                Some(p) => {
                    let l = Some(line_of(p.span()));
                    let name = p.into_inner();
                    if name.is_empty()
                        || name.len() > MAX_PROCESS_NAME
                        || name.contains('/')
                        || name.chars().any(char::is_control)
                    {
                        return Err((
                            l,
                            "reload.process",
                            format!(
                                "{name:?} is not a process name; give the mailer's program name, \
                                 e.g. \"opendkim\""
                            ),
                        ));
                    }
                    Some(name)
                }
            };
            ReloadMethod::Signal {
                signal,
                pidfile: base.join(pidfile),
                process,
            }
        }
        (Some(_), None, None, None) => {
            return Err((
                None,
                "reload.pidfile",
                "signal needs a pidfile naming the mailer's process".into(),
            ))
        }
        (None, Some(_), None, None) => {
            return Err((
                None,
                "reload.signal",
                "pidfile needs a signal: SIGUSR1 for OpenDKIM, SIGHUP for most others".into(),
            ))
        }
        (None, None, Some(argv), None) => {
            if argv.is_empty() || argv[0].is_empty() {
                return Err((
                    None,
                    "reload.command",
                    "is empty; give the program and its arguments, e.g. [\"postfix\", \"reload\"]"
                        .into(),
                ));
            }
            ReloadMethod::Command { argv }
        }
        (None, None, None, Some(url)) => {
            let u = url::Url::parse(&url)
                .map_err(|e| (None, "reload.url", format!("{url:?} is not a URL: {e}")))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err((None, "reload.url", format!("{url} must be http or https")));
            }
            let method = r
                .method
                .unwrap_or_else(|| "POST".into())
                .to_ascii_uppercase();
            if !matches!(method.as_str(), "GET" | "POST" | "PUT") {
                return Err((
                    None,
                    "reload.method",
                    format!("{method:?}: use GET, POST or PUT"),
                ));
            }
            ReloadMethod::Url { url, method }
        }
        _ => return Err((None, "reload", exactly_one.into())),
    };
    Ok(ReloadSettings {
        method,
        timeout,
        attempts,
    })
}

/// `"0600"`, `"600"` or `"0o600"`: an octal permission mode, at most 0777.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim_start_matches("0o");
    let m = u32::from_str_radix(digits, 8)
        .map_err(|_| format!("{s:?} is not an octal mode; write it as a string like \"0600\""))?;
    if m > 0o777 {
        return Err(format!(
            "{s:?} has bits beyond 0777; setuid/setgid/sticky are not allowed"
        ));
    }
    Ok(m)
}

/// `"10%"` → 0.10, or a plain fraction `"0.1"`; at most 50 %.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|x| x / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a percentage; write e.g. \"10%\""))?;
    if !(0.0..=MAX_POLL_JITTER).contains(&v) {
        return Err(format!(
            "{s:?} is out of range; use 0% to {}%",
            MAX_POLL_JITTER * 100.0
        ));
    }
    Ok(v)
}

/// `user[:group]`, each a name or a number; `:group` alone changes only the group.
pub fn parse_owner(s: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = if user.is_empty() {
        None
    } else if let Ok(n) = user.parse::<u32>() {
        Some(n)
    } else {
        let u = nix::unistd::User::from_name(user)
            .map_err(|e| format!("looking up user {user:?}: {e}"))?
            .ok_or_else(|| format!("user {user:?} does not exist on this system"))?;
        Some(u.uid.as_raw())
    };
    let gid = match group {
        None => None,
        Some("") => return Err(format!("{s:?} has an empty group after ':'")),
        Some(g) => {
            if let Ok(n) = g.parse::<u32>() {
                Some(n)
            } else {
                let gr = nix::unistd::Group::from_name(g)
                    .map_err(|e| format!("looking up group {g:?}: {e}"))?
                    .ok_or_else(|| format!("group {g:?} does not exist on this system"))?;
                Some(gr.gid.as_raw())
            }
        }
    };
    if uid.is_none() && gid.is_none() {
        return Err(format!("{s:?} names neither a user nor a group"));
    }
    Ok((uid, gid))
}

fn read_token(p: &Path) -> Result<SecretString, String> {
    let text =
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    let t = text.trim();
    if t.is_empty() {
        return Err(format!("{} is empty", p.display()));
    }
    Ok(SecretString::from(t.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, String> {
        Config::from_toml(Path::new("/etc/sidecar.toml"), text).map_err(|e| e.to_string())
    }

    const MIN: &str = "output_dir = \"/out\"\n[[keys]]\nname = \"k\"\nformat = \"keyring-json\"\n";

    #[test]
    fn defaults_fill_a_minimal_file() {
        let c = load(MIN).unwrap();
        assert_eq!(c.output_dir, PathBuf::from("/out"));
        assert_eq!(c.file_mode, 0o600);
        assert_eq!(c.poll_interval, DEFAULT_POLL_INTERVAL);
        assert_eq!(c.listen.address.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.keys[0].mount, "transit");
        assert!(c.reload.is_none());
    }

    #[test]
    fn the_readme_example_loads() {
        let text = r#"
output_dir = "/etc/opendkim/keyroll"
file_mode = "0640"
owner = "0:0"
poll_interval = "30s"
poll_jitter = "10%"
[listen]
address = "127.0.0.1:8901"
[reload]
signal = "SIGUSR1"
pidfile = "/run/opendkim/opendkim.pid"
timeout = "10s"
[[keys]]
name = "dkim-example-com"
format = "opendkim"
domain = "Example.com."
selector = "kr{version}"
activate_after = "48h"
"#;
        let c = load(text).unwrap();
        assert_eq!(c.file_mode, 0o640);
        assert_eq!(c.owner, Some((Some(0), Some(0))));
        assert!((c.poll_jitter - 0.1).abs() < 1e-9);
        match &c.keys[0].output {
            OutputSpec::OpenDkim(s) => {
                assert_eq!(s.domain, "example.com");
                assert_eq!(s.activate_after, Some(Duration::from_secs(48 * 3600)));
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(
            c.reload.unwrap().method,
            ReloadMethod::Signal {
                signal: ReloadSignal::Usr1,
                pidfile: "/run/opendkim/opendkim.pid".into(),
                process: None,
            }
        );
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = load("output_dir = \"/out\"\n[[keys]]\nname = \"k\"\nformat = \"opendkim\"\n")
            .unwrap_err();
        assert!(e.starts_with("/etc/sidecar.toml:2: keys.domain:"), "{e}");
        let e = load(&format!("{MIN}bogus = 1\n")).unwrap_err();
        assert!(e.contains("/etc/sidecar.toml:5:"), "{e}");
        assert!(e.contains("bogus"), "{e}");
        let e = load(&format!("file_mode = \"0999\"\n{MIN}")).unwrap_err();
        assert!(e.starts_with("/etc/sidecar.toml:1: file_mode:"), "{e}");
    }

    #[test]
    fn options_of_another_format_are_refused() {
        let e = load(
            "output_dir = \"/o\"\n[[keys]]\nname = \"k\"\nformat = \"pem\"\ndomain = \"x.org\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("keys.domain: applies to format = \"opendkim\" only"),
            "{e}"
        );
    }

    #[test]
    fn reload_needs_exactly_one_method() {
        let e = load(&format!(
            "{MIN}[reload]\nsignal = \"SIGHUP\"\ncommand = [\"true\"]\n"
        ))
        .unwrap_err();
        assert!(e.contains("exactly one"), "{e}");
        let e = load(&format!(
            "{MIN}[reload]\nsignal = \"SIGKILL\"\npidfile = \"/p\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("reload.signal"), "{e}");
        let c = load(&format!(
            "{MIN}[reload]\ncommand = [\"postfix\", \"reload\"]\n"
        ))
        .unwrap();
        assert!(matches!(
            c.reload.unwrap().method,
            ReloadMethod::Command { .. }
        ));
    }

    #[test]
    fn a_public_listener_needs_a_token() {
        let e = load(&format!("{MIN}[listen]\naddress = \"0.0.0.0:8901\"\n")).unwrap_err();
        assert!(
            e.contains("listen.address") && e.contains("token_file"),
            "{e}"
        );
    }

    #[test]
    fn selectors_must_vary_by_version() {
        let e = load("output_dir = \"/o\"\n[[keys]]\nname = \"k\"\nformat = \"opendkim\"\ndomain = \"x.org\"\nselector = \"fixed\"\n")
            .unwrap_err();
        assert!(e.contains("keys.selector"), "{e}");
    }

    #[test]
    fn every_duration_has_a_bound_and_the_error_points_at_its_line() {
        let key = "[[keys]]\nname = \"k\"\nformat = \"opendkim\"\ndomain = \"x.org\"\n";
        for (text, want) in [
            (
                format!("output_dir = \"/o\"\npoll_interval = \"18446744073709551615s\"\n{key}"),
                ":2: poll_interval:",
            ),
            (
                format!("output_dir = \"/o\"\npoll_interval = \"2d\"\n{key}"),
                ":2: poll_interval: \"2d\" is above the maximum of 1day",
            ),
            (
                format!("output_dir = \"/o\"\npoll_interval = \"10ms\"\n{key}"),
                ":2: poll_interval: \"10ms\" is below",
            ),
            (
                format!("output_dir = \"/o\"\nsnapshot_grace = \"2d\"\n{key}"),
                ":2: snapshot_grace:",
            ),
            (
                format!("output_dir = \"/o\"\n{key}activate_after = \"91d\"\n"),
                ":6: keys.activate_after:",
            ),
            (
                format!(
                    "output_dir = \"/o\"\n[reload]\ncommand = [\"x\"]\ntimeout = \"1h\"\n{key}"
                ),
                ":4: reload.timeout:",
            ),
            (
                format!("output_dir = \"/o\"\n[reload]\ncommand = [\"x\"]\nattempts = 0\n{key}"),
                ":4: reload.attempts:",
            ),
        ] {
            let e = load(&text).unwrap_err();
            assert!(e.contains(want), "want {want:?} in {e}");
        }
        let c = load(&format!("output_dir = \"/o\"\npoll_interval = \"1day\"\nsnapshot_grace = \"5s\"\n{key}activate_after = \"90d\"\n")).unwrap();
        assert_eq!(c.poll_interval, MAX_POLL_INTERVAL);
        assert_eq!(c.snapshot_grace, Duration::from_secs(5));
        assert_eq!(c.publish_options().grace, Duration::from_secs(5));
    }

    #[test]
    fn names_that_end_up_in_paths_are_checked_at_load() {
        let base = "output_dir = \"/o\"\n[[keys]]\nname = \"k\"\nformat = \"opendkim\"\n";
        for (extra, want) in [
            ("domain = \"../../etc\"\n", ":5: keys.domain:"),
            ("domain = \"a/b.org\"\n", ":5: keys.domain:"),
            (
                "domain = \"x.org\"\nselector = \"../{version}\"\n",
                ":6: keys.selector:",
            ),
            (
                "domain = \"x.org\"\nselector = \"{name}/{version}\"\n",
                ":6: keys.selector:",
            ),
            // The largest version must still give a DNS label (63 characters at most).
            (
                &format!(
                    "domain = \"x.org\"\nselector = \"{}{{version}}\"\n",
                    "s".repeat(60)
                ),
                ":6: keys.selector:",
            ),
        ] {
            let e = load(&format!("{base}{extra}")).unwrap_err();
            assert!(e.contains(want), "{extra}: want {want:?} in {e}");
        }
        let e = load("output_dir = \"/o u t\"\n[[keys]]\nname = \"k\"\nformat = \"opendkim\"\ndomain = \"x.org\"\n").unwrap_err();
        assert!(
            e.contains(":1: output_dir:") && e.contains("KeyTable"),
            "{e}"
        );
        // Not an opendkim key: the same directory is fine.
        load("output_dir = \"/o u t\"\n[[keys]]\nname = \"k\"\nformat = \"pem\"\n").unwrap();
    }

    #[test]
    fn toml_errors_on_a_key_line_name_the_field() {
        let e = load(&format!("{MIN}[reload]\ncommand = \"not-a-list\"\n")).unwrap_err();
        assert!(e.starts_with("/etc/sidecar.toml:6: reload.command:"), "{e}");
        let e = load("output_dir = 7\n").unwrap_err();
        assert!(e.starts_with("/etc/sidecar.toml:1: output_dir:"), "{e}");
        // Broken syntax names the line and column.
        let e = load("output_dir = \"/o\n").unwrap_err();
        assert!(e.starts_with("/etc/sidecar.toml:1:"), "{e}");
        let e = load("[[keys]]\nname = \"k\"\nformat = \"pem\"\n").unwrap_err();
        assert!(
            e.starts_with("/etc/sidecar.toml:1: output_dir: missing"),
            "{e}"
        );
    }

    #[test]
    fn a_process_name_needs_a_pidfile_and_must_be_a_name() {
        let e = load(&format!(
            "{MIN}[reload]\ncommand = [\"x\"]\nprocess = \"opendkim\"\n"
        ))
        .unwrap_err();
        assert!(e.contains(":7: reload.process:"), "{e}");
        let e = load(&format!("{MIN}[reload]\nsignal = \"SIGUSR1\"\npidfile = \"/p\"\nprocess = \"/usr/sbin/opendkim\"\n")).unwrap_err();
        assert!(e.contains(":8: reload.process:"), "{e}");
        let c = load(&format!(
            "{MIN}[reload]\nsignal = \"SIGUSR1\"\npidfile = \"/p\"\nprocess = \"opendkim\"\n"
        ))
        .unwrap();
        assert!(matches!(
            c.reload.unwrap().method,
            ReloadMethod::Signal { process: Some(p), .. } if p == "opendkim"
        ));
    }

    #[test]
    fn modes_owners_and_percentages_parse() {
        assert_eq!(parse_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_mode("0o640").unwrap(), 0o640);
        assert!(parse_mode("4755").is_err());
        assert!(parse_mode("rw").is_err());
        assert_eq!(parse_owner("root").unwrap(), (Some(0), None));
        assert_eq!(parse_owner(":0").unwrap(), (None, Some(0)));
        assert!(parse_owner("no-such-user-xyz").is_err());
        assert!((parse_percent("25%").unwrap() - 0.25).abs() < 1e-9);
        assert!(parse_percent("80%").is_err());
    }
}
