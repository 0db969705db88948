//! The retire hold DNS places on a DKIM key, pure: which version must stay usable (never
//! retired) because the mailer may still sign with it and its successor is not signing yet.
//!
//! Retiring the version a mailer signs with makes its signatures unverifiable the moment Vault
//! refuses to sign with it (the sidecar drops it), and a successor that is not yet served by
//! DNS cannot take over. So: **never retire the last version that is signing until its
//! successor is signing.**
//!
//! What "signing" means here, in order:
//! 1. A fresh sidecar report (`KeyFacts.signing`, from `signing::signing_version`: the lowest
//!    version over reports younger than `signing_report_max_age`) says which version signs.
//!    That version is held while any newer version is usable.
//! 2. No fresh report (no sidecar in DNS mode, or all of them gone): keyroll cannot see the
//!    mailer, so it assumes the mailer signs with the newest version that **may** sign —
//!    its record confirmed by every authoritative server and the zone's negative-caching TTL
//!    passed since (`lifecycle::may_sign`'s rule, on keyroll's recorded confirmation time).
//!    That version is held while a newer one may not sign yet; when no version may sign at
//!    all, the oldest usable one is held (nothing newer can take over). This errs on keeping
//!    versions usable longer, never on retiring one early.
//!
//! The planner (not this module) turns the answer into a `Hold` on `retire`.

use jiff::{SignedDuration, Timestamp};

use super::lifecycle::{DnsState, KeyFacts, VersionStatus};

/// The version DNS needs kept usable, and why; `None` when nothing needs holding (the newest
/// usable version is the one signing, or may sign).
pub fn retire_hold(
    facts: &KeyFacts,
    state: &DnsState,
    negative_ttl: SignedDuration,
    now: Timestamp,
) -> Option<(u32, String)> {
    let usable: Vec<u32> = facts
        .versions
        .iter()
        .filter(|f| f.status == VersionStatus::Usable)
        .map(|f| f.version)
        .collect();
    let (&oldest, &newest) = (usable.iter().min()?, usable.iter().max()?);
    if let Some(s) = facts.signing {
        if !usable.contains(&s) || s == newest {
            return None;
        }
        return Some((
            s,
            format!(
                "the mailer signs with v{s} (sidecar report) and has not switched to a newer \
                 version yet; v{s} stays usable until its successor signs"
            ),
        ));
    }
    let ready = |v: u32| {
        state.versions.get(&v).is_some_and(|r| {
            r.published_at.is_some()
                && r.revoked_at.is_none()
                && r.removed_at.is_none()
                && r.confirmed_at
                    .and_then(|c| c.checked_add(negative_ttl).ok())
                    .is_some_and(|at| now >= at)
        })
    };
    match usable.iter().copied().filter(|v| ready(*v)).max() {
        Some(v) if v == newest => None,
        Some(v) => Some((
            v,
            format!(
                "no sidecar reports which version signs; v{v} is the newest whose DKIM record is \
                 confirmed and past the negative TTL, so it stays usable until v{newest}'s is"
            ),
        )),
        None if oldest == newest => None,
        None => Some((
            oldest,
            format!(
                "no sidecar reports which version signs and no usable version's DKIM record is \
                 confirmed yet; v{oldest} stays usable until a newer one's is"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::dns::lifecycle::{VersionDns, VersionFacts};
    use crate::keyformat::DkimAlgorithm;

    const NEG: SignedDuration = SignedDuration::from_secs(300);

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    /// Versions 1..=latest, usable from `usable_from`.
    fn facts(latest: u32, usable_from: u32, signing: Option<u32>) -> KeyFacts {
        KeyFacts {
            key: "dkim".into(),
            alg: DkimAlgorithm::Ed25519,
            versions: (1..=latest)
                .map(|v| VersionFacts {
                    version: v,
                    public_key: None,
                    status: if v >= usable_from {
                        VersionStatus::Usable
                    } else {
                        VersionStatus::Retired { at: None }
                    },
                })
                .collect(),
            disposed_below: 0,
            signing,
        }
    }

    /// keyroll's DNS record with each `(version, confirmed at)`.
    fn state(confirmed: &[(u32, Option<i64>)]) -> DnsState {
        DnsState {
            versions: confirmed
                .iter()
                .map(|(v, c)| {
                    (
                        *v,
                        VersionDns {
                            owner: format!("kr{v}._domainkey.example.com"),
                            published_at: Some(t(0)),
                            confirmed_at: c.map(t),
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_reported_signing_version_is_held_until_the_mailer_moves_on() {
        let s = state(&[(1, Some(0)), (2, Some(0))]);
        let (v, why) = retire_hold(&facts(2, 1, Some(1)), &s, NEG, t(10_000)).unwrap();
        assert_eq!(v, 1);
        assert!(why.contains("signs with v1 (sidecar report)"), "{why}");
        // Switched: nothing to hold.
        assert_eq!(retire_hold(&facts(2, 1, Some(2)), &s, NEG, t(10_000)), None);
    }

    #[test]
    fn a_report_wins_over_dns_readiness() {
        // v2 may sign by DNS, but the sidecar says the mailer still signs with v1.
        let s = state(&[(1, Some(0)), (2, Some(0))]);
        assert_eq!(
            retire_hold(&facts(3, 1, Some(1)), &s, NEG, t(10_000)).map(|h| h.0),
            Some(1)
        );
    }

    #[test]
    fn without_reports_the_newest_version_that_may_sign_is_held() {
        // v2 confirmed at 100 s, negative TTL 300 s: not ready before 400 s.
        let s = state(&[(1, Some(0)), (2, Some(100))]);
        let f = facts(2, 1, None);
        let (v, why) = retire_hold(&f, &s, NEG, t(399)).unwrap();
        assert_eq!(v, 1);
        assert!(why.contains("no sidecar reports"), "{why}");
        assert_eq!(retire_hold(&f, &s, NEG, t(400)), None);
        // Not confirmed at all: v1 held.
        let s = state(&[(1, Some(0)), (2, None)]);
        assert_eq!(retire_hold(&f, &s, NEG, t(99_999)).map(|h| h.0), Some(1));
    }

    #[test]
    fn without_any_ready_version_the_oldest_usable_is_held() {
        let f = facts(3, 2, None);
        let (v, why) = retire_hold(&f, &DnsState::default(), NEG, t(0)).unwrap();
        assert_eq!(v, 2);
        assert!(
            why.contains("no usable version's DKIM record is confirmed"),
            "{why}"
        );
        // A single usable version: nothing could replace it anyway, and it is never retired.
        assert_eq!(
            retire_hold(&facts(1, 1, None), &DnsState::default(), NEG, t(0)),
            None
        );
    }

    #[test]
    fn a_revoked_record_does_not_count_as_ready() {
        let mut s = state(&[(1, Some(0)), (2, Some(0))]);
        s.versions.get_mut(&2).unwrap().revoked_at = Some(t(1));
        assert_eq!(
            retire_hold(&facts(2, 1, None), &s, NEG, t(10_000)).map(|h| h.0),
            Some(1)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The hold always names a usable version older than the newest usable one (so it
        /// never blocks the planner for nothing), and retiring up to the held version keeps
        /// the version that signs (reported, else the newest ready one) usable.
        #[test]
        fn the_hold_keeps_the_signing_version_usable(
            latest in 1u32..8,
            usable_from_off in 0u32..8,
            signing_off in proptest::option::of(0u32..10),
            confirmed in proptest::collection::vec(proptest::option::of(0i64..1000), 8),
            now in 0i64..2000,
        ) {
            let usable_from = 1 + usable_from_off % latest;
            let signing = signing_off.map(|o| 1 + o % (latest + 2));
            let f = facts(latest, usable_from, signing);
            let s = state(
                &(1..=latest)
                    .map(|v| (v, confirmed[(v - 1) as usize]))
                    .collect::<Vec<_>>(),
            );
            let hold = retire_hold(&f, &s, NEG, t(now));
            if let Some((v, why)) = &hold {
                let v = *v;
                prop_assert!(v >= usable_from && v < latest, "v{v}: {why}");
                prop_assert!(!why.is_empty());
            }
            // Whatever signs now stays usable if retirement stops at the hold.
            let keep_from = hold.map_or(latest, |h| h.0);
            match signing.filter(|s| (usable_from..=latest).contains(s)) {
                Some(sv) => prop_assert!(keep_from <= sv),
                None if signing.is_none() => {
                    let ready = (usable_from..=latest).filter(|v| {
                        confirmed[(*v - 1) as usize].is_some_and(|c| now >= c + 300)
                    }).max();
                    if let Some(r) = ready {
                        prop_assert!(keep_from <= r);
                    } else {
                        prop_assert_eq!(keep_from, if usable_from == latest { latest } else { usable_from });
                    }
                }
                None => {}
            }
        }
    }
}
