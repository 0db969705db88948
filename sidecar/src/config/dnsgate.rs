//! Validating `[dns]` (how the sidecar checks DKIM records before a new selector signs),
//! `[report]` (signing reports to keyroll's KV) and each key's `activation`, into their typed
//! forms (part of [`super::Config::from_toml`]).

use std::time::Duration;

use keyroll::dns::config::{check_server, MAX_CHECK_SERVERS, MAX_DNS_TIMEOUT_SECS};
use keyroll::dns::records::{check_name, in_zone};
use serde::Deserialize;
use toml::Spanned;

use super::values::parse_bounded;
use super::FieldError;

/// Default time one DNS query may take.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest DNS timeout accepted.
pub const MIN_DNS_TIMEOUT: Duration = Duration::from_millis(100);
/// Default port of the servers an NS set names.
pub const DEFAULT_NS_PORT: u16 = 53;
/// Longest sidecar id (one KV path segment).
pub const MAX_SIDECAR_ID: usize = 128;
/// The sidecar id when the host name cannot be read.
pub const FALLBACK_SIDECAR_ID: &str = "keyroll-sidecar";

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDnsCheck {
    activation: Option<Spanned<String>>,
    servers: Option<Spanned<Vec<String>>>,
    nameserver: Option<Spanned<String>>,
    port: Option<Spanned<u16>>,
    zone: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReport {
    enabled: Option<bool>,
    state_mount: Option<Spanned<String>>,
    state_path: Option<Spanned<String>>,
    sidecar_id: Option<Spanned<String>>,
}

/// When a new version's selector starts signing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// After `activate_after` (or at once without it): the blind timer, the default.
    #[default]
    Timer,
    /// Once the sidecar sees the record served (and `activate_after`, if set, has passed).
    Dns,
}

impl Activation {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "timer" => Ok(Activation::Timer),
            "dns" => Ok(Activation::Dns),
            other => Err(format!(
                "{other:?} is not an activation; use \"timer\" or \"dns\""
            )),
        }
    }
}

/// Which servers must serve a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateServers {
    /// Exactly these `host:port`s.
    Listed(Vec<String>),
    /// The zone's NS set as `via` answers it, each asked on `port`.
    ZoneNs { via: String, port: u16 },
}

/// `[dns]`: how records are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsCheck {
    /// Activation of opendkim keys that do not set their own.
    pub activation: Activation,
    pub servers: GateServers,
    /// The zone holding the records (its SOA gives the negative TTL); default: each key's
    /// domain (or its own `dns_zone`).
    pub zone: Option<String>,
    pub timeout: Duration,
}

/// `[report]`: where the sidecar reports which version each DKIM key signs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSettings {
    pub enabled: bool,
    /// keyroll's `[state]` mount and path (defaults are keyroll's).
    pub state: keyroll::policy::StateSettings,
    /// This sidecar's id (one KV path segment): the host name by default.
    pub sidecar_id: String,
}

pub(super) fn dns_check(
    raw: RawDnsCheck,
    line_of: &dyn Fn(std::ops::Range<usize>) -> usize,
) -> Result<DnsCheck, FieldError> {
    let at = |s: std::ops::Range<usize>| Some(line_of(s));
    let activation = match raw.activation {
        None => Activation::Timer,
        Some(a) => {
            Activation::parse(a.get_ref()).map_err(|r| (at(a.span()), "dns.activation", r))?
        }
    };
    let servers = match (raw.servers, raw.nameserver) {
        (Some(list), None) => {
            let l = at(list.span());
            let list = list.into_inner();
            if list.is_empty() || list.len() > MAX_CHECK_SERVERS {
                return Err((
                    l,
                    "dns.servers",
                    format!("give 1 to {MAX_CHECK_SERVERS} servers as \"host:port\""),
                ));
            }
            for s in &list {
                check_server(s).map_err(|r| (l, "dns.servers", r))?;
            }
            if raw.port.is_some() {
                return Err((
                    l,
                    "dns.port",
                    "applies to nameserver (the NS set's servers) only; servers carry their own ports".into(),
                ));
            }
            GateServers::Listed(list)
        }
        (None, Some(ns)) => {
            let l = at(ns.span());
            check_server(ns.get_ref()).map_err(|r| (l, "dns.nameserver", r))?;
            let port = match raw.port {
                None => DEFAULT_NS_PORT,
                Some(p) if *p.get_ref() == 0 => {
                    return Err((at(p.span()), "dns.port", "0 is not a port".into()))
                }
                Some(p) => *p.get_ref(),
            };
            GateServers::ZoneNs {
                via: ns.into_inner(),
                port,
            }
        }
        (Some(list), Some(_)) => {
            return Err((
                at(list.span()),
                "dns.servers",
                "give either servers (check exactly these) or nameserver (check the zone's NS \
                 set as it answers), not both"
                    .into(),
            ))
        }
        (None, None) => {
            return Err((
                None,
                "dns.servers",
                "missing; give servers = [\"host:port\", …] (the zone's authoritative servers) \
                 or nameserver = \"host:port\" (a server that answers the zone's NS set)"
                    .into(),
            ))
        }
    };
    let zone = match raw.zone {
        None => None,
        Some(z) => {
            let l = at(z.span());
            let zone = z.into_inner().trim_end_matches('.').to_ascii_lowercase();
            check_name(&zone, "dns zone").map_err(|r| (l, "dns.zone", r))?;
            Some(zone)
        }
    };
    let timeout = match raw.timeout {
        None => DEFAULT_DNS_TIMEOUT,
        Some(t) => parse_bounded(
            t.get_ref(),
            MIN_DNS_TIMEOUT,
            Duration::from_secs(MAX_DNS_TIMEOUT_SECS),
        )
        .map_err(|r| (at(t.span()), "dns.timeout", r))?,
    };
    Ok(DnsCheck {
        activation,
        servers,
        zone,
        timeout,
    })
}

/// A key's activation and, for `dns`, the zone its records live in.
pub(super) fn key_activation(
    raw: Option<Spanned<String>>,
    dns_zone: Option<Spanned<String>>,
    domain: &str,
    dns: Option<&DnsCheck>,
    line_of: &dyn Fn(std::ops::Range<usize>) -> usize,
) -> Result<Option<String>, FieldError> {
    let l = raw.as_ref().map(|a| line_of(a.span()));
    let activation = match &raw {
        Some(a) => Activation::parse(a.get_ref()).map_err(|r| (l, "keys.activation", r))?,
        None => dns.map(|d| d.activation).unwrap_or_default(),
    };
    let zl = dns_zone.as_ref().map(|z| line_of(z.span()));
    if activation == Activation::Timer {
        if dns_zone.is_some() {
            return Err((
                zl,
                "keys.dns_zone",
                "applies to activation = \"dns\" only".into(),
            ));
        }
        return Ok(None);
    }
    let Some(dns) = dns else {
        return Err((
            l,
            "keys.activation",
            "\"dns\" needs a [dns] section saying which servers to ask (servers or nameserver)"
                .into(),
        ));
    };
    let zone = match dns_zone {
        Some(z) => {
            let zone = z.into_inner().trim_end_matches('.').to_ascii_lowercase();
            check_name(&zone, "dns zone").map_err(|r| (zl, "keys.dns_zone", r))?;
            zone
        }
        None => dns.zone.clone().unwrap_or_else(|| domain.to_string()),
    };
    if !in_zone(domain, &zone) {
        return Err((
            zl.or(l),
            "keys.dns_zone",
            format!(
                "zone {zone:?} does not contain the key's domain {domain:?}, so it cannot hold \
                 its _domainkey records; set dns_zone to the zone that does"
            ),
        ));
    }
    Ok(Some(zone))
}

pub(super) fn report(
    raw: Option<Spanned<RawReport>>,
    line_of: &dyn Fn(std::ops::Range<usize>) -> usize,
) -> Result<ReportSettings, FieldError> {
    let r = raw.map(Spanned::into_inner).unwrap_or_default();
    let segment = |v: Option<Spanned<String>>,
                   field: &'static str,
                   default: &str,
                   slashes: bool|
     -> Result<String, FieldError> {
        let Some(v) = v else {
            return Ok(default.to_string());
        };
        let l = Some(line_of(v.span()));
        let s = v.into_inner();
        let ok_char = |c: char| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || (slashes && c == '/')
        };
        if s.is_empty()
            || s.len() > MAX_SIDECAR_ID
            || !s.chars().all(ok_char)
            || s.starts_with('/')
            || s.ends_with('/')
            || s.split('/').any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err((
                l,
                field,
                format!(
                    "{s:?} is not a Vault path {}; use letters, digits, '-', '_', '.'{}",
                    if slashes { "" } else { "segment" },
                    if slashes { " and inner '/'" } else { "" }
                ),
            ));
        }
        Ok(s)
    };
    let mount = segment(
        r.state_mount,
        "report.state_mount",
        keyroll::policy::DEFAULT_STATE_MOUNT,
        true,
    )?;
    let path = segment(
        r.state_path,
        "report.state_path",
        keyroll::policy::DEFAULT_STATE_PATH,
        true,
    )?;
    let sidecar_id = segment(r.sidecar_id, "report.sidecar_id", &host_id(), false)?;
    Ok(ReportSettings {
        enabled: r.enabled.unwrap_or(true),
        state: keyroll::policy::StateSettings {
            mount,
            path,
            // Unused by the sidecar (it takes no locks); keyroll's own default.
            lock_ttl: keyroll::duration::Span::from_secs(keyroll::policy::DEFAULT_LOCK_TTL_SECS),
        },
        sidecar_id,
    })
}

/// The host name as a KV path segment (other characters become '-'), or
/// [`FALLBACK_SIDECAR_ID`].
fn host_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .take(MAX_SIDECAR_ID)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.is_empty() || id.chars().all(|c| c == '.') {
        FALLBACK_SIDECAR_ID.to_string()
    } else {
        id
    }
}
