//! The rotator publishing DKIM records end to end: the `keyroll` binary against a real OpenBao
//! and a real Knot DNS (RFC 2136 with TSIG under the least-privilege ACL, or a zone file +
//! reload). Time is injected with `apply --at` (KEYROLL_ALLOW_APPLY_AT=1), so the grace periods
//! need no waiting; what DNS serves is checked with `kdig`, independent of keyroll's client.

mod common;

use std::process::Stdio;

use common::keyroll::{apply_at, key_state, keyroll_run, keyroll_via, plus, PolicyFile};
use common::knot::{
    dkim_key, policy_target, policy_zonefile_target, updates_logged, Knot, KEY_NAME,
};
use common::{run, unique, Bao};
use jiff::Timestamp;
use serde_json::Value;

const DAY: i64 = 86_400;

/// The DNS actions an `apply -o json` (or `plan -o json`) report lists for `key`.
fn dns_verbs(report: &Value, key: &str) -> Vec<String> {
    report["keys"]
        .as_array()
        .expect("keys array")
        .iter()
        .filter(|k| k["key"] == key)
        .flat_map(|k| k["dns"]["actions"].as_array().cloned().unwrap_or_default())
        .map(|a| a["action"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn key_report<'a>(report: &'a Value, key: &str) -> &'a Value {
    report["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == key)
        .unwrap_or_else(|| panic!("{key} not in {report}"))
}

/// `keyroll rotate NAME` (now, whatever the schedule).
fn rotate(bao: &Bao, p: &PolicyFile, name: &str) {
    let (code, out, err) = keyroll_run(bao, &bao.addr, &p.path, &["rotate", name]);
    assert_eq!(code, 0, "{out}\n{err}");
}

fn owner(v: u32) -> String {
    format!("kr{v}._domainkey.example.com")
}

/// A policy with `knot` as target "primary" and `keys`, auditing beside it.
fn policy(knot: &Knot, secret: &std::path::Path, keys: &str) -> PolicyFile {
    let p = PolicyFile::new("");
    p.write(&format!(
        "{}\n{}\n{keys}",
        p.audit_section(),
        policy_target(knot, "primary", secret, "")
    ));
    p
}

/// Publication, confirmation, revocation (`p=`) and removal (NXDOMAIN) of a version's record
/// through the whole rotator, for one key type.
fn lifecycle_through_the_rotator(key_type: &str, k_tag: &str) {
    let bao = Bao::shared();
    let knot = Knot::start();
    let name = unique("dkimdns");
    let p = policy(
        &knot,
        &knot.secret_file,
        &dkim_key(&name, key_type, "primary", "example.com"),
    );
    let t0 = Timestamp::now();

    // Create v1 and publish its record in the same run.
    let r = apply_at(bao, &p.path, t0, 0);
    assert_eq!(dns_verbs(&r, &name), ["publish"], "{r}");
    let v1 = knot.txt(&owner(1));
    assert_eq!(v1.rcode, "NOERROR");
    assert!(
        v1.txt.len() == 1 && v1.txt[0].starts_with(&format!("v=DKIM1; k={k_tag}; p=")),
        "{v1:?}"
    );
    // The next run sees every authoritative server answer it: confirmed.
    let r = apply_at(bao, &p.path, t0, 0);
    assert_eq!(dns_verbs(&r, &name), ["confirm"], "{r}");
    let stages = &key_report(&r, &name)["dns"]["versions"];
    assert_eq!(stages[0]["stage"], "confirmed", "{r}");

    // Steady state: no DNS action, no UPDATE sent.
    let updates = updates_logged(&knot);
    assert!(updates >= 1, "knot logged no update at all");
    let r = apply_at(bao, &p.path, t0, 0);
    assert!(dns_verbs(&r, &name).is_empty(), "{r}");
    assert_eq!(updates_logged(&knot), updates);

    // A rotation (on demand, so Vault's creation times and the injected clock agree). v1 may
    // not be retired (keep_versions = 1) before v2 signs: with no sidecar reporting, that is
    // once v2's record is confirmed and the zone's negative TTL (5 s) has passed since.
    rotate(bao, &p, &name);
    let t1 = t0;
    let r = apply_at(bao, &p.path, t1, 3);
    assert_eq!(dns_verbs(&r, &name), ["publish"], "{r}");
    let blocked = &key_report(&r, &name)["blocked"];
    assert_eq!(blocked[0]["step"], "retire", "{r}");
    assert_eq!(blocked[0]["version"], 1, "{r}");
    assert_eq!(blocked[0]["by"], "dns", "{r}");
    assert_eq!(
        key_state(bao, "transit", &name).1,
        1,
        "v1 retired before v2 signs"
    );
    assert_eq!(knot.txt(&owner(2)).txt.len(), 1);
    assert_eq!(knot.txt(&owner(1)).txt, v1.txt);
    let r = apply_at(bao, &p.path, t1, 3);
    assert_eq!(dns_verbs(&r, &name), ["confirm"], "{r}");
    assert_eq!(
        key_state(bao, "transit", &name).1,
        1,
        "v1 retired before the negative TTL"
    );
    // A minute later v2 may sign: v1 is retired.
    let t2 = plus(t1, 60);
    let r = apply_at(bao, &p.path, t2, 0);
    assert!(dns_verbs(&r, &name).is_empty(), "{r}");
    assert_eq!(key_state(bao, "transit", &name).1, 2, "v1 not retired: {r}");

    // revoke_after (2d) after the retirement: v1's record becomes p=.
    let r = apply_at(bao, &p.path, plus(t2, 2 * DAY - 60), 0);
    assert!(dns_verbs(&r, &name).is_empty(), "{r}");
    let r = apply_at(bao, &p.path, plus(t2, 2 * DAY + 1), 0);
    assert_eq!(dns_verbs(&r, &name), ["revoke"], "{r}");
    assert_eq!(
        knot.txt(&owner(1)).txt,
        vec![format!("v=DKIM1; k={k_tag}; p=")]
    );
    // remove_after (5d) after the revocation: NXDOMAIN; v2 untouched.
    let r = apply_at(bao, &p.path, plus(t2, 7 * DAY + 2), 0);
    assert_eq!(dns_verbs(&r, &name), ["remove"], "{r}");
    assert_eq!(knot.txt(&owner(1)).rcode, "NXDOMAIN");
    assert_eq!(knot.txt(&owner(2)).txt.len(), 1);

    // Every step reached the audit log (and so the notifiers).
    for kind in [
        "dns_published",
        "dns_confirmed",
        "dns_revoked",
        "dns_removed",
    ] {
        assert!(!p.events_of(kind, &name).is_empty(), "no {kind} event");
    }
}

#[test]
fn an_ed25519_key_s_records_are_published_confirmed_revoked_and_removed() {
    lifecycle_through_the_rotator("ed25519", "ed25519");
}

#[test]
fn an_rsa_key_s_records_are_published_confirmed_revoked_and_removed() {
    lifecycle_through_the_rotator("rsa-2048", "rsa");
}

#[test]
fn a_record_deleted_or_edited_by_hand_is_restored_and_reported() {
    let bao = Bao::shared();
    let knot = Knot::start();
    let name = unique("dkimrestore");
    let p = policy(
        &knot,
        &knot.secret_file,
        &dkim_key(&name, "ed25519", "primary", "example.com"),
    );
    let t0 = Timestamp::now();
    apply_at(bao, &p.path, t0, 0);
    apply_at(bao, &p.path, t0, 0);
    let want = knot.txt(&owner(1)).txt;

    let out = knot.knsupdate(&format!("update delete {}. TXT", owner(1)));
    assert!(out.status.success());
    assert_eq!(knot.txt(&owner(1)).rcode, "NXDOMAIN");
    let r = apply_at(bao, &p.path, t0, 0);
    assert_eq!(dns_verbs(&r, &name), ["restore"], "{r}");
    assert_eq!(knot.txt(&owner(1)).txt, want);

    let out = knot.knsupdate(&format!(
        "update delete {o}. TXT\nupdate add {o}. 60 TXT \"v=DKIM1; p=Zm9v\"",
        o = owner(1)
    ));
    assert!(out.status.success());
    let r = apply_at(bao, &p.path, t0, 0);
    assert_eq!(dns_verbs(&r, &name), ["restore"], "{r}");
    assert_eq!(knot.txt(&owner(1)).txt, want);
    let restored = p.events_of("dns_restored", &name);
    assert_eq!(restored.len(), 2, "{restored:?}");
    assert!(
        restored[1]["message"]
            .as_str()
            .unwrap()
            .contains("putting it back"),
        "{restored:?}"
    );
}

#[test]
fn a_wrong_tsig_secret_fails_the_dns_step_with_exit_5_and_the_vault_work_is_done() {
    let bao = Bao::shared();
    let knot = Knot::start();
    let dkim = unique("dkimbadkey");
    let other = unique("plainkey");
    let wrong = knot.path().join("wrong.key");
    std::fs::write(&wrong, "c2VjcmV0LXRoYXQtdGhlLXNlcnZlci1kb2VzLW5vdC1rbm93\n").unwrap();
    let p = policy(
        &knot,
        &wrong,
        &format!(
            "{}\n[[keys]]\nname = \"{other}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n",
            dkim_key(&dkim, "ed25519", "primary", "example.com")
        ),
    );
    let (code, out, err) = keyroll_run(
        bao,
        &bao.addr,
        &p.path,
        &["apply", "--at", &Timestamp::now().to_string(), "-o", "json"],
    );
    assert_eq!(code, 5, "{out}\n{err}");
    assert!(err.contains("BADSIG") && err.contains(KEY_NAME), "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    // Both keys were created in Vault; only the DNS step failed.
    assert_eq!(bao.key("transit", &dkim)["latest_version"], 1);
    assert_eq!(bao.key("transit", &other)["latest_version"], 1);
    assert!(key_report(&r, &dkim)["dns"]["error"]
        .as_str()
        .unwrap()
        .contains("BADSIG"));
    assert_eq!(knot.txt(&owner(1)).rcode, "NXDOMAIN");
    assert_eq!(p.events_of("dns_failed", &dkim).len(), 1);
}

#[test]
fn with_the_dns_server_down_the_rotation_happens_and_the_next_run_publishes() {
    let bao = Bao::shared();
    let mut knot = Knot::start();
    let name = unique("dkimoutage");
    let p = policy(
        &knot,
        &knot.secret_file,
        &dkim_key(&name, "ed25519", "primary", "example.com"),
    );
    let t0 = Timestamp::now();
    apply_at(bao, &p.path, t0, 0);
    apply_at(bao, &p.path, t0, 0);

    knot.stop();
    rotate(bao, &p, &name);
    let t1 = t0;
    let r = apply_at(bao, &p.path, t1, 5);
    assert_eq!(bao.key("transit", &name)["latest_version"], 2, "{r}");
    let err = key_report(&r, &name)["dns"]["error"].as_str().unwrap();
    assert!(
        err.contains("timeout") || err.contains("unreachable"),
        "{err}"
    );

    // v1 keeps signing (and stays usable) until v2's record is served: the retire is held.
    assert_eq!(key_state(bao, "transit", &name).1, 1, "{r}");

    knot.start_again();
    let r = apply_at(bao, &p.path, t1, 3);
    assert_eq!(dns_verbs(&r, &name), ["publish"], "{r}");
    assert_eq!(knot.txt(&owner(2)).txt.len(), 1);
    assert_eq!(key_state(bao, "transit", &name).1, 1, "{r}");
}

#[test]
fn two_applies_at_once_leave_exactly_one_txt_rr_per_owner() {
    let bao = Bao::shared();
    let knot = Knot::start();
    let name = unique("dkimrace");
    let p = policy(
        &knot,
        &knot.secret_file,
        &dkim_key(&name, "ed25519", "primary", "example.com"),
    );
    let at = Timestamp::now().to_string();
    let spawn = || {
        keyroll_via(bao, &bao.addr, &p.path)
            .args(["apply", "--at", &at, "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for c in [a, b] {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(knot.txt(&owner(1)).txt.len(), 1);
    assert_eq!(p.events_of("dns_published", &name).len(), 1);
}

#[test]
fn a_zone_file_target_is_written_reloaded_confirmed_and_repaired() {
    let bao = Bao::shared();
    let knot = Knot::start();
    let name = unique("dkimzonefile");
    let p = PolicyFile::new("");
    p.write(&format!(
        "{}\n{}\n{}",
        p.audit_section(),
        policy_zonefile_target(&knot, "files"),
        dkim_key(&name, "ed25519", "files", "example.org")
    ));
    let o1 = "kr1._domainkey.example.org";
    let t0 = Timestamp::now();
    let r = apply_at(bao, &p.path, t0, 0);
    assert_eq!(dns_verbs(&r, &name), ["publish"], "{r}");
    let served = knot.txt(o1);
    assert!(
        served.txt.len() == 1 && served.txt[0].starts_with("v=DKIM1; k=ed25519; p="),
        "{served:?}"
    );
    let r = apply_at(bao, &p.path, t0, 0);
    assert_eq!(dns_verbs(&r, &name), ["confirm"], "{r}");

    // A hand edit of the file is undone (and reported) by the next run.
    std::fs::write(knot.include_file(), "; emptied by hand\n").unwrap();
    let r = apply_at(bao, &p.path, t0, 0);
    assert!(dns_verbs(&r, &name).is_empty(), "{r}");
    assert_eq!(p.events_of("dns_restored", &name).len(), 1);
    assert_eq!(knot.txt(o1).txt, served.txt);
}

#[test]
fn plan_and_status_show_dns_stages_and_plan_writes_nothing() {
    let bao = Bao::shared();
    let knot = Knot::start();
    let name = unique("dkimplan");
    bao.cli_ok(&[
        "write",
        "-f",
        &format!("transit/keys/{name}"),
        "type=ed25519",
    ]);
    let p = policy(
        &knot,
        &knot.secret_file,
        &dkim_key(&name, "ed25519", "primary", "example.com"),
    );
    let (code, out, err) = keyroll_run(bao, &bao.addr, &p.path, &["plan", "-o", "json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dns_verbs(&r, &name), ["publish"], "{r}");
    assert_eq!(
        key_report(&r, &name)["dns"]["versions"][0]["stage"],
        "unpublished"
    );
    assert_eq!(knot.txt(&owner(1)).rcode, "NXDOMAIN");
    assert_eq!(updates_logged(&knot), 0);

    apply_at(bao, &p.path, Timestamp::now(), 0);
    let (code, out, err) = keyroll_run(bao, &bao.addr, &p.path, &["status", "-o", "json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let s: Value = serde_json::from_str(&out).unwrap();
    let row = s
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == name.as_str())
        .unwrap();
    assert_eq!(row["dns"]["versions"][0]["stage"], "published", "{row}");
    assert_eq!(row["dns"]["actions"][0]["action"], "confirm", "{row}");
    let (code, out, _) = keyroll_run(bao, &bao.addr, &p.path, &["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("DNS STAGE") && out.contains(&owner(1)) && out.contains("published"),
        "{out}"
    );
}

/// The shipped rotator policy (deploy/vault/keyroll-rotator.hcl) lets keyroll read the
/// sidecars' signing reports: with a fresh report saying the mailer signs with v1, the run
/// records v1 as signing (event dns_signing) and reports no trouble reading them.
#[test]
fn the_shipped_rotator_policy_reads_signing_reports_and_the_signing_stage_is_recorded() {
    let bao = Bao::shared();
    let knot = Knot::start();
    let name = unique("mail-dkimsigning");
    let hcl =
        std::fs::read_to_string(common::root().join("deploy/vault/keyroll-rotator.hcl")).unwrap();
    let token = bao.token_with_policy("keyroll-rotator", &hcl);
    let p = policy(
        &knot,
        &knot.secret_file,
        &dkim_key(&name, "ed25519", "primary", "example.com"),
    );
    let t0 = Timestamp::now();
    let as_rotator = |want: i32| -> Value {
        let (code, out, err) = run(keyroll_via(bao, &bao.addr, &p.path)
            .env("VAULT_TOKEN", &token)
            .args(["apply", "--at", &t0.to_string(), "-o", "json"]));
        assert_eq!(code, want, "{out}\n{err}");
        serde_json::from_str(&out).unwrap()
    };
    as_rotator(0);
    as_rotator(0);
    let report = p.dir.path().join("report.json");
    std::fs::write(
        &report,
        serde_json::json!({
            "version": 1, "selector": "kr1", "since": t0.to_string(),
            "sidecar": "mx1", "reported_at": t0.to_string(),
        })
        .to_string(),
    )
    .unwrap();
    bao.cli_ok(&[
        "kv",
        "put",
        &format!("secret/keyroll/signing/transit/{name}/mx1"),
        &format!("@{}", report.display()),
    ]);
    let r = as_rotator(0);
    assert_eq!(dns_verbs(&r, &name), ["mark_signing"], "{r}");
    let k = key_report(&r, &name);
    assert_eq!(k["dns"]["signing"], 1, "{r}");
    assert_eq!(k["dns"]["versions"][0]["stage"], "signing", "{r}");
    assert!(k["dns"]["problems"].is_null(), "{r}");
    assert_eq!(p.events_of("dns_signing", &name).len(), 1);
}

#[test]
fn a_tsig_key_the_server_does_not_know_is_badkey_and_exit_5() {
    let bao = Bao::shared();
    let knot = Knot::start();
    let name = unique("dkimnokey");
    let p = PolicyFile::new("");
    p.write(&format!(
        "{}\n{}\n{}",
        p.audit_section(),
        policy_target(&knot, "primary", &knot.secret_file, "").replace(
            &format!("tsig_key = \"{KEY_NAME}\""),
            "tsig_key = \"stranger\""
        ),
        dkim_key(&name, "ed25519", "primary", "example.com")
    ));
    let (code, out, err) = keyroll_run(
        bao,
        &bao.addr,
        &p.path,
        &["apply", "--at", &Timestamp::now().to_string()],
    );
    assert_eq!(code, 5, "{out}\n{err}");
    assert!(err.contains("BADKEY") && err.contains("stranger"), "{err}");
    assert!(out.contains("DNS FAILED"), "{out}");
    assert_eq!(bao.key("transit", &name)["latest_version"], 1);
    assert_eq!(knot.txt(&owner(1)).rcode, "NXDOMAIN");
}

#[test]
fn a_failed_zone_file_reload_is_exit_5_and_the_next_run_publishes() {
    let bao = Bao::shared();
    let knot = Knot::start();
    let name = unique("dkimreload");
    let p = PolicyFile::new("");
    let good = format!(
        "{}\n{}\n{}",
        p.audit_section(),
        policy_zonefile_target(&knot, "files"),
        dkim_key(&name, "ed25519", "files", "example.org")
    );
    let reload_line = good
        .lines()
        .find(|l| l.starts_with("reload = "))
        .unwrap()
        .to_string();
    p.write(&good.replace(&reload_line, "reload = [\"false\"]"));
    let t0 = Timestamp::now();
    let r = apply_at(bao, &p.path, t0, 5);
    let err = key_report(&r, &name)["dns"]["error"].as_str().unwrap();
    assert!(err.contains("false"), "{err}");
    assert_eq!(p.events_of("dns_failed", &name).len(), 1);
    assert!(p.events_of("dns_published", &name).is_empty());
    // Nothing was recorded: with a working reload the next run publishes (and reloads).
    p.write(&good);
    let r = apply_at(bao, &p.path, t0, 0);
    assert_eq!(dns_verbs(&r, &name), ["publish"], "{r}");
    assert_eq!(knot.txt("kr1._domainkey.example.org").txt.len(), 1);
}
