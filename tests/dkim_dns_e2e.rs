//! The whole DKIM rotation through DNS, every part real: OpenBao (the key) + `keyroll` (creates
//! and rotates it, publishes each selector's TXT record into Knot by RFC 2136 with TSIG,
//! confirms it, retires the old version only once the sidecar reports the new one signing,
//! revokes and removes the old record) + `keyroll-sidecar` in `activation = "dns"` (switches
//! OpenDKIM's SigningTable only once it sees the record served) + OpenDKIM through `miltertest`
//! + dkimpy verifying every message by querying the Knot server (not a file).
//!
//! keyroll runs in real time for the rotation and the switch (the sidecar's clock is real);
//! the grace periods after retirement (days) use `apply --at` (KEYROLL_ALLOW_APPLY_AT=1).
//! Every wait polls a condition with a generous deadline.

mod common;

use std::time::Duration;

use common::dnsside::{signing_selector, start_dns_sidecar, start_opendkim, SIDECAR_ID};
use common::keyroll::{apply_at, key_state, keyroll_run, plus, PolicyFile};
use common::knot::{policy_target, Knot};
use common::sidecar::{wait_for, Sidecar};
use common::{unique, Bao};
use jiff::Timestamp;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);
const DAY: i64 = 86_400;

fn owner(v: u32) -> String {
    format!("kr{v}._domainkey.example.com")
}

/// `keyroll apply -o json` now (real time); panics unless it exits `want`.
fn apply_now(bao: &Bao, p: &PolicyFile, want: i32) -> Value {
    let (code, out, err) = keyroll_run(bao, &bao.addr, &p.path, &["apply", "-o", "json"]);
    assert_eq!(code, want, "apply exited {code}\n{out}\n{err}");
    serde_json::from_str(&out).unwrap()
}

fn key_report<'a>(r: &'a Value, key: &str) -> &'a Value {
    r["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == key)
        .unwrap_or_else(|| panic!("{key} not in {r}"))
}

fn wait(what: &str, sc: &Sidecar, f: impl FnMut() -> bool) {
    wait_for(DEADLINE, f).unwrap_or_else(|| {
        panic!(
            "{what}: timed out\n/healthz: {}\nlogs: {}",
            sc.health(),
            sc.logs()
        )
    });
}

/// The version the sidecar reports signing, as keyroll reads it from Vault KV.
fn reported(bao: &Bao, key: &str) -> Option<u64> {
    bao.read(&format!(
        "secret/data/keyroll/signing/transit/{key}/{SIDECAR_ID}"
    ))
    .and_then(|d| d["data"]["version"].as_u64())
}

fn rotation_closed_through_dns(key_type: &str) {
    let bao = Bao::shared();
    let knot = Knot::start();
    let name = unique(&format!("e2e-{key_type}"));
    let p = PolicyFile::new("");
    p.write(&format!(
        "{}\n{}\n[[keys]]\nname = \"{name}\"\ntype = \"{key_type}\"\nexportable = true\n\
         rotate_every = \"30d\"\nkeep_versions = 1\n\n[keys.dns]\ntarget = \"primary\"\n\
         domain = \"example.com\"\nrevoke_after = \"2d\"\nremove_after = \"5d\"\n",
        p.audit_section(),
        policy_target(&knot, "primary", &knot.secret_file, "")
    ));

    // keyroll creates v1 and publishes kr1; the next run confirms it at every server.
    apply_now(bao, &p, 0);
    let r = apply_now(bao, &p, 0);
    assert_eq!(
        key_report(&r, &name)["dns"]["versions"][0]["stage"],
        "confirmed",
        "{r}"
    );

    // The mailer: the sidecar (DNS-gated) and OpenDKIM. Message 1 verifies through DNS.
    let sc = start_dns_sidecar(bao, &knot, &name, "1s", "");
    let od = start_opendkim(&sc, key_type == "ed25519");
    wait("signing with kr1", &sc, || signing_selector(&sc) == "kr1");
    let (m1, s1) = od.sign(1);
    assert_eq!(s1, "kr1");
    assert!(
        common::dnsside::verify_through_dns(&knot, sc.dir.path(), "m1", &m1),
        "message 1 does not verify through DNS"
    );
    wait("the sidecar's report of v1", &sc, || {
        reported(bao, &name) == Some(1)
    });

    // Rotation: keyroll publishes kr2 but may not retire v1 — the mailer still signs with it.
    let (code, out, err) = keyroll_run(bao, &bao.addr, &p.path, &["rotate", &name]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r = apply_now(bao, &p, 3);
    let blocked = &key_report(&r, &name)["blocked"];
    assert_eq!(blocked[0]["version"], 1, "{r}");
    assert_eq!(blocked[0]["by"], "dns", "{r}");
    assert_eq!(knot.txt(&owner(2)).txt.len(), 1, "kr2 not published");
    assert_eq!(key_state(bao, "transit", &name).1, 1);

    // The sidecar sees kr2 served, waits out the negative TTL, switches; message 2 verifies
    // through DNS with kr2, and the sidecar reports v2.
    wait("signing with kr2", &sc, || signing_selector(&sc) == "kr2");
    let (m2, s2) = od.sign(2);
    assert_eq!(s2, "kr2");
    assert!(
        common::dnsside::verify_through_dns(&knot, sc.dir.path(), "m2", &m2),
        "message 2 does not verify through DNS"
    );
    wait("the sidecar's report of v2", &sc, || {
        reported(bao, &name) == Some(2)
    });

    // Now keyroll retires v1 (the hold lifted by the report) and records kr2 as signing.
    let r = apply_now(bao, &p, 0);
    assert_eq!(key_state(bao, "transit", &name).1, 2, "v1 not retired: {r}");
    let stages = &key_report(&r, &name)["dns"]["versions"];
    assert!(
        stages
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["version"] == 2 && v["stage"] == "signing"),
        "{r}"
    );
    assert!(!p.events_of("dns_signing", &name).is_empty());

    // revoke_after (2 d) past the retirement: kr1 answers `p=`, and message 1 no longer
    // verifies (its key is revoked); message 2 still does. remove_after (5 d) later: NXDOMAIN.
    let retired = Timestamp::now();
    apply_at(bao, &p.path, plus(retired, 2 * DAY + 60), 0);
    let k_tag = if key_type == "ed25519" {
        "ed25519"
    } else {
        "rsa"
    };
    assert_eq!(
        knot.txt(&owner(1)).txt,
        vec![format!("v=DKIM1; k={k_tag}; p=")]
    );
    assert!(!common::dnsside::verify_through_dns(
        &knot,
        sc.dir.path(),
        "m1-revoked",
        &m1
    ));
    assert!(common::dnsside::verify_through_dns(
        &knot,
        sc.dir.path(),
        "m2-after",
        &m2
    ));
    apply_at(bao, &p.path, plus(retired, 7 * DAY + 120), 0);
    assert_eq!(knot.txt(&owner(1)).rcode, "NXDOMAIN");
    assert_eq!(knot.txt(&owner(2)).txt.len(), 1);
    assert_eq!(signing_selector(&sc), "kr2");
    for kind in [
        "dns_published",
        "dns_confirmed",
        "dns_signing",
        "dns_revoked",
        "dns_removed",
        "retired",
    ] {
        assert!(!p.events_of(kind, &name).is_empty(), "no {kind} event");
    }
}

#[test]
fn an_rsa_rotation_is_published_signed_revoked_and_removed_through_dns() {
    rotation_closed_through_dns("rsa-2048");
}

#[test]
fn an_ed25519_rotation_is_published_signed_revoked_and_removed_through_dns() {
    rotation_closed_through_dns("ed25519");
}

/// The DNS server is down during a rotation: Vault rotates and the sidecar delivers the new key,
/// but signing stays on the old selector (and keyroll keeps the old version usable); once the
/// server is back, keyroll publishes, the sidecar sees the record served and switches.
#[test]
fn with_dns_down_during_a_rotation_signing_stays_old_until_the_record_is_served() {
    let bao = Bao::shared();
    let mut knot = Knot::start();
    let name = unique("e2e-outage");
    let p = PolicyFile::new("");
    p.write(&format!(
        "{}\n{}\n[[keys]]\nname = \"{name}\"\ntype = \"ed25519\"\nexportable = true\n\
         rotate_every = \"30d\"\nkeep_versions = 1\n\n[keys.dns]\ntarget = \"primary\"\n\
         domain = \"example.com\"\n",
        p.audit_section(),
        policy_target(&knot, "primary", &knot.secret_file, "")
    ));
    apply_now(bao, &p, 0);
    apply_now(bao, &p, 0);
    let sc = start_dns_sidecar(bao, &knot, &name, "1s", "");
    let od = start_opendkim(&sc, true);
    wait("signing with kr1", &sc, || signing_selector(&sc) == "kr1");

    knot.stop();
    let (code, out, err) = keyroll_run(bao, &bao.addr, &p.path, &["rotate", &name]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r = apply_now(bao, &p, 5);
    assert!(key_report(&r, &name)["dns"]["error"].is_string(), "{r}");
    let (latest, min_dec, _) = key_state(bao, "transit", &name);
    assert_eq!((latest, min_dec), (2, 1), "rotated, v1 still usable: {r}");
    // kr2's key is delivered; the sidecar has tried DNS for it and keeps signing with kr1.
    wait("kr2 delivered and checked", &sc, || {
        sc.out.join("keys/kr2.example.com.private").exists()
            && sc.health()["keys"][&name]["dkim"]["waiting"]["version"] == 2
    });
    assert_eq!(signing_selector(&sc), "kr1");
    assert_eq!(od.sign(1).1, "kr1");

    knot.start_again();
    apply_now(bao, &p, 3);
    assert_eq!(knot.txt(&owner(2)).txt.len(), 1);
    wait("signing with kr2", &sc, || signing_selector(&sc) == "kr2");
    let (m, s) = od.sign(2);
    assert_eq!(s, "kr2");
    assert!(common::dnsside::verify_through_dns(
        &knot,
        sc.dir.path(),
        "after-outage",
        &m
    ));
}
