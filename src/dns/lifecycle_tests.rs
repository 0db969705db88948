//! Tests of the DKIM record lifecycle: scenarios with their reasons, and property tests of its
//! invariants against a small model of a primary and a secondary server.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use proptest::prelude::*;

use super::*;
use crate::dns::records::{record_value, revoked_value, SelectorTemplate};
use crate::duration::Span;
use crate::vault::transit::TransitKey;

const DAY: i64 = 86_400;

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn policy(revoke: i64, remove: i64) -> KeyDns {
    KeyDns {
        target: "primary".into(),
        domain: "example.com".into(),
        selector: SelectorTemplate::default(),
        revoke_after: Span::from_secs(revoke as u64),
        remove_after: Span::from_secs(remove as u64),
        signing_report_max_age: Span::from_secs(2 * DAY as u64),
    }
}

fn pk(v: u32) -> String {
    STANDARD.encode([v as u8; 32])
}

fn value(v: u32) -> String {
    record_value(DkimAlgorithm::Ed25519, v, &pk(v)).unwrap()
}

fn owner(v: u32) -> String {
    format!("kr{v}._domainkey.example.com")
}

/// Versions `min_avail.max(1)..min_dec` retired (at `retired[v]` if given), the rest usable.
fn facts(latest: u32, min_dec: u32, min_avail: u32, retired: &[(u32, i64)]) -> KeyFacts {
    let retired: BTreeMap<u32, i64> = retired.iter().copied().collect();
    KeyFacts {
        key: "dkim".into(),
        alg: DkimAlgorithm::Ed25519,
        versions: (min_avail.max(1)..=latest)
            .map(|v| VersionFacts {
                version: v,
                public_key: Some(pk(v)),
                status: if v < min_dec {
                    VersionStatus::Retired {
                        at: retired.get(&v).map(|s| t(*s)),
                    }
                } else {
                    VersionStatus::Usable
                },
            })
            .collect(),
        disposed_below: min_avail,
        signing: None,
    }
}

/// Answers from a primary and one secondary.
#[derive(Debug, Clone, Default)]
struct World {
    primary: BTreeMap<String, Vec<String>>,
    secondary: BTreeMap<String, Vec<String>>,
}

impl World {
    fn answer(map: &BTreeMap<String, Vec<String>>, owner: &str) -> TxtAnswer {
        match map.get(owner) {
            Some(v) if !v.is_empty() => {
                TxtAnswer::of(&v.iter().map(String::as_str).collect::<Vec<_>>(), 300)
            }
            _ => TxtAnswer::absent(true),
        }
    }

    fn observe(&self, owners: &[OwnerCheck]) -> BTreeMap<u32, OwnerObservation> {
        owners
            .iter()
            .map(|c| {
                let o = &c.owner;
                (
                    c.version,
                    OwnerObservation {
                        primary: Some(Ok(Self::answer(&self.primary, o))),
                        servers: if c.all_servers {
                            vec![
                                ("ns1".into(), Ok(Self::answer(&self.primary, o))),
                                ("ns2".into(), Ok(Self::answer(&self.secondary, o))),
                            ]
                        } else {
                            Vec::new()
                        },
                    },
                )
            })
            .collect()
    }

    /// Carries out the plan's DNS writes on the primary and records every action.
    fn apply(&mut self, plan: &DnsPlan, state: &mut DnsState, now: Timestamp) {
        for a in &plan.actions {
            match a.write() {
                Some(DnsWrite::Set { owner, value }) => {
                    self.primary.insert(owner.into(), vec![value.into()]);
                }
                Some(DnsWrite::Delete { owner }) => {
                    self.primary.remove(owner);
                }
                None => {}
            }
            state.record(a, now);
        }
    }

    fn sync(&mut self) {
        self.secondary = self.primary.clone();
    }
}

fn run(pol: &KeyDns, f: &KeyFacts, state: &DnsState, world: &World, now: Timestamp) -> DnsPlan {
    let obs = world.observe(&owners_to_check(pol, f, state));
    plan_dns(pol, f, state, &obs, now)
}

fn verbs(p: &DnsPlan) -> Vec<&'static str> {
    p.actions.iter().map(DnsAction::verb).collect()
}

#[test]
fn a_new_version_is_published_then_confirmed_once_every_server_answers() {
    let pol = policy(DAY, DAY);
    let f = facts(1, 1, 0, &[]);
    let mut state = DnsState::default();
    let mut w = World::default();
    let p = run(&pol, &f, &state, &w, t(0));
    assert_eq!(
        p.actions,
        vec![DnsAction::Publish {
            version: 1,
            owner: owner(1),
            value: value(1),
            reason: "v1 has no DNS record yet; it must be served before it signs".into()
        }]
    );
    w.apply(&p, &mut state, t(0));
    // The secondary has not transferred the zone yet: not confirmed, and not a problem.
    let p = run(&pol, &f, &state, &w, t(1));
    assert!(p.actions.is_empty() && p.problems.is_empty(), "{p:?}");
    w.sync();
    let p = run(&pol, &f, &state, &w, t(2));
    assert_eq!(verbs(&p), ["dns-confirm"]);
    assert_eq!(
        p.actions[0].reason(),
        "kr1._domainkey.example.com is answered exactly by all 2 authoritative server(s)"
    );
    w.apply(&p, &mut state, t(2));
    assert_eq!(state.versions[&1].stage(), Stage::Confirmed);
    assert!(run(&pol, &f, &state, &w, t(3)).actions.is_empty());
}

#[test]
fn may_sign_waits_for_confirmation_and_the_negative_ttl() {
    let pol = policy(DAY, DAY);
    let f = facts(1, 1, 0, &[]);
    let mut state = DnsState::default();
    let mut w = World::default();
    let neg = SignedDuration::from_secs(60);
    let gate = |state: &DnsState, w: &World, now| {
        let obs = w.observe(&owners_to_check(&pol, &f, state));
        may_sign(&f, state, &obs, 1, neg, now)
    };
    assert!(matches!(gate(&state, &w, t(0)), SignGate::Waiting(_)));
    w.apply(&run(&pol, &f, &state, &w, t(0)), &mut state, t(0));
    w.sync();
    assert!(
        matches!(gate(&state, &w, t(1)), SignGate::Waiting(ref s) if s.contains("not yet answered"))
    );
    w.apply(&run(&pol, &f, &state, &w, t(10)), &mut state, t(10));
    let SignGate::Waiting(why) = gate(&state, &w, t(69)) else {
        panic!("ready before the negative TTL passed")
    };
    assert!(why.contains("negative TTL"), "{why}");
    assert_eq!(gate(&state, &w, t(70)), SignGate::Ready);
    // Someone deletes it at the secondary: not ready any more.
    w.secondary.clear();
    assert!(
        matches!(gate(&state, &w, t(100)), SignGate::Waiting(ref s) if s.contains("ns2 answers NXDOMAIN"))
    );
}

#[test]
fn a_deleted_or_edited_record_is_put_back_and_reported() {
    let pol = policy(DAY, DAY);
    let f = facts(1, 1, 0, &[]);
    let mut state = DnsState::default();
    let mut w = World::default();
    w.apply(&run(&pol, &f, &state, &w, t(0)), &mut state, t(0));
    w.sync();
    w.apply(&run(&pol, &f, &state, &w, t(1)), &mut state, t(1));
    w.primary.clear();
    w.sync();
    let p = run(&pol, &f, &state, &w, t(2));
    assert_eq!(verbs(&p), ["dns-restore"]);
    assert_eq!(
        p.actions[0].reason(),
        "kr1._domainkey.example.com answers NXDOMAIN at the primary instead of v1's key; putting it back"
    );
    // The restore is the report (event dns_restored); the servers not answering while it is
    // put back is not a second problem needing a person (exit 3).
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    w.apply(&p, &mut state, t(2));
    assert_eq!(state.versions[&1].restored_at, Some(t(2)));
    w.primary
        .insert(owner(1), vec![value(1), "v=DKIM1; p=AAAA".into()]);
    let p = run(&pol, &f, &state, &w, t(3));
    assert_eq!(verbs(&p), ["dns-restore"]);
    assert!(p.actions[0].reason().contains("2 TXT records"));
}

#[test]
fn retirement_revokes_after_the_grace_and_removes_later() {
    let pol = policy(7 * DAY, 30 * DAY);
    let mut state = DnsState::default();
    let mut w = World::default();
    let f = facts(2, 1, 0, &[]);
    w.apply(&run(&pol, &f, &state, &w, t(0)), &mut state, t(0));
    w.sync();
    w.apply(&run(&pol, &f, &state, &w, t(1)), &mut state, t(1));
    // v1 retired at day 10.
    let f = facts(2, 2, 0, &[(1, 10 * DAY)]);
    assert!(run(&pol, &f, &state, &w, t(17 * DAY - 1))
        .actions
        .is_empty());
    let p = run(&pol, &f, &state, &w, t(17 * DAY));
    assert_eq!(
        p.actions,
        vec![DnsAction::Revoke {
            version: 1,
            owner: owner(1),
            value: revoked_value(DkimAlgorithm::Ed25519),
            reason: "v1 retired 7d ago; revoke_after = 7days".into()
        }]
    );
    w.apply(&p, &mut state, t(17 * DAY));
    assert_eq!(state.versions[&1].stage(), Stage::Revoked);
    assert!(run(&pol, &f, &state, &w, t(47 * DAY - 1))
        .actions
        .is_empty());
    let p = run(&pol, &f, &state, &w, t(47 * DAY));
    assert_eq!(verbs(&p), ["dns-remove"]);
    assert_eq!(
        p.actions[0].reason(),
        "v1 revoked 30d ago; remove_after = 30days"
    );
    w.apply(&p, &mut state, t(47 * DAY));
    assert!(!w.primary.contains_key(&owner(1)));
    assert!(run(&pol, &f, &state, &w, t(48 * DAY)).actions.is_empty());
    // Someone puts it back by hand: removed again.
    w.primary.insert(owner(1), vec![value(1)]);
    let p = run(&pol, &f, &state, &w, t(49 * DAY));
    assert_eq!(verbs(&p), ["dns-remove"]);
    assert!(
        p.actions[0].reason().contains("again"),
        "{}",
        p.actions[0].reason()
    );
}

#[test]
fn a_retirement_without_a_time_on_record_starts_the_grace_now() {
    let pol = policy(DAY, DAY);
    let mut state = DnsState::default();
    let mut w = World::default();
    let f = facts(2, 2, 0, &[]);
    let p = run(&pol, &f, &state, &w, t(0));
    assert_eq!(
        verbs(&p),
        ["dns-note-retired", "dns-publish", "dns-publish"]
    );
    w.apply(&p, &mut state, t(0));
    assert_eq!(state.versions[&1].retired_seen, Some(t(0)));
    assert!(!verbs(&run(&pol, &f, &state, &w, t(DAY - 1))).contains(&"dns-revoke"));
    assert!(verbs(&run(&pol, &f, &state, &w, t(DAY))).contains(&"dns-revoke"));
}

#[test]
fn disposal_removes_the_record_at_the_latest() {
    let pol = policy(7 * DAY, 30 * DAY);
    let mut state = DnsState::default();
    let mut w = World::default();
    let f = facts(2, 1, 0, &[]);
    w.apply(&run(&pol, &f, &state, &w, t(0)), &mut state, t(0));
    let f = facts(2, 2, 2, &[]);
    let p = run(&pol, &f, &state, &w, t(DAY));
    assert_eq!(verbs(&p), ["dns-remove"]);
    assert!(p.actions[0].reason().contains("disposed"));
    w.apply(&p, &mut state, t(DAY));
    // Done: a removed, disposed version is not asked about any more.
    assert_eq!(
        owners_to_check(&pol, &f, &state),
        vec![OwnerCheck {
            version: 2,
            owner: owner(2),
            all_servers: true
        }]
    );
}

#[test]
fn nothing_the_mailer_signs_with_is_revoked_or_removed() {
    let pol = policy(DAY, DAY);
    let mut state = DnsState::default();
    let mut w = World::default();
    let f = facts(2, 1, 0, &[]);
    w.apply(&run(&pol, &f, &state, &w, t(0)), &mut state, t(0));
    let mut f = facts(2, 2, 0, &[(1, 0)]);
    f.signing = Some(1);
    let p = run(&pol, &f, &state, &w, t(10 * DAY));
    assert!(p.actions.is_empty(), "{p:?}");
    assert!(p.problems[0].contains("still signs"), "{:?}", p.problems);
    f.signing = Some(2);
    assert_eq!(
        verbs(&run(&pol, &f, &state, &w, t(10 * DAY))),
        ["dns-revoke", "dns-signing"]
    );
}

#[test]
fn a_reversed_retirement_publishes_the_key_again() {
    let pol = policy(DAY, DAY);
    let mut state = DnsState::default();
    let mut w = World::default();
    let f = facts(2, 2, 0, &[(1, 0)]);
    w.apply(&run(&pol, &f, &state, &w, t(0)), &mut state, t(0));
    w.apply(&run(&pol, &f, &state, &w, t(DAY)), &mut state, t(DAY));
    assert_eq!(state.versions[&1].stage(), Stage::Revoked);
    let f = facts(2, 1, 0, &[]);
    let p = run(&pol, &f, &state, &w, t(DAY + 1));
    assert_eq!(verbs(&p), ["dns-publish"]);
    assert!(p.actions[0].reason().contains("usable again"));
    w.apply(&p, &mut state, t(DAY + 1));
    assert_eq!(state.versions[&1].stage(), Stage::Published);
    assert_eq!(w.primary[&owner(1)], vec![value(1)]);
}

#[test]
fn a_changed_template_keeps_old_records_where_they_were() {
    let mut pol = policy(DAY, DAY);
    let mut state = DnsState::default();
    let mut w = World::default();
    let f = facts(1, 1, 0, &[]);
    w.apply(&run(&pol, &f, &state, &w, t(0)), &mut state, t(0));
    pol.selector = SelectorTemplate::parse("k{version}").unwrap();
    let f = facts(2, 2, 0, &[(1, 0)]);
    let p = run(&pol, &f, &state, &w, t(2 * DAY));
    assert_eq!(verbs(&p), ["dns-revoke", "dns-publish"]);
    assert_eq!(p.actions[0].owner(), owner(1));
    assert_eq!(p.actions[1].owner(), "k2._domainkey.example.com");
}

#[test]
fn a_template_that_would_reuse_a_recorded_owner_is_refused() {
    let mut pol = policy(DAY, DAY);
    pol.selector = SelectorTemplate::parse("a{version}").unwrap();
    let mut state = DnsState::default();
    state.versions.insert(
        1,
        VersionDns {
            owner: "a11._domainkey.example.com".into(),
            published_at: Some(t(0)),
            ..Default::default()
        },
    );
    let mut f = facts(11, 1, 0, &[]);
    f.versions.retain(|v| v.version == 1 || v.version == 11);
    let p = plan_dns(&pol, &f, &state, &BTreeMap::new(), t(1));
    assert!(p.actions.iter().all(|a| a.version() != 11), "{p:?}");
    assert!(
        p.problems.iter().any(|s| s.contains("never reused")),
        "{:?}",
        p.problems
    );
}

#[test]
fn facts_from_a_transit_key_follow_its_minimums() {
    let key = TransitKey {
        name: "dkim".into(),
        key_type: "ed25519".into(),
        exportable: false,
        deletion_allowed: false,
        latest_version: 4,
        min_decryption_version: 3,
        min_encryption_version: 0,
        min_available_version: 2,
        versions: (2..=4).map(|v| (v, t(v as i64))).collect(),
        public_keys: (2..=4).map(|v| (v, pk(v))).collect(),
    };
    let f = KeyFacts::from_transit(&key, &[(2, t(9))].into(), Some(4)).unwrap();
    assert_eq!(f.disposed_below, 2);
    assert_eq!(f.signing, Some(4));
    assert_eq!(
        f.versions
            .iter()
            .map(|v| (v.version, v.status))
            .collect::<Vec<_>>(),
        [
            (2, VersionStatus::Retired { at: Some(t(9)) }),
            (3, VersionStatus::Usable),
            (4, VersionStatus::Usable)
        ]
    );
    assert_eq!(f.versions[0].public_key.as_deref(), Some(pk(2).as_str()));
    let mut aes = key.clone();
    aes.key_type = "aes256-gcm96".into();
    assert!(KeyFacts::from_transit(&aes, &BTreeMap::new(), None).is_err());
}

#[test]
fn zone_records_follow_the_recorded_stages() {
    let pol = policy(DAY, DAY);
    let mut state = DnsState::default();
    let mut w = World::default();
    let f = facts(3, 1, 0, &[]);
    w.apply(&run(&pol, &f, &state, &w, t(0)), &mut state, t(0));
    let f = facts(3, 3, 0, &[(1, 0), (2, DAY)]);
    w.apply(&run(&pol, &f, &state, &w, t(DAY)), &mut state, t(DAY));
    w.apply(
        &run(&pol, &f, &state, &w, t(2 * DAY)),
        &mut state,
        t(2 * DAY),
    );
    assert_eq!(state.versions[&1].stage(), Stage::Removed);
    assert_eq!(state.versions[&2].stage(), Stage::Revoked);
    assert_eq!(
        zone_records(&f, &state),
        vec![
            (owner(2), revoked_value(DkimAlgorithm::Ed25519)),
            (owner(3), value(3))
        ]
    );
    // The same content the primary holds after the same actions.
    let mut from_primary: Vec<(String, String)> = w
        .primary
        .iter()
        .map(|(o, v)| (o.clone(), v[0].clone()))
        .collect();
    from_primary.sort();
    assert_eq!(zone_records(&f, &state), from_primary);
}

#[test]
fn a_version_that_comes_back_with_another_key_never_reuses_its_selector() {
    let pol = policy(DAY, DAY);
    let mut state = DnsState::default();
    let mut w = World::default();
    let f = facts(1, 1, 0, &[]);
    w.apply(&run(&pol, &f, &state, &w, t(0)), &mut state, t(0));
    // The transit key was deleted and created again: v1 exists with another public key.
    let mut f2 = f.clone();
    f2.versions[0].public_key = Some(STANDARD.encode([99u8; 32]));
    let p = run(&pol, &f2, &state, &w, t(1));
    assert!(p.actions.is_empty(), "{p:?}");
    assert!(
        p.problems[0].contains("another public key"),
        "{:?}",
        p.problems
    );
    assert_eq!(w.primary[&owner(1)], vec![value(1)]);
    // Whitespace or string splits in the same key are the same key.
    assert_eq!(
        key_fingerprint(&value(1)),
        key_fingerprint(&value(1).replace("p=", "p= "))
    );
}

#[test]
fn state_round_trips_through_json() {
    let mut state = DnsState::default();
    state.record(
        &DnsAction::Publish {
            version: 3,
            owner: owner(3),
            value: value(3),
            reason: String::new(),
        },
        t(5),
    );
    let json = serde_json::to_string(&state).unwrap();
    assert_eq!(
        json,
        format!(
            r#"{{"versions":{{"3":{{"owner":"kr3._domainkey.example.com","key":"{}","value":"{}","published_at":"2027-01-15T08:00:05Z"}}}}}}"#,
            key_fingerprint(&value(3)),
            value(3)
        )
    );
    assert_eq!(serde_json::from_str::<DnsState>(&json).unwrap(), state);
    assert_eq!(
        serde_json::from_str::<DnsState>("{}").unwrap(),
        DnsState::default()
    );
}

/// Vault stops reporting a retired version's public key; its record (recorded at publication)
/// still stays served, rendered into a zone file and checked until it is revoked.
#[test]
fn a_retired_version_without_a_public_key_in_vault_keeps_its_recorded_record() {
    let mut state = DnsState::default();
    let publish = DnsAction::Publish {
        version: 1,
        owner: owner(1),
        value: value(1),
        reason: String::new(),
    };
    state.record(&publish, t(0));
    let facts = KeyFacts {
        key: "dkim".into(),
        alg: DkimAlgorithm::Ed25519,
        versions: vec![
            VersionFacts {
                version: 1,
                public_key: None,
                status: VersionStatus::Retired { at: Some(t(10)) },
            },
            VersionFacts {
                version: 2,
                public_key: Some(pk(2)),
                status: VersionStatus::Usable,
            },
        ],
        disposed_below: 0,
        signing: None,
    };
    assert!(zone_records(&facts, &state).contains(&(owner(1), value(1))));
    // Deleted at the primary inside revoke_after: put back from the recorded value.
    let obs = BTreeMap::from([(
        1,
        OwnerObservation {
            primary: Some(Ok(TxtAnswer::absent(true))),
            servers: Vec::new(),
        },
    )]);
    let plan = plan_dns(&policy(2 * DAY, 5 * DAY), &facts, &state, &obs, t(20));
    assert!(plan.problems.iter().all(|p| !p.contains("v1")), "{plan:?}");
    assert!(
        plan.actions.iter().any(|a| matches!(a,
            DnsAction::Restore { version: 1, value: v, .. } if *v == value(1))),
        "{plan:?}"
    );
}

// ---- properties ----

/// A random but Vault-consistent key, a random recorded state and random answers.
#[derive(Debug, Clone)]
struct Case {
    pol: KeyDns,
    facts: KeyFacts,
    state: DnsState,
    world: World,
    now: Timestamp,
}

fn answer_kind(kind: u8, v: u32) -> Option<Vec<String>> {
    match kind % 5 {
        0 => None,
        1 => Some(vec![value(v)]),
        2 => Some(vec![revoked_value(DkimAlgorithm::Ed25519)]),
        3 => Some(vec![value(v + 100)]),
        _ => Some(vec![value(v), value(v)]),
    }
}

prop_compose! {
    fn arb_case()(
        latest in 1u32..7,
        dec_off in 0u32..7,
        avail_off in 0u32..7,
        retired_at in prop::collection::vec(prop::option::of(0i64..40), 7),
        stages in prop::collection::vec((0u8..6, 0i64..40, 0i64..40, prop::bool::ANY), 7),
        primary in prop::collection::vec(0u8..5, 7),
        secondary in prop::collection::vec(0u8..5, 7),
        signing in prop::option::of(1u32..8),
        revoke in 1i64..20,
        remove in 1i64..20,
        now in 0i64..60,
    ) -> Case {
        let min_dec = 1 + dec_off % latest;
        let min_avail = if avail_off == 0 { 0 } else { 1 + avail_off % min_dec };
        let retired: Vec<(u32, i64)> = (1..=latest)
            .filter_map(|v| retired_at[v as usize - 1].map(|s| (v, s)))
            .collect();
        let mut f = facts(latest, min_dec, min_avail, &retired);
        f.signing = signing;
        let mut state = DnsState::default();
        let mut world = World::default();
        for v in 1..=latest {
            let (stage, a, b, seen) = stages[v as usize - 1];
            let (a, b) = (t(a.min(b)), t(a.max(b)));
            let mut r = VersionDns { owner: owner(v), ..Default::default() };
            match stage {
                0 => continue,
                1 => { r.published_at = Some(a); }
                2 => { r.published_at = Some(a); r.confirmed_at = Some(b); }
                3 => { r.published_at = Some(a); r.confirmed_at = Some(a); r.signing_at = Some(b); }
                4 => { r.published_at = Some(a); r.revoked_at = Some(b); }
                _ => { r.published_at = Some(a); r.revoked_at = Some(a); r.removed_at = Some(b); }
            }
            if seen { r.retired_seen = Some(a); }
            state.versions.insert(v, r);
            if let Some(x) = answer_kind(primary[v as usize - 1], v) { world.primary.insert(owner(v), x); }
            if let Some(x) = answer_kind(secondary[v as usize - 1], v) { world.secondary.insert(owner(v), x); }
        }
        Case { pol: policy(revoke, remove), facts: f, state, world, now: t(now) }
    }
}

fn retired_time(c: &Case, v: u32) -> Option<Timestamp> {
    match c.facts.get(v).map(|f| f.status) {
        Some(VersionStatus::Retired { at }) => {
            at.or(c.state.versions.get(&v).and_then(|r| r.retired_seen))
        }
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn nothing_usable_or_signing_is_ever_revoked_or_removed(c in arb_case()) {
        let p = run(&c.pol, &c.facts, &c.state, &c.world, c.now);
        let revoked = revoked_value(DkimAlgorithm::Ed25519);
        for a in &p.actions {
            let v = a.version();
            let usable = matches!(c.facts.get(v).map(|f| f.status), Some(VersionStatus::Usable));
            let takes_down = matches!(a, DnsAction::Revoke { .. } | DnsAction::Remove { .. })
                || matches!(a, DnsAction::Restore { value, .. } if *value == revoked);
            if takes_down {
                prop_assert!(!usable, "took down usable v{v}: {a:?}");
                prop_assert!(c.facts.signing != Some(v), "took down signing v{v}: {a:?}");
            }
            if usable {
                if let Some(DnsWrite::Set { value, .. }) = a.write() {
                    let want = value_of(v);
                    prop_assert_eq!(value, want.as_str());
                }
            }
        }
    }

    #[test]
    fn revocation_and_removal_wait_for_their_grace(c in arb_case()) {
        let p = run(&c.pol, &c.facts, &c.state, &c.world, c.now);
        for a in &p.actions {
            let v = a.version();
            match a {
                DnsAction::Revoke { .. } => {
                    let at = retired_time(&c, v);
                    prop_assert!(at.is_some(), "revoked v{v} with no retirement time");
                    prop_assert!(c.now.duration_since(at.unwrap()) >= c.pol.revoke_after.signed());
                }
                DnsAction::Remove { .. } => {
                    let rec = c.state.versions.get(&v);
                    let disposed = v < c.facts.disposed_below;
                    let revoked_long_ago = rec.and_then(|r| r.revoked_at)
                        .is_some_and(|r| c.now.duration_since(r) >= c.pol.remove_after.signed());
                    let already_removed = rec.is_some_and(|r| r.removed_at.is_some());
                    prop_assert!(disposed || revoked_long_ago || already_removed,
                        "removed v{v} early: {a:?}");
                }
                _ => {}
            }
        }
    }

    #[test]
    fn may_sign_only_with_a_confirmed_record_every_server_answers(c in arb_case(), neg in 0i64..30) {
        let obs = c.world.observe(&owners_to_check(&c.pol, &c.facts, &c.state));
        let neg = SignedDuration::from_secs(neg);
        for v in 1..=8 {
            if may_sign(&c.facts, &c.state, &obs, v, neg, c.now) == SignGate::Ready {
                let r = &c.state.versions[&v];
                prop_assert!(r.published_at.is_some() && r.revoked_at.is_none() && r.removed_at.is_none());
                let confirmed = r.confirmed_at.expect("ready without confirmation");
                prop_assert!(c.now.duration_since(confirmed) >= neg);
                prop_assert!(matches!(c.facts.get(v).map(|f| f.status), Some(VersionStatus::Usable)));
                for (_, probe) in &obs[&v].servers {
                    prop_assert_eq!(probe.as_ref().unwrap().values(), vec![value_of(v)]);
                }
            }
        }
    }

    #[test]
    fn applying_a_plan_converges_and_repeating_it_is_a_no_op(c in arb_case()) {
        let mut state = c.state.clone();
        let mut w = c.world.clone();
        let p1 = run(&c.pol, &c.facts, &state, &w, c.now);
        w.apply(&p1, &mut state, c.now);
        w.sync();
        let p2 = run(&c.pol, &c.facts, &state, &w, c.now);
        prop_assert!(p2.actions.iter().all(|a| a.write().is_none()),
            "second pass still writes: {:?}", p2.actions);
        w.apply(&p2, &mut state, c.now);
        let p3 = run(&c.pol, &c.facts, &state, &w, c.now);
        prop_assert!(p3.actions.is_empty(), "third pass not empty: {:?}", p3.actions);
        // The primary now holds exactly what each tracked version's stage calls for.
        for (v, r) in &state.versions {
            if c.facts.signing == Some(*v) || (c.facts.get(*v).is_none() && *v >= c.facts.disposed_below) {
                continue;
            }
            let want: Option<Vec<String>> = if r.removed_at.is_some() {
                None
            } else if r.revoked_at.is_some() {
                Some(vec![revoked_value(DkimAlgorithm::Ed25519)])
            } else if r.published_at.is_some() {
                Some(vec![value_of(*v)])
            } else {
                continue;
            };
            if r.removed_at.is_some() && *v < c.facts.disposed_below && c.state.versions.get(v).is_some_and(|o| o.removed_at.is_some()) {
                // Disposed and removed before this run: no longer checked.
                continue;
            }
            prop_assert_eq!(w.primary.get(&r.owner).cloned(), want, "v{} ({:?})", v, r.stage());
        }
        // Every usable version is published.
        for f in &c.facts.versions {
            if f.status == VersionStatus::Usable {
                prop_assert!(state.versions[&f.version].live());
            }
        }
    }
}

fn value_of(v: u32) -> String {
    value(v)
}
