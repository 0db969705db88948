//! The sidecar's closed loop (issue 9 item 3), pure: whether a new DKIM version may start
//! signing because the sidecar itself sees its record served, and why not yet.
//!
//! keyroll's own gate ([`super::lifecycle::may_sign`]) works from keyroll's record of what it
//! published; the sidecar knows nothing about who publishes (keyroll, external-dns, a person),
//! so this gate works from answers alone:
//!
//! 1. each check asks every configured (or NS-listed) server for TXT at the version's owner;
//!    the version is *served* when every server answers exactly one DKIM record whose `p=` is
//!    the version's public key ([`super::records::serves_key`]);
//! 2. the first check that finds it served starts the clock; a later check that finds it
//!    absent or different stops the clock again (it must be seen served afresh); a check that
//!    cannot reach a server neither starts nor stops it;
//! 3. the version is *confirmed* at the first check that finds it served at least the zone's
//!    negative-caching TTL after the clock started (RFC 2308: a resolver that asked before
//!    the record existed may cache the NXDOMAIN that long).
//!
//! Confirmation is sticky: once a version may sign, a later DNS problem never moves signing
//! back (the older record may already be on its way out); it is reported instead.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use super::records::{serves_key, DkimTags, TxtAnswer};
use crate::keyformat::{self, DkimAlgorithm, Ed25519Export};
use crate::render::VersionMaterial;
use crate::KeyType;

/// What one server said about one owner name: its answer, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Answer(TxtAnswer),
    /// The server could not be asked (timeout, unreachable, not authoritative, SERVFAIL…).
    Failed(String),
}

/// One check's verdict for one version, over every server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Seen {
    /// Every server answers exactly one record with the version's `p=`.
    Served,
    /// A server answers without the record (NXDOMAIN, no TXT, or several TXT records).
    Missing { server: String, answer: String },
    /// A server answers one DKIM record with another `p=`: somebody published the wrong key.
    WrongKey { server: String, found: String },
    /// A server could not be asked; nothing is concluded.
    Unreachable { server: String, error: String },
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seen::Served => f.write_str("served by every server"),
            Seen::Missing { server, answer } => write!(f, "{server} answers {answer}"),
            Seen::WrongKey { server, found } => write!(
                f,
                "{server} serves another key (p={found}); the record does not match this version"
            ),
            Seen::Unreachable { server, error } => write!(f, "{server} not answering: {error}"),
        }
    }
}

/// The shortest prefix of a foreign `p=` shown in messages (public data, but long).
const SHOWN_P: usize = 16;

/// Judges one check of one version: `expected_p` is the base64 `p=` of the version's key,
/// `probes` every server's answer. With no server at all nothing can be confirmed.
pub fn judge(expected_p: &str, probes: &[(String, Probe)]) -> Seen {
    if probes.is_empty() {
        return Seen::Unreachable {
            server: "(none)".into(),
            error: "no server to ask".into(),
        };
    }
    let mut missing = None;
    let mut unreachable = None;
    for (server, probe) in probes {
        match probe {
            Probe::Failed(e) => {
                unreachable.get_or_insert_with(|| Seen::Unreachable {
                    server: server.clone(),
                    error: e.clone(),
                });
            }
            Probe::Answer(a) if serves_key(a, expected_p) => {}
            Probe::Answer(a) => {
                if let [one] = a.records.as_slice() {
                    if let Some(tags) = DkimTags::parse(&one.value()) {
                        let p = tags.public_key();
                        if !p.is_empty() {
                            // The worst news wins: a wrong key is reported before anything else.
                            return Seen::WrongKey {
                                server: server.clone(),
                                found: format!("{}…", &p[..p.len().min(SHOWN_P)]),
                            };
                        }
                    }
                }
                missing.get_or_insert_with(|| Seen::Missing {
                    server: server.clone(),
                    answer: a.to_string(),
                });
            }
        }
    }
    missing.or(unreachable).unwrap_or(Seen::Served)
}

/// What the gate knows about one version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VersionGate {
    /// When this version was first checked (it was delivered but not yet signing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<Timestamp>,
    /// Start of the current run of checks finding it served by every server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_since: Option<Timestamp>,
    /// When it was confirmed (may sign from then on, for good).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<Timestamp>,
    /// The last check's verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<Seen>,
}

impl VersionGate {
    /// A version known to sign already (e.g. the live SigningTable's after a restart).
    pub fn already_signing(now: Timestamp) -> Self {
        VersionGate {
            confirmed_at: Some(now),
            ..Default::default()
        }
    }

    pub fn confirmed(&self) -> bool {
        self.confirmed_at.is_some()
    }

    /// Takes one check's verdict at `now`; `negative_ttl` is the zone's, when known (without
    /// it nothing is confirmed: the wait cannot be bounded).
    pub fn observe(&mut self, seen: Seen, negative_ttl: Option<Duration>, now: Timestamp) {
        self.waiting_since.get_or_insert(now);
        if self.confirmed() {
            self.last = Some(seen);
            return;
        }
        match &seen {
            Seen::Served => {
                let since = *self.served_since.get_or_insert(now);
                if let Some(ttl) = negative_ttl {
                    if ready_at(since, ttl).is_some_and(|at| at <= now) {
                        self.confirmed_at = Some(now);
                    }
                }
            }
            Seen::Missing { .. } | Seen::WrongKey { .. } => self.served_since = None,
            Seen::Unreachable { .. } => {}
        }
        self.last = Some(seen);
    }

    /// When a check would next be able to confirm this version (the negative TTL running
    /// out), if its clock runs.
    pub fn due(&self, negative_ttl: Option<Duration>) -> Option<Timestamp> {
        if self.confirmed() {
            return None;
        }
        ready_at(self.served_since?, negative_ttl?)
    }

    /// Why this version does not sign yet, in words.
    pub fn reason(&self, negative_ttl: Option<Duration>) -> String {
        match (&self.last, self.served_since, negative_ttl) {
            (_, _, _) if self.confirmed() => "confirmed".into(),
            (None, _, _) => "not checked yet".into(),
            (Some(Seen::Served), Some(since), Some(ttl)) => format!(
                "served by every server since {since}; resolvers may cache its earlier absence \
                 for the zone's negative TTL ({}), until {}",
                crate::duration::compact(ttl),
                ready_at(since, ttl).map_or("(overflow)".into(), |t| t.to_string())
            ),
            (Some(Seen::Served), _, None) => {
                "served by every server, but the zone's SOA (negative TTL) could not be read".into()
            }
            (Some(seen), _, _) => seen.to_string(),
        }
    }
}

fn ready_at(since: Timestamp, ttl: Duration) -> Option<Timestamp> {
    since.checked_add(SignedDuration::try_from(ttl).ok()?).ok()
}

/// The gate of one key: every version's state and the zone's negative TTL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyGate {
    pub versions: BTreeMap<u32, VersionGate>,
    pub negative_ttl: Option<Duration>,
}

impl KeyGate {
    /// The versions allowed to sign as far as DNS is concerned.
    pub fn confirmed(&self) -> BTreeSet<u32> {
        self.versions
            .iter()
            .filter(|(_, g)| g.confirmed())
            .map(|(v, _)| *v)
            .collect()
    }

    /// The versions allowed to sign when this process does not know yet which version the
    /// mailer signs with (a cold start without a live SigningTable, `--once`): the confirmed
    /// ones, else the newest one every server serves right now — a better first guess than the
    /// oldest version, whose record may be on its way out — else none (the oldest signs).
    pub fn allowed(&self, signing_known: bool) -> BTreeSet<u32> {
        let confirmed = self.confirmed();
        if signing_known || !confirmed.is_empty() {
            return confirmed;
        }
        self.versions
            .iter()
            .filter(|(_, g)| g.last == Some(Seen::Served))
            .map(|(v, _)| *v)
            .max()
            .into_iter()
            .collect()
    }

    /// The versions a check must ask about: usable ones newer than the one signing (every one
    /// when that is unknown), not yet confirmed. Steady state (the newest version signs) asks
    /// nothing.
    pub fn to_check(&self, usable: &[u32], signing: Option<u32>) -> Vec<u32> {
        let floor = signing.unwrap_or(0);
        let mut v: Vec<u32> = usable
            .iter()
            .copied()
            .filter(|v| *v > floor && !self.versions.get(v).is_some_and(VersionGate::confirmed))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Forgets versions no longer usable (trimmed): their records are none of the gate's
    /// business any more.
    pub fn retain(&mut self, usable: &[u32]) {
        self.versions.retain(|v, _| usable.contains(v));
    }

    /// Earliest time a check could confirm a waiting version.
    pub fn due(&self) -> Option<Timestamp> {
        self.versions
            .values()
            .filter_map(|g| g.due(self.negative_ttl))
            .min()
    }
}

/// The base64 `p=` a version's record must carry: SPKI DER for RSA (from transit's
/// `public_key`), the raw 32 bytes for ed25519 (transit's `public_key`, else the export's
/// public half). Never reads or returns private material beyond the public half.
pub fn expected_p(key_type: KeyType, v: &VersionMaterial) -> Result<String, String> {
    use secrecy::ExposeSecret;
    let bytes = match key_type {
        t if t.is_rsa() => {
            let pem = v
                .public
                .as_deref()
                .ok_or_else(|| format!("version {} has no public key", v.version))?;
            keyformat::spki_pem_to_der(pem).map_err(|e| format!("version {}: {e}", v.version))?
        }
        KeyType::Ed25519 => match v.public.as_deref() {
            Some(b64) => keyformat::ed25519_public_raw(b64)
                .map_err(|e| format!("version {}: {e}", v.version))?
                .to_vec(),
            None => Ed25519Export::parse(v.private.expose_secret())
                .map_err(|e| format!("version {}: {e}", v.version))?
                .public()
                .to_vec(),
        },
        other => return Err(format!("{other:?} keys do not sign DKIM")),
    };
    Ok(STANDARD.encode(bytes))
}

/// The algorithm a DKIM-capable key type publishes under.
pub fn algorithm(key_type: KeyType) -> Option<DkimAlgorithm> {
    match key_type {
        t if t.is_rsa() => Some(DkimAlgorithm::Rsa),
        KeyType::Ed25519 => Some(DkimAlgorithm::Ed25519),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "MCowBQYDK2VwAyEAabc";

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn answer(values: &[&str]) -> Probe {
        Probe::Answer(TxtAnswer::of(values, 300))
    }

    fn good() -> Probe {
        answer(&[&format!("v=DKIM1; k=ed25519; p={P}")])
    }

    fn probes(list: Vec<Probe>) -> Vec<(String, Probe)> {
        list.into_iter()
            .enumerate()
            .map(|(i, p)| (format!("ns{i}"), p))
            .collect()
    }

    #[test]
    fn served_means_every_server_answers_the_versions_key() {
        assert_eq!(judge(P, &probes(vec![good(), good()])), Seen::Served);
        // Other tags (a hand-added t=y) still carry the key.
        let t = answer(&[&format!("v=DKIM1; k=ed25519; t=y; p={P}")]);
        assert_eq!(judge(P, &probes(vec![t])), Seen::Served);
        let absent = Probe::Answer(TxtAnswer::absent(true));
        assert!(matches!(
            judge(P, &probes(vec![good(), absent])),
            Seen::Missing { server, answer } if server == "ns1" && answer == "NXDOMAIN"
        ));
        let several = answer(&[&format!("v=DKIM1; k=ed25519; p={P}"), "v=DKIM1; p=xyz"]);
        assert!(matches!(
            judge(P, &probes(vec![several])),
            Seen::Missing { .. }
        ));
        assert!(matches!(judge(P, &[]), Seen::Unreachable { .. }));
    }

    #[test]
    fn a_wrong_key_outranks_absence_and_outages_and_is_never_served() {
        let wrong = answer(&["v=DKIM1; k=ed25519; p=c29tZW9uZSBlbHNl"]);
        let down = Probe::Failed("timeout".into());
        let absent = Probe::Answer(TxtAnswer::absent(false));
        match judge(P, &probes(vec![down, absent, wrong])) {
            Seen::WrongKey { server, found } => {
                assert_eq!(server, "ns2");
                assert!(found.starts_with("c29tZW9uZSBl"), "{found}");
            }
            other => panic!("{other:?}"),
        }
        // A revoked record (empty p=) is not a wrong key, just not this one.
        let revoked = answer(&["v=DKIM1; k=ed25519; p="]);
        assert!(matches!(
            judge(P, &probes(vec![revoked])),
            Seen::Missing { .. }
        ));
        let down = Probe::Failed("timeout".into());
        assert!(matches!(
            judge(P, &probes(vec![good(), down])),
            Seen::Unreachable { server, .. } if server == "ns1"
        ));
    }

    #[test]
    fn confirmation_needs_the_negative_ttl_of_uninterrupted_service() {
        let ttl = Some(Duration::from_secs(5));
        let mut g = VersionGate::default();
        g.observe(Seen::Served, ttl, ts("2026-01-01T00:00:00Z"));
        assert!(!g.confirmed());
        assert_eq!(g.due(ttl), Some(ts("2026-01-01T00:00:05Z")));
        assert!(
            g.reason(ttl).contains("until 2026-01-01T00:00:05Z"),
            "{}",
            g.reason(ttl)
        );
        g.observe(Seen::Served, ttl, ts("2026-01-01T00:00:04Z"));
        assert!(!g.confirmed());
        // Gone again: the clock stops, and restarts from the next sighting.
        let gone = Seen::Missing {
            server: "ns0".into(),
            answer: "NXDOMAIN".into(),
        };
        g.observe(gone, ttl, ts("2026-01-01T00:00:06Z"));
        assert_eq!(g.served_since, None);
        g.observe(Seen::Served, ttl, ts("2026-01-01T00:00:07Z"));
        g.observe(Seen::Served, ttl, ts("2026-01-01T00:00:11Z"));
        assert!(!g.confirmed(), "only 4 s since it came back");
        g.observe(Seen::Served, ttl, ts("2026-01-01T00:00:12Z"));
        assert!(g.confirmed());
        assert_eq!(g.due(ttl), None);
        assert_eq!(g.waiting_since, Some(ts("2026-01-01T00:00:00Z")));
    }

    #[test]
    fn an_outage_neither_starts_nor_stops_the_clock_and_confirmation_is_sticky() {
        let ttl = Some(Duration::from_secs(5));
        let down = Seen::Unreachable {
            server: "ns0".into(),
            error: "timeout".into(),
        };
        let mut g = VersionGate::default();
        g.observe(down.clone(), ttl, ts("2026-01-01T00:00:00Z"));
        assert_eq!(g.served_since, None);
        g.observe(Seen::Served, ttl, ts("2026-01-01T00:00:01Z"));
        g.observe(down.clone(), ttl, ts("2026-01-01T00:00:09Z"));
        assert!(!g.confirmed(), "an unreachable server confirms nothing");
        assert_eq!(g.served_since, Some(ts("2026-01-01T00:00:01Z")));
        g.observe(Seen::Served, ttl, ts("2026-01-01T00:00:10Z"));
        assert!(g.confirmed());
        let wrong = Seen::WrongKey {
            server: "ns0".into(),
            found: "x".into(),
        };
        g.observe(wrong, ttl, ts("2026-01-01T00:01:00Z"));
        assert!(g.confirmed(), "a later problem never un-confirms");
        // Without a known negative TTL nothing is confirmed.
        let mut h = VersionGate::default();
        h.observe(Seen::Served, None, ts("2026-01-01T00:00:00Z"));
        h.observe(Seen::Served, None, ts("2026-01-02T00:00:00Z"));
        assert!(!h.confirmed());
    }

    #[test]
    fn a_cold_start_allows_the_newest_version_served_now_until_one_is_confirmed() {
        let now = ts("2026-01-01T00:00:00Z");
        let ttl = Some(Duration::from_secs(5));
        let mut k = KeyGate::default();
        let gone = Seen::Missing {
            server: "ns0".into(),
            answer: "NXDOMAIN".into(),
        };
        k.versions
            .entry(1)
            .or_default()
            .observe(Seen::Served, ttl, now);
        k.versions
            .entry(2)
            .or_default()
            .observe(Seen::Served, ttl, now);
        k.versions.entry(3).or_default().observe(gone, ttl, now);
        assert_eq!(k.allowed(false), BTreeSet::from([2]));
        // Once this process knows what signs, only confirmed versions may.
        assert_eq!(k.allowed(true), BTreeSet::new());
        k.versions.insert(1, VersionGate::already_signing(now));
        assert_eq!(k.allowed(false), BTreeSet::from([1]));
    }

    #[test]
    fn only_unconfirmed_versions_newer_than_the_signing_one_are_checked() {
        let mut k = KeyGate::default();
        assert_eq!(k.to_check(&[1, 2, 3], Some(1)), [2, 3]);
        assert_eq!(k.to_check(&[1, 2, 3], None), [1, 2, 3]);
        k.versions
            .insert(2, VersionGate::already_signing(ts("2026-01-01T00:00:00Z")));
        assert_eq!(k.to_check(&[1, 2, 3], Some(1)), [3]);
        assert_eq!(k.to_check(&[1, 2, 3], Some(3)), Vec::<u32>::new());
        assert_eq!(k.confirmed(), BTreeSet::from([2]));
        k.retain(&[3]);
        assert!(k.versions.is_empty());
    }
}
