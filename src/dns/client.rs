//! The DNS write shell: RFC 2136 UPDATEs signed with TSIG to a zone's primary (queries live in
//! `query`).
//!
//! Writes are compare-and-swap: keyroll reads the TXT RRset at the owner from the primary, then
//! sends one UPDATE whose prerequisite is exactly that RRset ("does not exist", or "exists with
//! these RRs", RFC 2136 §2.4) and whose update section deletes the RRset and adds the one wanted
//! RR. The server applies it atomically, so the owner ends with exactly one TXT RR; if another
//! writer changed the RRset in between, the prerequisite fails (YXRRSET/NXRRSET), keyroll reads
//! again and retries (bounded). Two keyroll runs at once therefore never leave duplicates, and a
//! run acting on a stale read cannot overwrite a newer change unseen. Nothing is sent when the
//! primary already answers the wanted record: a steady-state run makes no UPDATE.
//!
//! UPDATEs go over TCP (RFC 2136 allows either; a 4096-bit RSA record does not fit 512 bytes).
//! Responses to signed UPDATEs must carry a valid TSIG; an unsigned "success" is refused.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, OpCode, Query, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::tsig::TsigError;
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use rand::Rng as _;
use tokio::time::Instant;

use super::config::{DnsTarget, Rfc2136Target};
use super::error::{At, DnsError};
use super::lifecycle::DnsWrite;
use super::query::{
    decode_answer, fqdn, query_txt, rcode_name, resolve_servers, transport_error, AuthServer,
};
use super::records::{check_name, in_zone, TxtAnswer};
use super::transport;
use super::tsig::TsigKey;

/// Most read-then-UPDATE rounds before giving up on a record another writer keeps changing.
pub const MAX_UPDATE_ATTEMPTS: u32 = 4;
/// Base pause before retrying after a failed prerequisite (doubled per attempt, plus jitter).
pub const UPDATE_RETRY_BASE: Duration = Duration::from_millis(50);
/// Longest pause between retries.
pub const UPDATE_RETRY_CAP: Duration = Duration::from_millis(800);

/// What a write did at the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The primary already answered what was wanted; no UPDATE was sent.
    Unchanged,
    /// There was no TXT RR; now there is the wanted one.
    Created,
    /// Other TXT RRs (listed) were replaced by the wanted one.
    Replaced { previous: TxtAnswer },
    /// These TXT RRs were deleted.
    Deleted { previous: TxtAnswer },
}

impl Change {
    pub fn changed(&self) -> bool {
        !matches!(self, Change::Unchanged)
    }
}

/// Why one UPDATE did not apply.
enum UpdateFailure {
    /// YXRRSET/NXRRSET: the RRset is not what the prerequisite said; read again.
    Prerequisite(String),
    Error(DnsError),
}

/// Writes TXT records at a zone's primary with RFC 2136 UPDATEs signed by a TSIG key.
#[derive(Debug)]
pub struct Rfc2136Client {
    server: String,
    zone: String,
    key: TsigKey,
    ttl: u32,
    timeout: Duration,
}

impl Rfc2136Client {
    /// A client for `target`, reading its TSIG secret file now.
    pub fn new(target: &DnsTarget, spec: &Rfc2136Target) -> Result<Self, DnsError> {
        Ok(Self::from_parts(
            &spec.server,
            &target.zone,
            TsigKey::load(&spec.tsig)?,
            target.ttl,
            target.timeout,
        ))
    }

    pub fn from_parts(server: &str, zone: &str, key: TsigKey, ttl: u32, timeout: Duration) -> Self {
        Rfc2136Client {
            server: server.to_string(),
            zone: zone.trim_end_matches('.').to_ascii_lowercase(),
            key,
            ttl,
            timeout,
        }
    }

    pub fn zone(&self) -> &str {
        &self.zone
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The primary's address (the first its name resolves to).
    pub async fn primary(&self) -> Result<AuthServer, DnsError> {
        let mut list =
            resolve_servers(std::slice::from_ref(&self.server), &self.zone, self.timeout).await?;
        Ok(list.swap_remove(0))
    }

    fn check_owner(&self, owner: &str) -> Result<(), DnsError> {
        check_name(owner, "owner name").map_err(|reason| DnsError::Name {
            name: owner.to_string(),
            reason,
        })?;
        if !in_zone(owner, &self.zone) {
            return Err(DnsError::NotZone {
                at: At::new(&self.server, &self.zone, owner),
            });
        }
        Ok(())
    }

    /// The TXT RRset at `owner` as the primary answers it.
    pub async fn read_txt(&self, owner: &str) -> Result<TxtAnswer, DnsError> {
        self.check_owner(owner)?;
        let primary = self.primary().await?;
        query_txt(&primary, &self.zone, owner, self.timeout).await
    }

    /// Makes `value` the only TXT RR at `owner`.
    pub async fn set_txt(&self, owner: &str, value: &str) -> Result<Change, DnsError> {
        self.converge(owner, Some(value)).await
    }

    /// Deletes every TXT RR at `owner` (already none: `Unchanged`).
    pub async fn delete_txt(&self, owner: &str) -> Result<Change, DnsError> {
        self.converge(owner, None).await
    }

    /// Carries out a lifecycle write.
    pub async fn apply(&self, write: &DnsWrite<'_>) -> Result<Change, DnsError> {
        match write {
            DnsWrite::Set { owner, value } => self.set_txt(owner, value).await,
            DnsWrite::Delete { owner } => self.delete_txt(owner).await,
        }
    }

    async fn converge(&self, owner: &str, want: Option<&str>) -> Result<Change, DnsError> {
        self.check_owner(owner)?;
        let primary = self.primary().await?;
        let mut last = String::new();
        for attempt in 0..MAX_UPDATE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(retry_pause(attempt)).await;
            }
            let current = query_txt(&primary, &self.zone, owner, self.timeout).await?;
            if self.already(&current, want) {
                return Ok(Change::Unchanged);
            }
            match self.update_if(&primary, owner, &current, want).await {
                Ok(()) => {
                    return Ok(match (want, current.is_absent()) {
                        (Some(_), true) => Change::Created,
                        (Some(_), false) => Change::Replaced { previous: current },
                        (None, _) => Change::Deleted { previous: current },
                    })
                }
                Err(UpdateFailure::Prerequisite(rcode)) => last = rcode,
                Err(UpdateFailure::Error(e)) => return Err(e),
            }
        }
        Err(DnsError::Conflict {
            at: At::new(primary.to_string(), &self.zone, owner),
            attempts: MAX_UPDATE_ATTEMPTS,
            rcode: last,
        })
    }

    /// Whether `current` already is the wanted state: byte-equal value and our TTL, or nothing.
    fn already(&self, current: &TxtAnswer, want: Option<&str>) -> bool {
        match (want, current.records.as_slice()) {
            (None, []) => true,
            (Some(v), [one]) => one.value() == v && one.ttl == self.ttl,
            _ => false,
        }
    }

    /// One UPDATE: prerequisite "the TXT RRset at `owner` is exactly `expected`", then delete
    /// the RRset and (if `want`) add the one wanted RR.
    async fn update_if(
        &self,
        primary: &AuthServer,
        owner: &str,
        expected: &TxtAnswer,
        want: Option<&str>,
    ) -> Result<(), UpdateFailure> {
        let at = At::new(primary.to_string(), &self.zone, owner);
        let err = UpdateFailure::Error;
        let name = fqdn(owner).map_err(err)?;
        let mut msg = Message::query();
        msg.metadata.op_code = OpCode::Update;
        msg.metadata.recursion_desired = false;
        let mut zone = Query::new();
        zone.set_name(fqdn(&self.zone).map_err(err)?)
            .set_query_class(DNSClass::IN)
            .set_query_type(RecordType::SOA);
        msg.add_zone(zone);
        if expected.is_absent() {
            // RRset does not exist (RFC 2136 §2.4.3): class NONE, TTL 0, no RDATA.
            let mut pre = Record::update0(name.clone(), 0, RecordType::TXT);
            pre.dns_class = DNSClass::NONE;
            msg.add_pre_requisite(pre);
        } else {
            // RRset exists, value dependent (§2.4.2): the RRs as read, class IN, TTL 0.
            for r in &expected.records {
                let txt = TXT::from_bytes(r.strings.iter().map(Vec::as_slice).collect());
                msg.add_pre_requisite(Record::from_rdata(name.clone(), 0, RData::TXT(txt)));
            }
        }
        // Delete the RRset (§2.5.2): class ANY, TTL 0, no RDATA.
        let mut del = Record::update0(name.clone(), 0, RecordType::TXT);
        del.dns_class = DNSClass::ANY;
        msg.add_update(del);
        if let Some(v) = want {
            let strings = super::records::TxtRecord::from_value(v, self.ttl).strings;
            let txt = TXT::from_bytes(strings.iter().map(Vec::as_slice).collect());
            msg.add_update(Record::from_rdata(name, self.ttl, RData::TXT(txt)));
        }
        let signer = self.key.signer().map_err(err)?;
        let (tsig, verifier) = signer.sign_message(&msg, unix_now()).map_err(|e| {
            err(DnsError::Secret {
                path: self.key.source().to_path_buf(),
                reason: format!("cannot sign: {e}"),
            })
        })?;
        msg.set_signature(tsig);
        let bytes = msg.to_vec().map_err(|e| {
            err(DnsError::BadResponse {
                at: at.clone(),
                reason: format!("cannot encode the update: {e}"),
            })
        })?;
        let deadline = Instant::now() + self.timeout;
        let answer = transport::tcp(primary.addr, &bytes, deadline)
            .await
            .map_err(|f| err(transport_error(f, at.clone(), self.timeout)))?;
        // The question section of an UPDATE answer is the zone section.
        let resp = decode_answer(&answer, &msg, &at).map_err(err)?;
        let rcode = resp.metadata.response_code;
        let tsig_error = resp.signature.as_ref().and_then(|s| s.data.error);
        if let Some(failure) = update_failure(rcode, tsig_error, at.clone(), &self.key) {
            return Err(failure);
        }
        // Success must be signed by the server with our key, or it proves nothing.
        if resp.signature.is_none() {
            return Err(err(DnsError::ResponseSignature {
                at,
                reason: "the success answer is not signed".into(),
            }));
        }
        let mut verifier = verifier.ok_or_else(|| {
            err(DnsError::ResponseSignature {
                at: at.clone(),
                reason: "no verifier".into(),
            })
        })?;
        verifier.verify(&answer).map_err(|e| {
            err(DnsError::ResponseSignature {
                at: at.clone(),
                reason: e.to_string(),
            })
        })?;
        Ok(())
    }
}

/// What an UPDATE answer's RCODE and TSIG error mean; `None` for NOERROR without a TSIG error.
fn update_failure(
    rcode: ResponseCode,
    tsig_error: Option<TsigError>,
    at: At,
    key: &TsigKey,
) -> Option<UpdateFailure> {
    let e = match (rcode, tsig_error) {
        (_, Some(TsigError::BadSig)) => DnsError::BadSig {
            at,
            key: key.name().to_string(),
            secret_file: key.source().to_path_buf(),
        },
        (_, Some(TsigError::BadKey)) => DnsError::BadKey {
            at,
            key: key.name().to_string(),
            algorithm: key.algorithm().as_str(),
        },
        (_, Some(TsigError::BadTime)) => DnsError::BadTime { at },
        (ResponseCode::NoError, None) => return None,
        (ResponseCode::YXRRSet | ResponseCode::NXRRSet, _) => {
            return Some(UpdateFailure::Prerequisite(rcode_name(rcode)))
        }
        (ResponseCode::Refused, _) => DnsError::Refused {
            at,
            key: key.name().to_string(),
        },
        (ResponseCode::NotAuth, _) => DnsError::NotAuth { at },
        (ResponseCode::NotZone, _) => DnsError::NotZone { at },
        (other, tsig) => DnsError::Rcode {
            at,
            rcode: rcode_name(other),
            detail: tsig
                .map(|t| format!("TSIG error {t:?}"))
                .unwrap_or_default(),
        },
    };
    Some(UpdateFailure::Error(e))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Exponential pause with full jitter, capped.
fn retry_pause(attempt: u32) -> Duration {
    let exp = UPDATE_RETRY_BASE
        .saturating_mul(1u32 << attempt.min(10))
        .min(UPDATE_RETRY_CAP);
    let ms = u64::try_from(exp.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_pauses_grow_and_stay_under_the_cap() {
        for attempt in 1..20 {
            let p = retry_pause(attempt);
            assert!(
                p <= UPDATE_RETRY_CAP && p >= Duration::from_millis(1),
                "{p:?}"
            );
        }
    }

    #[test]
    fn update_answers_map_to_typed_errors_that_say_what_to_check() {
        let key = TsigKey::from_text(
            "keyroll",
            super::super::config::TsigAlgorithm::HmacSha256,
            "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTMyYnk=",
            std::path::Path::new("/etc/keyroll/tsig.key"),
        )
        .unwrap();
        let at = At::new("192.0.2.1:53", "example.com", "kr1._domainkey.example.com");
        let msg = |rcode, tsig| match update_failure(rcode, tsig, at.clone(), &key) {
            Some(UpdateFailure::Error(e)) => (e.kind(), e.to_string()),
            Some(UpdateFailure::Prerequisite(r)) => ("prerequisite", r),
            None => ("ok", String::new()),
        };
        assert_eq!(msg(ResponseCode::NoError, None).0, "ok");
        let (kind, s) = msg(ResponseCode::Refused, None);
        assert_eq!(kind, "refused");
        assert!(s.contains("update ACL") && s.contains("keyroll"), "{s}");
        let (kind, s) = msg(ResponseCode::NotAuth, None);
        assert_eq!(kind, "notauth");
        assert!(s.contains("not authoritative for zone example.com"), "{s}");
        let (kind, s) = msg(ResponseCode::NotAuth, Some(TsigError::BadSig));
        assert_eq!(kind, "badsig");
        assert!(s.contains("/etc/keyroll/tsig.key"), "{s}");
        assert_eq!(
            msg(ResponseCode::NotAuth, Some(TsigError::BadKey)).0,
            "badkey"
        );
        let (kind, s) = msg(ResponseCode::NotAuth, Some(TsigError::BadTime));
        assert_eq!(kind, "badtime");
        assert!(s.contains("NTP"), "{s}");
        assert_eq!(msg(ResponseCode::NotZone, None).0, "notzone");
        assert_eq!(
            msg(ResponseCode::YXRRSet, None),
            ("prerequisite", "YXRRSET".to_string())
        );
        assert_eq!(
            msg(ResponseCode::NXRRSet, None),
            ("prerequisite", "NXRRSET".to_string())
        );
        let (kind, s) = msg(ResponseCode::ServFail, None);
        assert_eq!(kind, "rcode");
        assert!(s.contains("SERVFAIL"), "{s}");
    }
}
