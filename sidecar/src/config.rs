//! The sidecar's config file (`sidecar.toml`): where to write, how to reach Vault, how to reload
//! the mailer, and which keys to deliver in which format.
//!
//! Two stages, as for the rotator's policy: `toml` deserializes a raw shape that refuses unknown
//! fields, then [`Config::from_toml`] validates it into types nothing downstream checks again.
//! Every error names the file, the line and the field (`sidecar.toml:14: keys.domain: ...`).
//! Loading reads two small files besides the config itself: the `/refresh` bearer token (so a
//! changed token file is picked up by a config reload) and, for `owner`, the user database.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyroll::config::{line_col, ConfigError, RawVault, VaultSettings};
use keyroll::duration::Span;
use keyroll::render::{OpenDkimSpec, OutputSpec, PemSpec, DEFAULT_SELECTOR_TEMPLATE};
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
pub const DEFAULT_POLL_JITTER: f64 = 0.10;
/// Jitter above this would make "poll interval" meaningless.
pub const MAX_POLL_JITTER: f64 = 0.5;
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8901";
pub const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_RELOAD_ATTEMPTS: u32 = 5;
/// Cap on reload attempts per publish: a mailer that never reloads must not be hammered forever.
pub const MAX_RELOAD_ATTEMPTS: u32 = 20;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    vault: RawVault,
    output_dir: Option<Spanned<PathBuf>>,
    file_mode: Option<Spanned<String>>,
    public_file_mode: Option<Spanned<String>>,
    owner: Option<Spanned<String>>,
    poll_interval: Option<Spanned<String>>,
    poll_jitter: Option<Spanned<String>>,
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
    command: Option<Vec<String>>,
    url: Option<String>,
    method: Option<String>,
    timeout: Option<Span>,
    attempts: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Option<String>,
    mount: Option<String>,
    format: Option<String>,
    // opendkim
    domain: Option<String>,
    selector: Option<String>,
    activate_after: Option<Span>,
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
    /// Send `signal` to the PID in `pidfile` (re-read on every reload).
    Signal {
        signal: ReloadSignal,
        pidfile: PathBuf,
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
    /// Fraction of `poll_interval` each wait may be shortened or lengthened by.
    pub poll_jitter: f64,
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
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(path, text, e))?;
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

        let vault = VaultSettings::from_raw(raw.vault, &base).map_err(|(f, r)| at(0, f, r))?;

        let output_dir = raw.output_dir.ok_or_else(|| {
            at(
                0,
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
        let poll_interval = match raw.poll_interval {
            None => DEFAULT_POLL_INTERVAL,
            Some(s) => {
                let line = line_of(s.span());
                let d = Span::parse(s.get_ref())
                    .map_err(|r| at(line, "poll_interval", r))?
                    .std();
                if d < MIN_POLL_INTERVAL {
                    return Err(at(
                        line,
                        "poll_interval",
                        format!(
                            "{:?} is below the minimum of {}ms",
                            s.get_ref(),
                            MIN_POLL_INTERVAL.as_millis()
                        ),
                    ));
                }
                d
            }
        };
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
                None => (0, RawListen::default()),
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
                Some(reload_settings(s.into_inner(), &base).map_err(|(f, r)| at(line, f, r))?)
            }
        };

        let mut keys = Vec::with_capacity(raw.keys.len());
        let mut seen = BTreeSet::new();
        for spanned in raw.keys {
            let line = line_of(spanned.span());
            let key = key_spec(spanned.into_inner(), line).map_err(|(f, r)| at(line, f, r))?;
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
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(at(
                0,
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
            ..Default::default()
        }
    }
}

fn key_spec(k: RawKey, line: usize) -> Result<KeySpec, (&'static str, String)> {
    let name = k
        .name
        .ok_or(("keys.name", "every [[keys]] entry needs a name".to_string()))?;
    let name = KeyName::new(&name).map_err(|e| ("keys.name", e.to_string()))?;
    let mount = k.mount.unwrap_or_else(|| DEFAULT_MOUNT.into());
    keyroll::policy::check_mount(&mount).map_err(|r| ("keys.mount", r))?;
    let format = k.format.ok_or((
        "keys.format",
        format!("key {name} has no format; use opendkim, pem or keyring-json"),
    ))?;
    let only = |field: &'static str, set: bool, fmt: &str| -> Result<(), (&'static str, String)> {
        if set {
            Err((
                field,
                format!("applies to format = \"{fmt}\" only; key {name} is {format}"),
            ))
        } else {
            Ok(())
        }
    };
    // Fields only the opendkim format reads, refused elsewhere (pem and keyring-json).
    let no_opendkim_fields = || -> Result<(), (&'static str, String)> {
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
            let domain = k.domain.ok_or((
                "keys.domain",
                format!("key {name} is delivered for OpenDKIM and needs the signing domain"),
            ))?;
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            let selector_template = k
                .selector
                .unwrap_or_else(|| DEFAULT_SELECTOR_TEMPLATE.into());
            if !selector_template.contains("{version}") {
                return Err((
                    "keys.selector",
                    format!(
                        "{selector_template:?} has no {{version}}; every version needs its own \
                         selector (DKIM selectors are never reused)"
                    ),
                ));
            }
            OutputSpec::OpenDkim(OpenDkimSpec {
                domain,
                selector_template,
                activate_after: k.activate_after.map(Span::std),
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

fn reload_settings(r: RawReload, base: &Path) -> Result<ReloadSettings, (&'static str, String)> {
    let timeout = r.timeout.map(Span::std).unwrap_or(DEFAULT_RELOAD_TIMEOUT);
    let attempts = r.attempts.unwrap_or(DEFAULT_RELOAD_ATTEMPTS);
    if attempts == 0 || attempts > MAX_RELOAD_ATTEMPTS {
        return Err((
            "reload.attempts",
            format!("{attempts} is out of range; use 1..={MAX_RELOAD_ATTEMPTS}"),
        ));
    }
    let exactly_one = "give exactly one of signal + pidfile, command, or url";
    let method = match (r.signal, r.pidfile, r.command, r.url) {
        (Some(sig), Some(pidfile), None, None) => {
            let signal = ReloadSignal::parse(&sig).ok_or((
                "reload.signal",
                format!("{sig:?} is not a reload signal; use SIGHUP, SIGUSR1 or SIGUSR2"),
            ))?;
            ReloadMethod::Signal {
                signal,
                pidfile: base.join(pidfile),
            }
        }
        (Some(_), None, None, None) => {
            return Err((
                "reload.pidfile",
                "signal needs a pidfile naming the mailer's process".into(),
            ))
        }
        (None, Some(_), None, None) => {
            return Err((
                "reload.signal",
                "pidfile needs a signal: SIGUSR1 for OpenDKIM, SIGHUP for most others".into(),
            ))
        }
        (None, None, Some(argv), None) => {
            if argv.is_empty() || argv[0].is_empty() {
                return Err((
                    "reload.command",
                    "is empty; give the program and its arguments, e.g. [\"postfix\", \"reload\"]"
                        .into(),
                ));
            }
            ReloadMethod::Command { argv }
        }
        (None, None, None, Some(url)) => {
            let u = url::Url::parse(&url)
                .map_err(|e| ("reload.url", format!("{url:?} is not a URL: {e}")))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(("reload.url", format!("{url} must be http or https")));
            }
            let method = r
                .method
                .unwrap_or_else(|| "POST".into())
                .to_ascii_uppercase();
            if !matches!(method.as_str(), "GET" | "POST" | "PUT") {
                return Err(("reload.method", format!("{method:?}: use GET, POST or PUT")));
            }
            ReloadMethod::Url { url, method }
        }
        _ => return Err(("reload", exactly_one.into())),
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
                pidfile: "/run/opendkim/opendkim.pid".into()
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
