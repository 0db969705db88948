//! The DKIM record lifecycle end to end over real DNS: a Knot primary (127.0.0.1) and secondary
//! (127.0.0.2, NOTIFY + zone transfer), both found through the zone's NS set. keyroll's pure
//! planner decides, the RFC 2136 client writes, the observer asks both servers; the clock is
//! injected so grace periods need no waiting. Keys are real OpenBao transit keys.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::knot::{client, target, Knot};
use common::{unique, Bao};
use jiff::{SignedDuration, Timestamp};
use keyroll::dns::check_servers;
use keyroll::dns::lifecycle::{
    may_sign, owners_to_check, DnsAction, DnsState, KeyFacts, OwnerObservation, SignGate, Stage,
    VersionFacts, VersionStatus,
};
use keyroll::dns::observe::observe;
use keyroll::dns::records::{dkim_algorithm, record_value, revoked_value};
use keyroll::dns::{plan_dns, query_soa, AuthServer, DnsPlan, KeyDns, RawKeyDns, Rfc2136Client};

const DAY: i64 = 86_400;

/// The test's world: both servers, the client, the key's settings and keyroll's record.
struct Run {
    primary: Knot,
    secondary: Knot,
    client: Rfc2136Client,
    servers: Vec<AuthServer>,
    policy: KeyDns,
    state: DnsState,
    zone: String,
}

impl Run {
    async fn new() -> Run {
        let (primary, secondary) = Knot::pair();
        let extra = format!("ns_port = {}", primary.port);
        let t = target(&primary, &primary.secret_file, &extra);
        let servers = check_servers(&t).await.unwrap();
        let client = client(&primary, &primary.secret_file, &extra);
        let targets = keyroll::dns::DnsTargets([(t.name.clone(), t)].into());
        let raw: RawKeyDns = toml::from_str(
            "target = \"primary\"\ndomain = \"example.com\"\nrevoke_after = \"2d\"\nremove_after = \"5d\"",
        )
        .unwrap();
        let policy = KeyDns::from_raw(raw, "dkim", &targets).unwrap();
        Run {
            primary,
            secondary,
            client,
            servers,
            policy,
            state: DnsState::default(),
            zone: "example.com".into(),
        }
    }

    async fn observe(&self, facts: &KeyFacts) -> BTreeMap<u32, OwnerObservation> {
        let checks = owners_to_check(&self.policy, facts, &self.state);
        let primary = self.client.primary().await.unwrap();
        observe(
            Some(&primary),
            &self.servers,
            &self.zone,
            &checks,
            Duration::from_secs(5),
        )
        .await
    }

    /// One pass: observe, plan, carry out every action, record it.
    async fn pass(&mut self, facts: &KeyFacts, now: Timestamp) -> DnsPlan {
        let obs = self.observe(facts).await;
        let plan = plan_dns(&self.policy, facts, &self.state, &obs, now);
        for a in &plan.actions {
            if let Some(w) = a.write() {
                self.client.apply(&w).await.unwrap();
            }
            self.state.record(a, now);
        }
        plan
    }

    /// Passes until one yields an action with `verb` (deadline 60 s of real time: the
    /// secondary transfers the zone after the primary's NOTIFY).
    async fn pass_until(&mut self, facts: &KeyFacts, now: Timestamp, verb: &str) -> DnsPlan {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let p = self.pass(facts, now).await;
            if p.actions.iter().any(|a| a.verb() == verb) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "no {verb} within 60 s; last plan {p:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

/// An ed25519 transit key with `n` versions: (name, public key per version).
fn vault_key(n: u32) -> BTreeMap<u32, String> {
    let bao = Bao::shared();
    let name = unique("dnslife");
    bao.cli_ok(&[
        "write",
        "-f",
        &format!("transit/keys/{name}"),
        "type=ed25519",
    ]);
    for _ in 1..n {
        bao.cli_ok(&["write", "-f", &format!("transit/keys/{name}/rotate")]);
    }
    let k = bao.key("transit", &name);
    (1..=n)
        .map(|v| {
            let pk = k["keys"][v.to_string()]["public_key"].as_str().unwrap();
            (v, pk.to_string())
        })
        .collect()
}

fn facts(pks: &BTreeMap<u32, String>, usable_from: u32, retired_at: Option<Timestamp>) -> KeyFacts {
    KeyFacts {
        key: "dkim".into(),
        alg: dkim_algorithm("ed25519").unwrap(),
        versions: pks
            .iter()
            .map(|(v, pk)| VersionFacts {
                version: *v,
                public_key: Some(pk.clone()),
                status: if *v < usable_from {
                    VersionStatus::Retired { at: retired_at }
                } else {
                    VersionStatus::Usable
                },
            })
            .collect(),
        disposed_below: 0,
        signing: None,
    }
}

fn verbs(p: &DnsPlan) -> Vec<&'static str> {
    p.actions.iter().map(DnsAction::verb).collect()
}

#[tokio::test]
async fn a_version_is_published_confirmed_by_both_servers_revoked_and_removed() {
    let mut r = Run::new().await;
    let names: Vec<String> = r.servers.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        names,
        [
            format!("ns1.example.com (127.0.0.1:{})", r.primary.port),
            format!("ns2.example.com (127.0.0.2:{})", r.primary.port),
        ]
    );
    let pks = vault_key(2);
    let alg = dkim_algorithm("ed25519").unwrap();
    let v1 = record_value(alg, 1, &pks[&1]).unwrap();
    let one = BTreeMap::from([(1, pks[&1].clone())]);
    let f1 = facts(&one, 1, None);

    let p = r.pass(&f1, t(0)).await;
    assert_eq!(verbs(&p), ["dns-publish"]);
    assert_eq!(
        r.primary.txt("kr1._domainkey.example.com").txt,
        vec![v1.clone()]
    );
    let p = r.pass_until(&f1, t(10), "dns-confirm").await;
    assert!(
        p.actions[0]
            .reason()
            .contains("all 2 authoritative server(s)"),
        "{p:?}"
    );
    assert_eq!(
        r.secondary.txt("kr1._domainkey.example.com").txt,
        vec![v1.clone()]
    );
    assert_eq!(r.state.versions[&1].stage(), Stage::Confirmed);

    // The sign gate waits the zone's negative-caching TTL (SOA minimum 5 s) after confirmation.
    let soa = query_soa(&r.servers[0], "example.com", Duration::from_secs(5))
        .await
        .unwrap();
    let neg = SignedDuration::try_from(soa.negative_ttl()).unwrap();
    let obs = r.observe(&f1).await;
    assert!(matches!(
        may_sign(&f1, &r.state, &obs, 1, neg, t(14)),
        SignGate::Waiting(_)
    ));
    assert_eq!(
        may_sign(&f1, &r.state, &obs, 1, neg, t(15)),
        SignGate::Ready
    );

    // Steady state: nothing to do, no UPDATE.
    assert!(r.pass(&f1, t(20)).await.actions.is_empty());

    // v2 arrives; the mailer switches to it; v1 is retired at day 1.
    let mut f2 = facts(&pks, 1, None);
    r.pass(&f2, t(DAY / 2)).await;
    r.pass_until(&f2, t(DAY / 2), "dns-confirm").await;
    f2 = facts(&pks, 2, Some(t(DAY)));
    f2.signing = Some(2);
    let p = r.pass(&f2, t(DAY)).await;
    assert_eq!(verbs(&p), ["dns-signing"]);
    // Inside revoke_after (2d) v1's record stays.
    assert!(r.pass(&f2, t(3 * DAY - 1)).await.actions.is_empty());
    let p = r.pass(&f2, t(3 * DAY)).await;
    assert_eq!(verbs(&p), ["dns-revoke"]);
    let revoked = revoked_value(alg);
    r.secondary.wait_txt("kr1._domainkey.example.com", |k| {
        k.txt == vec![revoked.clone()]
    });
    // remove_after (5d) after revocation the record is deleted on both servers.
    assert!(r.pass(&f2, t(8 * DAY - 1)).await.actions.is_empty());
    assert_eq!(verbs(&r.pass(&f2, t(8 * DAY)).await), ["dns-remove"]);
    r.secondary
        .wait_txt("kr1._domainkey.example.com", |k| k.rcode == "NXDOMAIN");
    assert_eq!(r.state.versions[&1].stage(), Stage::Removed);
    assert!(r.pass(&f2, t(9 * DAY)).await.actions.is_empty());
}

#[tokio::test]
async fn a_record_deleted_or_edited_by_hand_is_put_back_and_reported() {
    let mut r = Run::new().await;
    let pks = vault_key(1);
    let f = facts(&pks, 1, None);
    let v1 = record_value(dkim_algorithm("ed25519").unwrap(), 1, &pks[&1]).unwrap();
    let owner = "kr1._domainkey.example.com";
    r.pass(&f, t(0)).await;
    r.pass_until(&f, t(1), "dns-confirm").await;

    let out = r.primary.knsupdate(&format!("update delete {owner}. TXT"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = r.pass(&f, t(2)).await;
    assert_eq!(verbs(&p), ["dns-restore"]);
    assert!(p.actions[0].reason().contains("NXDOMAIN"), "{p:?}");
    assert_eq!(r.primary.txt(owner).txt, vec![v1.clone()]);
    assert_eq!(r.state.versions[&1].restored_at, Some(t(2)));

    let out = r.primary.knsupdate(&format!(
        "update add {owner}. 300 TXT \"v=DKIM1; k=ed25519; p=AAAA\""
    ));
    assert!(out.status.success());
    let p = r.pass(&f, t(3)).await;
    assert_eq!(verbs(&p), ["dns-restore"]);
    assert!(p.actions[0].reason().contains("2 TXT records"), "{p:?}");
    assert_eq!(r.primary.txt(owner).txt, vec![v1.clone()]);
    r.secondary.wait_txt(owner, |k| k.txt == vec![v1.clone()]);
    assert!(r.pass(&f, t(4)).await.actions.is_empty());
}

#[tokio::test]
async fn with_the_secondary_down_nothing_is_confirmed_and_the_gate_stays_shut() {
    let mut r = Run::new().await;
    r.secondary.stop();
    let pks = vault_key(1);
    let f = facts(&pks, 1, None);
    r.pass(&f, t(0)).await;
    // The primary serves it at once, but ns2 cannot be asked: no confirmation, however long.
    for i in 1..4 {
        let p = r.pass(&f, t(i)).await;
        assert!(p.actions.is_empty(), "{p:?}");
    }
    let obs = r.observe(&f).await;
    let SignGate::Waiting(why) = may_sign(&f, &r.state, &obs, 1, SignedDuration::ZERO, t(DAY))
    else {
        panic!("may sign with a server down");
    };
    assert!(why.contains("not yet answered"), "{why}");
    let ns2 = &obs[&1].servers[1];
    assert!(ns2.0.starts_with("ns2.example.com"), "{ns2:?}");
    assert!(ns2.1.is_err(), "{ns2:?}");

    r.secondary.start_again();
    r.pass_until(&f, t(10), "dns-confirm").await;
    let obs = r.observe(&f).await;
    assert_eq!(
        may_sign(&f, &r.state, &obs, 1, SignedDuration::ZERO, t(10)),
        SignGate::Ready
    );
}
