//! Queries to one DNS server at a time, no TSIG: TXT at an owner, the zone's SOA (for the
//! negative-caching TTL) and NS set (the servers that must all answer a record before it counts
//! as confirmed), and the resolution of configured server lists.
//!
//! Queries go over UDP with EDNS (1232-byte answers) and fall back to TCP when the answer is
//! truncated, as several RSA DKIM records are. Answers are checked to match the question and to
//! be authoritative: a lame or recursive answer never confirms a record.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::time::Instant;

use super::config::{CheckServers, DnsTarget, TargetKind};
use super::error::{At, DnsError};
use super::records::{in_zone, TxtAnswer, TxtRecord};
use super::transport::{self, Failure, UDP_PAYLOAD};

/// One server to ask: a label for messages and the address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthServer {
    /// `ns1.example.com`, or the address as configured.
    pub name: String,
    pub addr: SocketAddr,
}

impl fmt::Display for AuthServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name == self.addr.to_string() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{} ({})", self.name, self.addr)
        }
    }
}

impl AuthServer {
    pub fn at(addr: SocketAddr) -> Self {
        AuthServer {
            name: addr.to_string(),
            addr,
        }
    }
}

/// A zone's SOA as the negative-caching rule needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoaInfo {
    pub serial: u32,
    /// The SOA's MINIMUM field.
    pub minimum: u32,
    /// The SOA record's own TTL.
    pub ttl: u32,
}

impl SoaInfo {
    /// How long resolvers may cache "this name does not exist": min(SOA MINIMUM, SOA TTL),
    /// RFC 2308 §5.
    pub fn negative_ttl(&self) -> Duration {
        Duration::from_secs(self.minimum.min(self.ttl).into())
    }
}

pub(crate) fn fqdn(name: &str) -> Result<Name, DnsError> {
    Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).map_err(|e| DnsError::Name {
        name: name.to_string(),
        reason: e.to_string(),
    })
}

pub(crate) fn rcode_name(r: ResponseCode) -> String {
    match r {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::YXRRSet => "YXRRSET".into(),
        ResponseCode::NXRRSet => "NXRRSET".into(),
        ResponseCode::NotAuth => "NOTAUTH".into(),
        ResponseCode::NotZone => "NOTZONE".into(),
        other => format!("{other:?}").to_uppercase(),
    }
}

pub(crate) fn transport_error(f: Failure, at: At, after: Duration) -> DnsError {
    match f {
        Failure::Timeout => DnsError::Timeout { at, after },
        Failure::Io(source) => DnsError::Unreachable { at, source },
    }
}

/// Decodes an answer and checks it answers `query` (ID, QR, opcode, question).
pub(crate) fn decode_answer(bytes: &[u8], query: &Message, at: &At) -> Result<Message, DnsError> {
    let bad = |reason: String| DnsError::BadResponse {
        at: at.clone(),
        reason,
    };
    let msg = Message::from_vec(bytes).map_err(|e| bad(format!("undecodable: {e}")))?;
    if msg.metadata.id != query.metadata.id
        || msg.metadata.message_type != MessageType::Response
        || msg.metadata.op_code != query.metadata.op_code
    {
        return Err(bad(
            "answer does not match the request (id, flags or opcode)".into(),
        ));
    }
    // FORMERR/NOTIMP answers may omit the question; otherwise it must be ours.
    if !msg.queries.is_empty() && msg.queries != query.queries {
        return Err(bad("answer is for another question".into()));
    }
    Ok(msg)
}

/// Sends a query by UDP (TCP on truncation) and returns the checked answer.
async fn ask(
    server: &AuthServer,
    zone: &str,
    qname: &str,
    qtype: RecordType,
    timeout: Duration,
) -> Result<Message, DnsError> {
    let at = At::new(server.to_string(), zone, qname);
    let mut q = Message::query();
    q.metadata.recursion_desired = false;
    q.add_query(Query::query(fqdn(qname)?, qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(UDP_PAYLOAD).set_version(0);
    q.set_edns(edns);
    let bytes = q.to_vec().map_err(|e| DnsError::Name {
        name: qname.to_string(),
        reason: e.to_string(),
    })?;
    let deadline = Instant::now() + timeout;
    let answer = transport::udp(server.addr, &bytes, deadline)
        .await
        .map_err(|f| transport_error(f, at.clone(), timeout))?;
    let msg = decode_answer(&answer, &q, &at)?;
    if !msg.metadata.truncation {
        return Ok(msg);
    }
    let answer = transport::tcp(server.addr, &bytes, deadline)
        .await
        .map_err(|f| transport_error(f, at.clone(), timeout))?;
    decode_answer(&answer, &q, &at)
}

/// Fails unless the answer is authoritative NOERROR or NXDOMAIN.
fn require_authoritative(msg: &Message, at: &At) -> Result<(), DnsError> {
    let rcode = msg.metadata.response_code;
    if !matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
        let detail = match rcode {
            ResponseCode::Refused => format!("the server does not serve zone {}", at.zone),
            ResponseCode::ServFail => format!("the server could not load zone {}", at.zone),
            _ => String::new(),
        };
        return Err(DnsError::Rcode {
            at: at.clone(),
            rcode: rcode_name(rcode),
            detail,
        });
    }
    if !msg.metadata.authoritative {
        return Err(DnsError::BadResponse {
            at: at.clone(),
            reason: format!(
                "the answer is not authoritative: this server does not serve zone {} (lame \
                 delegation, or a resolver)",
                at.zone
            ),
        });
    }
    Ok(())
}

/// The TXT RRs at `owner` (following CNAMEs inside the answer) as `server` answers them.
pub async fn query_txt(
    server: &AuthServer,
    zone: &str,
    owner: &str,
    timeout: Duration,
) -> Result<TxtAnswer, DnsError> {
    let at = At::new(server.to_string(), zone, owner);
    let msg = ask(server, zone, owner, RecordType::TXT, timeout).await?;
    require_authoritative(&msg, &at)?;
    let mut names: BTreeSet<Name> = BTreeSet::from([fqdn(owner)?]);
    for r in &msg.answers {
        if let RData::CNAME(c) = &r.data {
            if names.contains(&r.name) {
                names.insert(c.0.clone());
            }
        }
    }
    let records = msg
        .answers
        .iter()
        .filter(|r| names.contains(&r.name))
        .filter_map(|r| match &r.data {
            RData::TXT(txt) => Some(TxtRecord {
                strings: txt.txt_data.iter().map(|s| s.to_vec()).collect(),
                ttl: r.ttl,
            }),
            _ => None,
        })
        .collect();
    Ok(TxtAnswer {
        records,
        nxdomain: msg.metadata.response_code == ResponseCode::NXDomain,
    })
}

/// The zone's SOA as `server` answers it.
pub async fn query_soa(
    server: &AuthServer,
    zone: &str,
    timeout: Duration,
) -> Result<SoaInfo, DnsError> {
    let at = At::new(server.to_string(), zone, zone);
    let msg = ask(server, zone, zone, RecordType::SOA, timeout).await?;
    require_authoritative(&msg, &at)?;
    let apex = fqdn(zone)?;
    msg.answers
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) if r.name == apex => Some(SoaInfo {
                serial: soa.serial,
                minimum: soa.minimum,
                ttl: r.ttl,
            }),
            _ => None,
        })
        .ok_or_else(|| DnsError::BadResponse {
            at,
            reason: "no SOA record at the zone apex".into(),
        })
}

/// The zone's authoritative servers: its NS set as `via` answers it, each name's A and AAAA
/// addresses (asked of `via` for names inside the zone, else of the system resolver), at `port`.
/// Every NS name must resolve: a server that cannot be checked cannot confirm a record.
pub async fn zone_servers(
    via: &AuthServer,
    zone: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<AuthServer>, DnsError> {
    let at = At::new(via.to_string(), zone, zone);
    let msg = ask(via, zone, zone, RecordType::NS, timeout).await?;
    require_authoritative(&msg, &at)?;
    let apex = fqdn(zone)?;
    let ns: BTreeSet<String> = msg
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(n) if r.name == apex => {
                Some(n.0.to_ascii().trim_end_matches('.').to_lowercase())
            }
            _ => None,
        })
        .collect();
    if ns.is_empty() {
        return Err(DnsError::BadResponse {
            at,
            reason: "the zone has no NS records".into(),
        });
    }
    let mut out = BTreeSet::new();
    for name in ns {
        let mut addrs = Vec::new();
        if in_zone(&name, zone) {
            for t in [RecordType::A, RecordType::AAAA] {
                let m = ask(via, zone, &name, t, timeout).await?;
                for r in &m.answers {
                    match &r.data {
                        RData::A(a) => addrs.push(SocketAddr::from((a.0, port))),
                        RData::AAAA(a) => addrs.push(SocketAddr::from((a.0, port))),
                        _ => {}
                    }
                }
            }
        } else {
            let deadline = Instant::now() + timeout;
            let found = transport::resolve(&format!("{name}:{port}"), deadline)
                .await
                .map_err(|f| DnsError::Resolve {
                    at: At::new(via.to_string(), zone, &name),
                    reason: match f {
                        Failure::Timeout => format!("no answer within {timeout:?}"),
                        Failure::Io(e) => e.to_string(),
                    },
                })?;
            addrs.extend(found);
        }
        if addrs.is_empty() {
            return Err(DnsError::Resolve {
                at: At::new(via.to_string(), zone, &name),
                reason: format!("name server {name} has no A or AAAA record"),
            });
        }
        out.extend(addrs.into_iter().map(|addr| AuthServer {
            name: name.clone(),
            addr,
        }));
    }
    Ok(out.into_iter().collect())
}

/// Resolves configured `host:port` strings; every address of a name counts as a server.
pub async fn resolve_servers(
    list: &[String],
    zone: &str,
    timeout: Duration,
) -> Result<Vec<AuthServer>, DnsError> {
    let mut out = Vec::new();
    for s in list {
        let deadline = Instant::now() + timeout;
        let addrs = transport::resolve(s, deadline)
            .await
            .map_err(|f| DnsError::Resolve {
                at: At::new(s.clone(), zone, zone),
                reason: match f {
                    Failure::Timeout => format!("no answer within {timeout:?}"),
                    Failure::Io(e) => e.to_string(),
                },
            })?;
        let host = s.rsplit_once(':').map(|(h, _)| h).unwrap_or(s);
        out.extend(addrs.into_iter().map(|addr| AuthServer {
            name: if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
                addr.to_string()
            } else {
                host.to_string()
            },
            addr,
        }));
    }
    Ok(out)
}

/// The servers a target's records must be answered by: the configured list, or the zone's NS
/// set as its primary answers it.
pub async fn check_servers(target: &DnsTarget) -> Result<Vec<AuthServer>, DnsError> {
    match (&target.check, &target.kind) {
        (CheckServers::Listed(list), _) => {
            resolve_servers(list, &target.zone, target.timeout).await
        }
        (CheckServers::ZoneNs { port }, TargetKind::Rfc2136(r)) => {
            let primary = resolve_servers(
                std::slice::from_ref(&r.server),
                &target.zone,
                target.timeout,
            )
            .await?;
            let via = primary.first().expect("resolve gives at least one address");
            zone_servers(via, &target.zone, *port, target.timeout).await
        }
        (CheckServers::ZoneNs { .. }, TargetKind::ZoneFile(_)) => {
            // Config validation requires `servers` for zone-file targets.
            Ok(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_ttl_is_the_smaller_of_soa_minimum_and_soa_ttl() {
        let s = SoaInfo {
            serial: 1,
            minimum: 60,
            ttl: 3600,
        };
        assert_eq!(s.negative_ttl(), Duration::from_secs(60));
        let s = SoaInfo {
            serial: 1,
            minimum: 86_400,
            ttl: 300,
        };
        assert_eq!(s.negative_ttl(), Duration::from_secs(300));
    }

    #[test]
    fn server_labels_show_name_and_address() {
        let a: SocketAddr = "192.0.2.1:53".parse().unwrap();
        assert_eq!(AuthServer::at(a).to_string(), "192.0.2.1:53");
        let n = AuthServer {
            name: "ns1.example.com".into(),
            addr: a,
        };
        assert_eq!(n.to_string(), "ns1.example.com (192.0.2.1:53)");
    }
}
