//! The sidecar's closed loop with real parts: OpenBao (the key) + Knot DNS (zone `example.com`,
//! TSIG-only DKIM updates, negative TTL 5 s) + `keyroll-sidecar` in `activation = "dns"` +
//! OpenDKIM driven by `miltertest` + dkimpy verifying by querying Knot through dnspython.
//!
//! The records are published by the test with `knsupdate`, as a person or external-dns would:
//! the sidecar must work whoever publishes. Every wait polls a condition with a generous
//! deadline; the only timing assertion is a lower bound (never switched before the negative TTL
//! had passed since the record was published), which a slow machine cannot break.

mod common;

use std::time::{Duration, Instant};

use common::dnsside::{
    dkim_health, owner, publish, record_value, signing_selector, start_dns_sidecar, start_opendkim,
    verify_through_dns, SIDECAR_ID,
};
use common::knot::Knot;
use common::sidecar::{create_key, rotate, wait_for, Sidecar};
use common::{unique, Bao};

/// The zone's negative-caching TTL (the Knot fixture's SOA).
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
const DEADLINE: Duration = Duration::from_secs(120);

fn wait(what: &str, sc: &Sidecar, f: impl FnMut() -> bool) {
    wait_for(DEADLINE, f).unwrap_or_else(|| {
        panic!(
            "{what}: timed out\n/healthz: {}\nlogs: {}",
            sc.health(),
            sc.logs()
        )
    });
}

/// Waits until the sidecar has delivered v2 (key file, KeyTable) and has checked DNS for it
/// (its waiting state is `want`).
fn wait_delivered_and_waiting(sc: &Sidecar, key: &str, want: &str) {
    wait("v2 delivered and checked", sc, || {
        sc.out.join("keys/kr2.example.com.private").exists()
            && dkim_health(sc, key)["waiting"]["state"] == want
    });
    assert!(sc.read("KeyTable").contains("kr2._domainkey.example.com"));
}

/// The sidecar's signing report for `key` as stored in Vault KV.
fn report(bao: &Bao, key: &str) -> Option<serde_json::Value> {
    bao.read(&format!(
        "secret/data/keyroll/signing/transit/{key}/{SIDECAR_ID}"
    ))
    .map(|d| d["data"].clone())
}

fn signs_only_once_dns_serves_the_record(key_type: &str) {
    let bao = Bao::shared();
    let key = unique(&format!("dns-{key_type}"));
    create_key(bao, &key, key_type);
    let knot = Knot::start();
    let sc = start_dns_sidecar(bao, &knot, &key, "1s", "");
    assert_eq!(signing_selector(&sc), "kr1");
    publish(&knot, &owner(1), &record_value(&sc, 1));
    let od = start_opendkim(&sc, key_type == "ed25519");

    // Before the rotation: signed with kr1, verified through DNS.
    let (m1, sel1) = od.sign(1);
    assert_eq!(sel1, "kr1");
    assert!(verify_through_dns(&knot, sc.dir.path(), "m1", &m1));
    wait("the first report", &sc, || {
        report(bao, &key).is_some_and(|r| r["version"] == 1)
    });

    // Rotated in Vault: kr2 is delivered, but with no record it does not sign.
    rotate(bao, &key);
    wait_delivered_and_waiting(&sc, &key, "absent");
    let h = sc.health();
    assert_eq!(h["status"], "ok", "waiting for DNS is normal: {h}");
    let d = dkim_health(&sc, &key);
    assert_eq!(d["activation"], "dns");
    assert_eq!(d["signing_version"], 1);
    assert_eq!(d["waiting"]["version"], 2);
    assert!(d["waiting"]["since"].is_string(), "{d}");
    assert!(
        d["waiting"]["reason"]
            .as_str()
            .unwrap()
            .contains("NXDOMAIN"),
        "{d}"
    );
    assert_eq!(
        sc.metric(&format!(
            "keyroll_sidecar_key_dns_waiting{{key=\"{key}\",mount=\"transit\",activation=\"dns\"}}"
        )),
        1.0
    );
    assert_eq!(signing_selector(&sc), "kr1");
    let (m2, sel2) = od.sign(2);
    assert_eq!(sel2, "kr1", "still signing with the published selector");
    assert!(verify_through_dns(&knot, sc.dir.path(), "m2", &m2));

    // Published (by somebody else): after the negative TTL the sidecar switches.
    let published = Instant::now();
    publish(&knot, &owner(2), &record_value(&sc, 2));
    wait("the switch to kr2", &sc, || signing_selector(&sc) == "kr2");
    assert!(
        published.elapsed() >= NEGATIVE_TTL,
        "switched {:?} after publication, before the negative TTL",
        published.elapsed()
    );
    // /healthz follows the publish that made the switch.
    wait("/healthz showing kr2 signing", &sc, || {
        dkim_health(&sc, &key)["signing_version"] == 2
    });
    let d = dkim_health(&sc, &key);
    assert!(d.get("waiting").is_none(), "{d}");
    // OpenDKIM was reloaded and signs with kr2; both messages verify through DNS.
    let mut last = String::new();
    wait("opendkim signing with kr2", &sc, || {
        let (m3, sel3) = od.sign(3);
        last = m3;
        sel3 == "kr2"
    });
    assert!(verify_through_dns(&knot, sc.dir.path(), "m3", &last));
    assert!(verify_through_dns(&knot, sc.dir.path(), "m1b", &m1));
    // A tampered message does not verify (the check is real).
    assert!(!verify_through_dns(
        &knot,
        sc.dir.path(),
        "bad",
        &last.replace("Hello", "Hallo")
    ));
    // The report says v2 now.
    wait("the report of kr2", &sc, || {
        report(bao, &key).is_some_and(|r| r["version"] == 2 && r["selector"] == "kr2")
    });
    let r = report(bao, &key).unwrap();
    assert_eq!(r["sidecar"], SIDECAR_ID);
}

#[test]
fn rsa_signing_moves_to_the_new_selector_only_after_dns_serves_it() {
    signs_only_once_dns_serves_the_record("rsa-2048");
}

#[test]
fn ed25519_signing_moves_to_the_new_selector_only_after_dns_serves_it() {
    signs_only_once_dns_serves_the_record("ed25519");
}

#[test]
fn a_record_with_another_key_never_switches_and_is_a_warning() {
    let bao = Bao::shared();
    let key = unique("dns-wrong");
    create_key(bao, &key, "ed25519");
    let knot = Knot::start();
    let sc = start_dns_sidecar(bao, &knot, &key, "1s", "");
    let od = start_opendkim(&sc, true);
    rotate(bao, &key);
    wait_delivered_and_waiting(&sc, &key, "absent");
    // kr2's owner gets kr1's key.
    let published = Instant::now();
    publish(&knot, &owner(2), &record_value(&sc, 1));
    wait("the wrong key reported", &sc, || {
        dkim_health(&sc, &key)["waiting"]["state"] == "wrong_key"
    });
    // Checks keep finding it wrong well past the negative TTL, and nothing switches.
    let ok_queries = |sc: &Sidecar| sc.metric("keyroll_sidecar_dns_queries_total{result=\"ok\"}");
    wait_for(DEADLINE, || published.elapsed() >= 3 * NEGATIVE_TTL).unwrap();
    let q = ok_queries(&sc);
    wait("two more checks", &sc, || ok_queries(&sc) >= q + 4.0);
    assert_eq!(signing_selector(&sc), "kr1");
    assert_eq!(od.sign(1).1, "kr1");
    let h = sc.health();
    assert_eq!(h["status"], "warning", "{h}");
    assert!(
        h["keys"][&key]["dkim"]["warning"]
            .as_str()
            .unwrap()
            .contains("another key"),
        "{h}"
    );
    assert_eq!(
        sc.metric(&format!(
            "keyroll_sidecar_key_dns_wrong_key{{key=\"{key}\",mount=\"transit\",activation=\"dns\"}}"
        )),
        1.0
    );
    // Corrected: the right key switches, and the warning clears.
    publish(&knot, &owner(2), &record_value(&sc, 2));
    wait("the switch after the fix", &sc, || {
        signing_selector(&sc) == "kr2"
    });
    wait("the warning cleared", &sc, || sc.health()["status"] == "ok");
}

#[test]
fn a_dns_outage_keeps_the_old_selector_and_deletes_nothing() {
    let bao = Bao::shared();
    let key = unique("dns-outage");
    create_key(bao, &key, "ed25519");
    let mut knot = Knot::start();
    let mut sc = start_dns_sidecar(bao, &knot, &key, "1s", "");
    publish(&knot, &owner(1), &record_value(&sc, 1));
    let od = start_opendkim(&sc, true);
    knot.stop();
    rotate(bao, &key);
    wait_delivered_and_waiting(&sc, &key, "unreachable");
    let d = dkim_health(&sc, &key);
    assert!(
        d["waiting"]["reason"]
            .as_str()
            .unwrap()
            .contains(&knot.server()),
        "the reason names the server: {d}"
    );
    assert_eq!(sc.health()["status"], "ok");
    assert_eq!(signing_selector(&sc), "kr1");
    assert_eq!(od.sign(1).1, "kr1", "the mailer keeps signing with kr1");
    for f in [
        "keys/kr1.example.com.private",
        "keys/kr2.example.com.private",
    ] {
        assert!(sc.out.join(f).exists(), "{f} is gone: {}", sc.logs());
    }
    assert!(sc
        .metric("keyroll_sidecar_dns_queries_total{result=\"error\"}")
        .ge(&1.0));

    // Back, and the record published: the switch follows.
    knot.start_again();
    publish(&knot, &owner(2), &record_value(&sc, 2));
    wait("the switch once DNS is back", &sc, || {
        signing_selector(&sc) == "kr2"
    });
    wait("opendkim signing with kr2", &sc, || od.sign(2).1 == "kr2");

    // A restart while DNS is down never moves signing back to kr1.
    knot.stop();
    sc.stop();
    sc.restart(bao);
    sc.wait_ready();
    wait("the restarted sidecar's status", &sc, || {
        dkim_health(&sc, &key)["signing_version"] == 2
    });
    assert_eq!(signing_selector(&sc), "kr2");
}

/// The TXT value for `version` of an ed25519 transit key, from Vault's public key.
fn vault_record(bao: &Bao, key: &str, version: u32) -> String {
    let k = bao.key("transit", key);
    let public = k["keys"][version.to_string()]["public_key"]
        .as_str()
        .unwrap();
    keyroll::dns::records::record_value(keyroll::keyformat::DkimAlgorithm::Ed25519, version, public)
        .unwrap()
}

/// Also the NS-set mode: the sidecar asks Knot for example.com's NS set (ns1 → 127.0.0.1) and
/// checks every server in it.
#[test]
fn once_signs_with_the_newest_version_dns_serves_not_the_latest() {
    let bao = Bao::shared();
    let key = unique("dns-once");
    create_key(bao, &key, "ed25519");
    rotate(bao, &key);
    rotate(bao, &key);
    let knot = Knot::start();
    // v1 and v2 are published, v3 (the latest) is not.
    publish(&knot, &owner(1), &vault_record(bao, &key, 1));
    publish(&knot, &owner(2), &vault_record(bao, &key, 2));
    let dir = common::sidecar::workdir();
    let out = dir.path().join("out");
    let cfg = dir.path().join("sidecar.toml");
    std::fs::write(
        &cfg,
        format!(
            "output_dir = \"{}\"\n[listen]\nenabled = false\n\
             [[keys]]\nname = \"{key}\"\nformat = \"opendkim\"\ndomain = \"example.com\"\n\
             activation = \"dns\"\n[dns]\nnameserver = \"{}\"\nport = {}\ntimeout = \"2s\"\n",
            out.display(),
            knot.server(),
            knot.port
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = common::run(
        bao.keyroll("keyroll-sidecar")
            .arg("-c")
            .arg(&cfg)
            .arg("--once"),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let table = std::fs::read_to_string(out.join("SigningTable")).unwrap();
    assert_eq!(table, "*@example.com kr2._domainkey.example.com\n");
    // Every version's key is delivered all the same.
    assert!(out.join("keys/kr3.example.com.private").exists());
}
