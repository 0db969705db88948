//! Typed DNS errors. Each names the server, zone and owner it concerns and says what to check;
//! none carries the TSIG secret or any part of it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Which request failed: the server asked, the zone, and the owner name concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    pub server: String,
    pub zone: String,
    pub owner: String,
}

impl At {
    pub fn new(server: impl Into<String>, zone: &str, owner: &str) -> Self {
        At {
            server: server.into(),
            zone: zone.to_string(),
            owner: owner.to_string(),
        }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server {}, zone {}, owner {}",
            self.server, self.zone, self.owner
        )
    }
}

/// Why a DNS request did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("{at}: REFUSED: the server will not take this update; check that zone {} is served there as a primary and its update ACL lets TSIG key {key} change TXT records at {} (Knot: acl action update, BIND: update-policy)", at.zone, at.owner)]
    Refused { at: At, key: String },
    #[error("{at}: NOTAUTH: the server is not authoritative for zone {} or wants a TSIG-signed request; check the zone name and that this is the zone's primary", at.zone)]
    NotAuth { at: At },
    #[error("{at}: BADSIG: the server knows TSIG key {key} but the secret differs; check that {} holds the same secret as the server's key {key}", secret_file.display())]
    BadSig {
        at: At,
        key: String,
        secret_file: PathBuf,
    },
    #[error("{at}: BADKEY: the server did not accept TSIG key {key} ({algorithm}) for this update: either it has no key of that name and algorithm, or its update ACL does not let this key change TXT at {} (Knot answers BADKEY when the ACL denies; keyroll only writes TXT below _domainkey)", at.owner)]
    BadKey {
        at: At,
        key: String,
        algorithm: &'static str,
    },
    #[error("{at}: BADTIME: the server's clock and this host's differ by more than the TSIG fudge; check NTP on both")]
    BadTime { at: At },
    #[error("{at}: NOTZONE: {} is not inside zone {}; check the target's zone and the key's domain", at.owner, at.zone)]
    NotZone { at: At },
    #[error("{at}: the record changed while keyroll was updating it ({attempts} attempts, last {rcode}); another writer is active, the next run retries")]
    Conflict {
        at: At,
        attempts: u32,
        rcode: String,
    },
    #[error("{at}: the server answered {rcode}{}", if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    Rcode {
        at: At,
        rcode: String,
        detail: String,
    },
    #[error("{at}: no answer within {after:?} (timeout); check that the server runs and that UDP/TCP port {port} is reachable", port = at.server.rsplit(':').next().unwrap_or("53"))]
    Timeout { at: At, after: Duration },
    #[error("{at}: unreachable: {source}; check the address and that the server runs")]
    Unreachable {
        at: At,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: cannot resolve the server's name: {reason}")]
    Resolve { at: At, reason: String },
    #[error("{at}: bad response: {reason}")]
    BadResponse { at: At, reason: String },
    #[error("{at}: the response's TSIG signature does not verify ({reason}); the answer may not be from the server, so it is not trusted")]
    ResponseSignature { at: At, reason: String },
    #[error("TSIG secret file {}: {reason}", path.display())]
    Secret { path: PathBuf, reason: String },
    #[error("{name:?} is not a usable DNS name: {reason}")]
    Name { name: String, reason: String },
}

impl DnsError {
    /// Where the request went, when it reached the network at all.
    pub fn at(&self) -> Option<&At> {
        match self {
            DnsError::Refused { at, .. }
            | DnsError::NotAuth { at }
            | DnsError::BadSig { at, .. }
            | DnsError::BadKey { at, .. }
            | DnsError::BadTime { at }
            | DnsError::NotZone { at }
            | DnsError::Conflict { at, .. }
            | DnsError::Rcode { at, .. }
            | DnsError::Timeout { at, .. }
            | DnsError::Unreachable { at, .. }
            | DnsError::Resolve { at, .. }
            | DnsError::BadResponse { at, .. }
            | DnsError::ResponseSignature { at, .. } => Some(at),
            DnsError::Secret { .. } | DnsError::Name { .. } => None,
        }
    }

    /// Short stable label for events and metrics (`refused`, `badsig`, `timeout`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            DnsError::Refused { .. } => "refused",
            DnsError::NotAuth { .. } => "notauth",
            DnsError::BadSig { .. } => "badsig",
            DnsError::BadKey { .. } => "badkey",
            DnsError::BadTime { .. } => "badtime",
            DnsError::NotZone { .. } => "notzone",
            DnsError::Conflict { .. } => "conflict",
            DnsError::Rcode { .. } => "rcode",
            DnsError::Timeout { .. } => "timeout",
            DnsError::Unreachable { .. } => "unreachable",
            DnsError::Resolve { .. } => "resolve",
            DnsError::BadResponse { .. } => "bad-response",
            DnsError::ResponseSignature { .. } => "response-signature",
            DnsError::Secret { .. } => "secret",
            DnsError::Name { .. } => "name",
        }
    }

    /// Whether the server could not be reached at all (as opposed to answering "no").
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            DnsError::Timeout { .. } | DnsError::Unreachable { .. } | DnsError::Resolve { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_network_error_names_server_zone_and_owner() {
        let at = At::new(
            "127.0.0.1:5300",
            "example.com",
            "kr1._domainkey.example.com",
        );
        let errs = [
            DnsError::Refused {
                at: at.clone(),
                key: "keyroll".into(),
            },
            DnsError::BadSig {
                at: at.clone(),
                key: "keyroll".into(),
                secret_file: "/etc/keyroll/tsig.key".into(),
            },
            DnsError::Timeout {
                at: at.clone(),
                after: Duration::from_secs(5),
            },
        ];
        for e in errs {
            let s = e.to_string();
            for part in [
                "127.0.0.1:5300",
                "example.com",
                "kr1._domainkey.example.com",
            ] {
                assert!(s.contains(part), "{s}");
            }
        }
        let t = DnsError::Timeout {
            at,
            after: Duration::from_secs(5),
        };
        assert!(t.to_string().contains("port 5300"), "{t}");
        assert!(t.is_outage());
        assert_eq!(t.kind(), "timeout");
    }
}
