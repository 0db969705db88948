//! The DNS config sections, two-stage like `crate::config`: serde shapes (`RawDnsTarget`,
//! `RawKeyDns`), then validated types (`DnsTarget`, `KeyDns`) or a `(field, reason)` pair the
//! policy loader decorates with file and line.
//!
//! ```toml
//! [[dns.target]]
//! name = "primary"
//! kind = "rfc2136"                 # dynamic UPDATE with TSIG
//! zone = "example.com"
//! server = "ns1.example.com:53"    # the primary that takes UPDATEs
//! tsig_key = "keyroll"
//! tsig_algorithm = "hmac-sha256"   # hmac-sha256 | hmac-sha384 | hmac-sha512
//! tsig_secret_file = "/etc/keyroll/tsig.key"   # base64, as in knot.conf / named.conf
//! ttl = "5m"
//! # servers = ["ns1.example.com:53", "ns2.example.com:53"]  # else the zone's NS set
//!
//! [[dns.target]]
//! name = "files"
//! kind = "zonefile"                # write an $INCLUDE file and reload the server
//! zone = "example.org"
//! path = "/etc/bind/keyroll-dkim.inc"
//! reload = ["rndc", "reload", "example.org"]
//! servers = ["127.0.0.1:53"]       # where to check that the records are served
//!
//! # per DKIM key:
//! [keys.dns]
//! target = "primary"
//! domain = "example.com"
//! selector = "kr{version}"
//! revoke_after = "7d"
//! remove_after = "30d"
//! ```
//!
//! The TSIG secret comes only from a file: an inline `tsig_secret` is refused (without echoing
//! it), and there is no flag for it. The file is read when the client is built, not here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::records::{check_name, in_zone, SelectorTemplate};
use crate::config::{ConfigError, LineIndex};
use crate::duration::Span;
use crate::KeyType;

/// Default time for one DNS request (query or UPDATE) before it counts as a timeout.
pub const DEFAULT_DNS_TIMEOUT_SECS: u64 = 5;
/// Longest request timeout accepted.
pub const MAX_DNS_TIMEOUT_SECS: u64 = 120;
/// Default TTL of published TXT records: short, so a revocation reaches resolvers soon.
pub const DEFAULT_RECORD_TTL_SECS: u32 = 300;
/// Shortest and longest record TTL accepted.
pub const MIN_RECORD_TTL_SECS: u32 = 1;
pub const MAX_RECORD_TTL_SECS: u32 = 86_400;
/// Port of authoritative servers found through the zone's NS set.
pub const DEFAULT_DNS_PORT: u16 = 53;
/// Most servers a target may list to check.
pub const MAX_CHECK_SERVERS: usize = 32;
/// Default time a zone-file reload command may run.
pub const DEFAULT_RELOAD_TIMEOUT_SECS: u64 = 30;
/// Longest reload timeout accepted.
pub const MAX_RELOAD_TIMEOUT_SECS: u64 = 600;
/// Default grace after a version's retirement before its record is revoked: longer than
/// Postfix's default queue lifetime (5 days), so mail signed just before retirement and still
/// in a retry queue verifies.
pub const DEFAULT_REVOKE_AFTER_SECS: u64 = 7 * 86_400;
/// Default time a revoked record (`p=`) stays before it is deleted.
pub const DEFAULT_REMOVE_AFTER_SECS: u64 = 30 * 86_400;
/// Longest `revoke_after` / `remove_after` accepted.
pub const MAX_GRACE_SECS: u64 = 3 * 365 * 86_400;

type Invalid = (&'static str, String);

/// A `[[dns.target]]` entry as written.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDnsTarget {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub zone: Option<String>,
    pub ttl: Option<Span>,
    pub timeout: Option<Span>,
    pub servers: Option<Vec<String>>,
    pub ns_port: Option<u16>,
    // rfc2136
    pub server: Option<String>,
    pub tsig_key: Option<String>,
    pub tsig_algorithm: Option<String>,
    pub tsig_secret_file: Option<PathBuf>,
    /// Only present to refuse it with a clear message; its value is never read or shown.
    pub tsig_secret: Option<serde::de::IgnoredAny>,
    // zonefile
    pub path: Option<PathBuf>,
    pub reload: Option<Vec<String>>,
    pub reload_timeout: Option<Span>,
}

/// The `[dns]` section: `[[dns.target]]` entries.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    #[serde(default)]
    pub target: Vec<RawDnsTarget>,
}

/// A DKIM key's `dns` table as written.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawKeyDns {
    pub target: Option<String>,
    pub domain: Option<String>,
    pub selector: Option<String>,
    pub revoke_after: Option<Span>,
    pub remove_after: Option<Span>,
    /// Ignore sidecar signing reports older than this (default
    /// `signing::DEFAULT_REPORT_MAX_AGE`).
    pub signing_report_max_age: Option<Span>,
}

/// TSIG algorithms keyroll signs with (RFC 8945 §6: hmac-sha256 is the recommended one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsigAlgorithm {
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

impl TsigAlgorithm {
    pub const ALL: [TsigAlgorithm; 3] = [
        TsigAlgorithm::HmacSha256,
        TsigAlgorithm::HmacSha384,
        TsigAlgorithm::HmacSha512,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TsigAlgorithm::HmacSha256 => "hmac-sha256",
            TsigAlgorithm::HmacSha384 => "hmac-sha384",
            TsigAlgorithm::HmacSha512 => "hmac-sha512",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s.to_ascii_lowercase())
    }

    /// HMAC output length; RFC 8945 §6 wants keys at least this long.
    pub fn mac_len(self) -> usize {
        match self {
            TsigAlgorithm::HmacSha256 => 32,
            TsigAlgorithm::HmacSha384 => 48,
            TsigAlgorithm::HmacSha512 => 64,
        }
    }
}

/// Which TSIG key to sign UPDATEs with; the secret stays in its file until the client is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsigSpec {
    /// Key name as the server knows it (`keyroll` in `key: - id: keyroll`).
    pub key_name: String,
    pub algorithm: TsigAlgorithm,
    pub secret_file: PathBuf,
}

/// Where to check that records are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckServers {
    /// These servers (`host:port`).
    Listed(Vec<String>),
    /// The zone's NS set, each name's addresses, at this port.
    ZoneNs { port: u16 },
}

/// An RFC 2136 target: UPDATEs to `server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rfc2136Target {
    /// The primary that accepts UPDATEs (`host:port`).
    pub server: String,
    pub tsig: TsigSpec,
}

/// A zone-file target: an `$INCLUDE`-able file and the command that makes the server reload it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneFileTarget {
    pub path: PathBuf,
    /// argv, run without a shell.
    pub reload: Vec<String>,
    pub reload_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    Rfc2136(Rfc2136Target),
    ZoneFile(ZoneFileTarget),
}

/// A validated `[[dns.target]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub name: String,
    /// Lowercase, without the trailing dot.
    pub zone: String,
    /// TTL of the records keyroll writes, in seconds.
    pub ttl: u32,
    /// Per-request timeout.
    pub timeout: Duration,
    pub check: CheckServers,
    pub kind: TargetKind,
}

/// Every DNS target by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsTargets(pub BTreeMap<String, DnsTarget>);

impl DnsTargets {
    pub fn from_raw(raw: RawDns, base: &Path) -> Result<Self, Invalid> {
        let mut out = BTreeMap::new();
        for t in raw.target {
            let t = DnsTarget::from_raw(t, base)?;
            if out.contains_key(&t.name) {
                return Err((
                    "dns.target.name",
                    format!(
                        "target {:?} is defined twice; give each a distinct name",
                        t.name
                    ),
                ));
            }
            out.insert(t.name.clone(), t);
        }
        Ok(DnsTargets(out))
    }

    pub fn get(&self, name: &str) -> Option<&DnsTarget> {
        self.0.get(name)
    }
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

/// `host:port` with a non-empty host and a non-zero port (`[v6]:port` for IPv6).
pub fn check_server(s: &str) -> Result<(), String> {
    let bad = || {
        Err(format!(
            "{s:?} is not host:port (e.g. \"ns1.example.com:53\", \"192.0.2.1:53\", \"[2001:db8::1]:53\")"
        ))
    };
    let Some((host, port)) = s.rsplit_once(':') else {
        return bad();
    };
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
        Some(_) => return bad(),
        // An IPv6 address needs brackets, else its last group reads as the port.
        None if host.contains(':') => return bad(),
        None => host,
    };
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains('/') {
        return bad();
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => bad(),
    }
}

fn whole_secs(span: Span, field: &'static str, min: u64, max: u64) -> Result<u64, Invalid> {
    let d = span.std();
    if d.subsec_nanos() != 0 {
        return Err((field, format!("{span} is not a whole number of seconds")));
    }
    let s = d.as_secs();
    if s < min || s > max {
        return Err((
            field,
            format!("{span} is out of range; use {min}s..={max}s"),
        ));
    }
    Ok(s)
}

impl DnsTarget {
    pub fn from_raw(raw: RawDnsTarget, base: &Path) -> Result<Self, Invalid> {
        let name = raw
            .name
            .ok_or(("dns.target.name", "every target needs a name".to_string()))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err((
                "dns.target.name",
                format!("{name:?} may contain only letters, digits, '-' and '_'"),
            ));
        }
        let zone = raw.zone.ok_or((
            "dns.target.zone",
            format!("target {name} needs the zone its records live in"),
        ))?;
        let zone = zone.trim_end_matches('.').to_ascii_lowercase();
        check_name(&zone, "zone").map_err(|r| ("dns.target.zone", r))?;
        let ttl = match raw.ttl {
            None => DEFAULT_RECORD_TTL_SECS,
            Some(s) => whole_secs(
                s,
                "dns.target.ttl",
                MIN_RECORD_TTL_SECS.into(),
                MAX_RECORD_TTL_SECS.into(),
            )? as u32,
        };
        let timeout = match raw.timeout {
            None => Duration::from_secs(DEFAULT_DNS_TIMEOUT_SECS),
            Some(s) if s.std() > Duration::from_secs(MAX_DNS_TIMEOUT_SECS) => {
                return Err((
                    "dns.target.timeout",
                    format!("{s} is longer than {MAX_DNS_TIMEOUT_SECS}s"),
                ))
            }
            Some(s) => s.std(),
        };
        let listed = raw.servers.filter(|s| !s.is_empty());
        if let Some(list) = &listed {
            if list.len() > MAX_CHECK_SERVERS {
                return Err((
                    "dns.target.servers",
                    format!("{} servers listed; at most {MAX_CHECK_SERVERS}", list.len()),
                ));
            }
            for s in list {
                check_server(s).map_err(|r| ("dns.target.servers", r))?;
            }
        }
        if listed.is_some() && raw.ns_port.is_some() {
            return Err((
                "dns.target.ns_port",
                "ns_port applies to servers found through the NS set; drop it when servers are \
                 listed"
                    .into(),
            ));
        }
        if raw.tsig_secret.is_some() {
            return Err((
                "dns.target.tsig_secret",
                "a TSIG secret is never written into the policy; put it in a file readable only \
                 by keyroll and name that file with tsig_secret_file"
                    .into(),
            ));
        }
        let kind_name = raw.kind.as_deref().unwrap_or("");
        let only = |field: &'static str, present: bool, kind: &str| {
            if present {
                Err((
                    field,
                    format!(
                        "target {name} is kind {kind_name:?}; {field} belongs to kind {kind:?}"
                    ),
                ))
            } else {
                Ok(())
            }
        };
        let kind = match kind_name {
            "rfc2136" => {
                only("dns.target.path", raw.path.is_some(), "zonefile")?;
                only("dns.target.reload", raw.reload.is_some(), "zonefile")?;
                only(
                    "dns.target.reload_timeout",
                    raw.reload_timeout.is_some(),
                    "zonefile",
                )?;
                let server = raw.server.ok_or((
                    "dns.target.server",
                    format!(
                        "target {name} needs the primary server that takes UPDATEs (host:port)"
                    ),
                ))?;
                check_server(&server).map_err(|r| ("dns.target.server", r))?;
                let key_name = raw.tsig_key.ok_or((
                    "dns.target.tsig_key",
                    format!("target {name} needs the TSIG key name the server knows"),
                ))?;
                let key_name = key_name.trim_end_matches('.').to_ascii_lowercase();
                check_tsig_key_name(&key_name).map_err(|r| ("dns.target.tsig_key", r))?;
                let algorithm = match raw.tsig_algorithm.as_deref() {
                    None => TsigAlgorithm::HmacSha256,
                    Some(a) => TsigAlgorithm::parse(a).ok_or((
                        "dns.target.tsig_algorithm",
                        format!(
                            "{a:?} is not supported; use one of: {}",
                            TsigAlgorithm::ALL.map(|a| a.as_str()).join(", ")
                        ),
                    ))?,
                };
                let secret_file = raw.tsig_secret_file.ok_or((
                    "dns.target.tsig_secret_file",
                    format!("target {name} needs the file holding the TSIG secret (base64)"),
                ))?;
                TargetKind::Rfc2136(Rfc2136Target {
                    server,
                    tsig: TsigSpec {
                        key_name,
                        algorithm,
                        secret_file: resolve(base, secret_file),
                    },
                })
            }
            "zonefile" => {
                only("dns.target.server", raw.server.is_some(), "rfc2136")?;
                only("dns.target.tsig_key", raw.tsig_key.is_some(), "rfc2136")?;
                only(
                    "dns.target.tsig_algorithm",
                    raw.tsig_algorithm.is_some(),
                    "rfc2136",
                )?;
                only(
                    "dns.target.tsig_secret_file",
                    raw.tsig_secret_file.is_some(),
                    "rfc2136",
                )?;
                if listed.is_none() {
                    return Err((
                        "dns.target.servers",
                        format!(
                            "zonefile target {name} needs the servers that load the file, so \
                             keyroll can check the records are served before they sign"
                        ),
                    ));
                }
                let path = raw.path.ok_or((
                    "dns.target.path",
                    format!("target {name} needs the path of the $INCLUDE file to write"),
                ))?;
                let reload = raw.reload.unwrap_or_default();
                if reload.is_empty() || reload[0].is_empty() {
                    return Err((
                        "dns.target.reload",
                        format!(
                            "target {name} needs the reload command as an argv list, e.g. \
                             [\"rndc\", \"reload\", \"{zone}\"]"
                        ),
                    ));
                }
                let reload_timeout = match raw.reload_timeout {
                    None => Duration::from_secs(DEFAULT_RELOAD_TIMEOUT_SECS),
                    Some(s) if s.std() > Duration::from_secs(MAX_RELOAD_TIMEOUT_SECS) => {
                        return Err((
                            "dns.target.reload_timeout",
                            format!("{s} is longer than {MAX_RELOAD_TIMEOUT_SECS}s"),
                        ))
                    }
                    Some(s) => s.std(),
                };
                TargetKind::ZoneFile(ZoneFileTarget {
                    path: resolve(base, path),
                    reload,
                    reload_timeout,
                })
            }
            "" => {
                return Err((
                    "dns.target.kind",
                    format!("target {name} needs kind = \"rfc2136\" or \"zonefile\""),
                ))
            }
            other => {
                return Err((
                    "dns.target.kind",
                    format!("{other:?} is not a target kind; use \"rfc2136\" or \"zonefile\""),
                ))
            }
        };
        let check = match listed {
            Some(list) => CheckServers::Listed(list),
            None => CheckServers::ZoneNs {
                port: raw.ns_port.unwrap_or(DEFAULT_DNS_PORT),
            },
        };
        Ok(DnsTarget {
            name,
            zone,
            ttl,
            timeout,
            check,
            kind,
        })
    }
}

/// A TSIG key name is a DNS name; keyroll accepts the usual spellings (`keyroll`,
/// `keyroll-dkim.example.com`) and refuses the rest early rather than at the first UPDATE.
fn check_tsig_key_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > super::records::MAX_NAME_LEN
        || name.split('.').any(|l| {
            l.is_empty()
                || l.len() > super::records::MAX_LABEL_LEN
                || !l
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    {
        return Err(format!(
            "{name:?} is not a key name; use letters, digits, '-', '_' and dots, as in the \
             server's key definition"
        ));
    }
    Ok(())
}

/// Shortest and longest `signing_report_max_age` accepted: shorter than the sidecar's refresh
/// interval would call every live sidecar stale; longer than 30 days lets a mailer gone for
/// good hold a version for a month.
pub const MIN_REPORT_MAX_AGE_SECS: u64 = 2 * 3600;
pub const MAX_REPORT_MAX_AGE_SECS: u64 = 30 * 86_400;

fn report_max_age(v: Option<Span>) -> Result<Span, Invalid> {
    let Some(s) = v else {
        return Ok(Span::from_secs(
            crate::signing::DEFAULT_REPORT_MAX_AGE.as_secs(),
        ));
    };
    let secs = s.std().as_secs();
    if !(MIN_REPORT_MAX_AGE_SECS..=MAX_REPORT_MAX_AGE_SECS).contains(&secs) {
        return Err((
            "keys.dns.signing_report_max_age",
            format!(
                "{s} is out of range; use {}..={} (the sidecar refreshes its report every {})",
                crate::duration::compact(Duration::from_secs(MIN_REPORT_MAX_AGE_SECS)),
                crate::duration::compact(Duration::from_secs(MAX_REPORT_MAX_AGE_SECS)),
                crate::duration::compact(crate::signing::REFRESH_AFTER),
            ),
        ));
    }
    Ok(s)
}

/// A DKIM key's validated DNS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDns {
    pub target: String,
    /// The signing domain (`d=`), lowercase, no trailing dot.
    pub domain: String,
    pub selector: SelectorTemplate,
    /// Grace after retirement before the record becomes `p=`.
    pub revoke_after: Span,
    /// Time after revocation before the record is deleted.
    pub remove_after: Span,
    /// Sidecar signing reports older than this are ignored (a mailer gone for good must not
    /// hold a version signing for ever).
    pub signing_report_max_age: Span,
}

impl KeyDns {
    /// Validates against the targets defined; `key_name` fills `{name}` in the selector check.
    pub fn from_raw(raw: RawKeyDns, key_name: &str, targets: &DnsTargets) -> Result<Self, Invalid> {
        let target = raw.target.ok_or((
            "keys.dns.target",
            format!("key {key_name} needs the name of a [[dns.target]]"),
        ))?;
        let t = targets.get(&target).ok_or_else(|| {
            (
                "keys.dns.target",
                format!(
                    "no [[dns.target]] is named {target:?}; defined: {}",
                    if targets.0.is_empty() {
                        "none".to_string()
                    } else {
                        targets.0.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            )
        })?;
        let domain = raw.domain.ok_or((
            "keys.dns.domain",
            format!("key {key_name} needs the signing domain (d=)"),
        ))?;
        let domain = domain.to_ascii_lowercase();
        check_name(&domain, "domain").map_err(|r| ("keys.dns.domain", r))?;
        if !in_zone(&domain, &t.zone) {
            return Err((
                "keys.dns.domain",
                format!(
                    "{domain} is not in zone {} of target {target}; its _domainkey records \
                     could not be written there",
                    t.zone
                ),
            ));
        }
        let selector = match raw.selector {
            None => SelectorTemplate::default(),
            Some(s) => SelectorTemplate::parse(&s).map_err(|r| ("keys.dns.selector", r))?,
        };
        // The longest selector (largest version) with this key's name must be a label, and the
        // owner name must fit.
        let sel = selector
            .selector(key_name, u32::MAX)
            .map_err(|r| ("keys.dns.selector", r))?;
        check_name(&super::records::owner_name(&sel, &domain), "owner name")
            .map_err(|r| ("keys.dns.domain", r))?;
        let grace = |v: Option<Span>, default: u64, field: &'static str| {
            let s = v.unwrap_or(Span::from_secs(default));
            if s.std() > Duration::from_secs(MAX_GRACE_SECS) {
                return Err((
                    field,
                    format!("{s} is longer than {MAX_GRACE_SECS}s (3 years)"),
                ));
            }
            Ok(s)
        };
        Ok(KeyDns {
            target,
            domain,
            selector,
            revoke_after: grace(
                raw.revoke_after,
                DEFAULT_REVOKE_AFTER_SECS,
                "keys.dns.revoke_after",
            )?,
            remove_after: grace(
                raw.remove_after,
                DEFAULT_REMOVE_AFTER_SECS,
                "keys.dns.remove_after",
            )?,
            signing_report_max_age: report_max_age(raw.signing_report_max_age)?,
        })
    }
}

/// The policy file's `[dns]` section as written: `[[dns.target]]` entries with their place in
/// the file, so an error names its line.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPolicyDns {
    #[serde(default)]
    target: Vec<toml::Spanned<RawDnsTarget>>,
}

/// Key types whose versions can sign DKIM mail (RFC 8301: RSA of at least 1024 bits, and
/// RFC 8463: ed25519). OpenDKIM signs with both; ECDSA has no DKIM algorithm.
pub const DKIM_KEY_TYPES: [KeyType; 4] = [
    KeyType::Rsa2048,
    KeyType::Rsa3072,
    KeyType::Rsa4096,
    KeyType::Ed25519,
];

/// The policy's DNS settings, validated: the targets, and each DKIM key's `[keys.dns]` by
/// `(transit mount, key name)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyDns {
    pub targets: DnsTargets,
    pub keys: BTreeMap<(String, String), KeyDns>,
}

/// The 1-based line in `text` of `field`'s last part written as `name =` in the table that
/// starts at `span` (up to the next `[` header), or the table's first line: the raw shapes
/// carry no spans per field, so the loader finds the field's own line in the table it
/// validated.
fn field_line(text: &str, lines: &LineIndex, span: std::ops::Range<usize>, field: &str) -> usize {
    let name = field.rsplit('.').next().unwrap_or(field);
    let body = text.get(span.start..).unwrap_or("");
    let mut offset = 0;
    for (i, l) in body.split_inclusive('\n').enumerate() {
        let t = l.trim_start();
        if i > 0 && t.starts_with('[') {
            break;
        }
        if let Some(rest) = t.strip_prefix(name) {
            if rest.trim_start().starts_with('=') {
                return lines.line(span.start + offset);
            }
        }
        offset += l.len();
    }
    lines.line(span.start)
}

impl PolicyDns {
    /// Validates every `[[dns.target]]` (names unique); errors name file, line and field.
    pub fn load_targets(
        raw: RawPolicyDns,
        base: &Path,
        (path, text, lines): (&Path, &str, &LineIndex),
    ) -> Result<Self, ConfigError> {
        let mut targets = BTreeMap::new();
        for spanned in raw.target {
            let span = spanned.span();
            let bad = |(field, reason): Invalid| ConfigError::Invalid {
                path: path.to_path_buf(),
                line: field_line(text, lines, span.clone(), field),
                field: field.to_string(),
                reason,
            };
            let t = DnsTarget::from_raw(spanned.into_inner(), base).map_err(bad)?;
            if targets.contains_key(&t.name) {
                return Err(bad((
                    "dns.target.name",
                    format!(
                        "target {:?} is defined twice; give each a distinct name",
                        t.name
                    ),
                )));
            }
            targets.insert(t.name.clone(), t);
        }
        Ok(PolicyDns {
            targets: DnsTargets(targets),
            keys: BTreeMap::new(),
        })
    }

    /// Validates one key's `[keys.dns]` against the targets; the key must be of a DKIM type.
    pub fn add_key(
        &mut self,
        mount: &str,
        name: &crate::KeyName,
        key_type: KeyType,
        raw: toml::Spanned<RawKeyDns>,
        (path, text, lines): (&Path, &str, &LineIndex),
    ) -> Result<(), ConfigError> {
        let span = raw.span();
        let bad = |(field, reason): Invalid| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: field_line(text, lines, span.clone(), field),
            field: field.to_string(),
            reason,
        };
        if !DKIM_KEY_TYPES.contains(&key_type) {
            return Err(bad((
                "keys.dns",
                format!(
                    "key {name} is {key_type}, which cannot sign DKIM mail; DNS records are \
                     published for {} keys only",
                    DKIM_KEY_TYPES.map(|t| t.as_str()).join(", ")
                ),
            )));
        }
        let k = KeyDns::from_raw(raw.into_inner(), name.as_str(), &self.targets).map_err(bad)?;
        let zonefile = self
            .targets
            .get(&k.target)
            .is_some_and(|t| matches!(t.kind, TargetKind::ZoneFile(_)));
        if let Some(((m, other), _)) = self
            .keys
            .iter()
            .find(|(_, o)| zonefile && o.target == k.target)
        {
            return Err(bad((
                "keys.dns.target",
                format!(
                    "zonefile target {} already holds key {m}/{other}'s records; keyroll \
                     rewrites a zone file from one key's records, so give each key its own \
                     zonefile target (file)",
                    k.target
                ),
            )));
        }
        self.keys.insert((mount.to_string(), name.to_string()), k);
        Ok(())
    }

    pub fn key(&self, mount: &str, name: &str) -> Option<&KeyDns> {
        self.keys.get(&(mount.to_string(), name.to_string()))
    }

    /// Whether any key publishes DNS records.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(toml_text: &str) -> RawDns {
        toml::from_str(toml_text).unwrap()
    }

    const RFC2136: &str = r#"
        [[target]]
        name = "primary"
        kind = "rfc2136"
        zone = "Example.COM."
        server = "127.0.0.1:5300"
        tsig_key = "keyroll"
        tsig_secret_file = "tsig.key"
    "#;

    fn targets() -> DnsTargets {
        DnsTargets::from_raw(raw(RFC2136), Path::new("/etc/keyroll")).unwrap()
    }

    #[test]
    fn rfc2136_target_gets_defaults_and_a_resolved_secret_path() {
        let t = targets();
        let p = t.get("primary").unwrap();
        assert_eq!(p.zone, "example.com");
        assert_eq!(p.ttl, DEFAULT_RECORD_TTL_SECS);
        assert_eq!(p.timeout, Duration::from_secs(DEFAULT_DNS_TIMEOUT_SECS));
        assert_eq!(p.check, CheckServers::ZoneNs { port: 53 });
        let TargetKind::Rfc2136(r) = &p.kind else {
            panic!("kind")
        };
        assert_eq!(r.tsig.algorithm, TsigAlgorithm::HmacSha256);
        assert_eq!(r.tsig.secret_file, Path::new("/etc/keyroll/tsig.key"));
    }

    fn err(text: &str) -> (&'static str, String) {
        DnsTargets::from_raw(raw(text), Path::new("/")).unwrap_err()
    }

    #[test]
    fn an_inline_tsig_secret_is_refused_without_echoing_it() {
        let (field, reason) = err(&format!("{RFC2136}\ntsig_secret = \"c2VjcmV0LXZhbHVl\"\n"));
        assert_eq!(field, "dns.target.tsig_secret");
        assert!(reason.contains("tsig_secret_file"), "{reason}");
        assert!(!reason.contains("c2VjcmV0LXZhbHVl"));
    }

    #[test]
    fn bad_targets_name_the_field() {
        let cases = [
            (
                RFC2136.replace("kind = \"rfc2136\"", "kind = \"nsupdate\""),
                "dns.target.kind",
            ),
            (
                RFC2136.replace("127.0.0.1:5300", "127.0.0.1"),
                "dns.target.server",
            ),
            (
                RFC2136.replace("127.0.0.1:5300", "host:0"),
                "dns.target.server",
            ),
            (
                RFC2136.replace("tsig_key = \"keyroll\"", ""),
                "dns.target.tsig_key",
            ),
            (
                RFC2136.replace("tsig_secret_file = \"tsig.key\"", ""),
                "dns.target.tsig_secret_file",
            ),
            (
                format!("{RFC2136}\ntsig_algorithm = \"hmac-md5\""),
                "dns.target.tsig_algorithm",
            ),
            (format!("{RFC2136}\nttl = \"2d\""), "dns.target.ttl"),
            (format!("{RFC2136}\nttl = \"1500ms\""), "dns.target.ttl"),
            (format!("{RFC2136}\ntimeout = \"1h\""), "dns.target.timeout"),
            (
                format!("{RFC2136}\nservers = [\"ns1\"]"),
                "dns.target.servers",
            ),
            (
                format!("{RFC2136}\nservers = [\"a:53\"]\nns_port = 5300"),
                "dns.target.ns_port",
            ),
            (format!("{RFC2136}\npath = \"x.inc\""), "dns.target.path"),
            (
                RFC2136.replace("zone = \"Example.COM.\"", "zone = \"a..b\""),
                "dns.target.zone",
            ),
            (format!("{RFC2136}{RFC2136}"), "dns.target.name"),
        ];
        for (text, field) in cases {
            assert_eq!(err(&text).0, field, "{text}");
        }
    }

    #[test]
    fn zonefile_target_needs_servers_and_a_reload_argv() {
        let base = r#"
            [[target]]
            name = "files"
            kind = "zonefile"
            zone = "example.org"
            path = "dkim.inc"
            reload = ["knotc", "zone-reload", "example.org"]
            servers = ["127.0.0.1:53"]
        "#;
        let t = DnsTargets::from_raw(raw(base), Path::new("/srv")).unwrap();
        let f = t.get("files").unwrap();
        let TargetKind::ZoneFile(z) = &f.kind else {
            panic!("kind")
        };
        assert_eq!(z.path, Path::new("/srv/dkim.inc"));
        assert_eq!(
            z.reload_timeout,
            Duration::from_secs(DEFAULT_RELOAD_TIMEOUT_SECS)
        );
        assert_eq!(f.check, CheckServers::Listed(vec!["127.0.0.1:53".into()]));
        assert_eq!(
            err(&base.replace("servers = [\"127.0.0.1:53\"]", "")).0,
            "dns.target.servers"
        );
        assert_eq!(
            err(&base.replace("[\"knotc\", \"zone-reload\", \"example.org\"]", "[]")).0,
            "dns.target.reload"
        );
        assert_eq!(
            err(&format!("{base}\ntsig_key = \"k\"")).0,
            "dns.target.tsig_key"
        );
    }

    #[test]
    fn server_addresses_accept_names_v4_and_bracketed_v6() {
        for ok in ["ns1.example.com:53", "192.0.2.1:5300", "[2001:db8::1]:53"] {
            check_server(ok).unwrap();
        }
        for bad in ["ns1", ":53", "2001:db8::1:53", "[::1]", "a b:53", "h:65536"] {
            assert!(check_server(bad).is_err(), "{bad}");
        }
    }

    fn key(text: &str) -> Result<KeyDns, (&'static str, String)> {
        KeyDns::from_raw(toml::from_str(text).unwrap(), "dkim", &targets())
    }

    #[test]
    fn key_dns_defaults_and_checks() {
        let k = key("target = \"primary\"\ndomain = \"Mail.Example.com\"").unwrap();
        assert_eq!(k.domain, "mail.example.com");
        assert_eq!(k.selector.as_str(), "kr{version}");
        assert_eq!(k.revoke_after.std().as_secs(), DEFAULT_REVOKE_AFTER_SECS);
        assert_eq!(k.remove_after.std().as_secs(), DEFAULT_REMOVE_AFTER_SECS);
        let e = key("target = \"nope\"\ndomain = \"example.com\"").unwrap_err();
        assert_eq!(e.0, "keys.dns.target");
        assert!(e.1.contains("primary"), "{}", e.1);
        assert_eq!(
            key("target = \"primary\"\ndomain = \"example.org\"")
                .unwrap_err()
                .0,
            "keys.dns.domain"
        );
        assert_eq!(
            key("target = \"primary\"\ndomain = \"example.com\"\nselector = \"static\"")
                .unwrap_err()
                .0,
            "keys.dns.selector"
        );
        assert_eq!(
            key("target = \"primary\"\ndomain = \"example.com\"\nrevoke_after = \"5y\"")
                .unwrap_err()
                .0,
            "keys.dns.revoke_after"
        );
        // {name} must give a label for this key's name.
        let e = KeyDns::from_raw(
            toml::from_str(
                "target = \"primary\"\ndomain = \"example.com\"\nselector = \"{name}{version}\"",
            )
            .unwrap(),
            "Bad_Name",
            &targets(),
        )
        .unwrap_err();
        assert_eq!(e.0, "keys.dns.selector");
    }
}
