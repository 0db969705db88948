//! End-to-end tests of the `keyroll` binary against a real OpenBao dev server: creation,
//! rotation and retention timing, on-demand rotation, drift, concurrency, failure surfaces.
//! Vault's state is read back directly (with the `bao` CLI) after each run. Schedules are
//! tested at pinned instants (`apply --at`), never with wall-clock margins.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::faultproxy::FaultProxy;
use common::keyroll::{
    applied_verbs, apply_at, apply_at_via, key_state, keyroll_via, plus, PolicyFile,
};
use common::{run, unique, Bao};
use serde_json::Value;

/// Writes a policy file into a fresh temp dir; returns (dir guard, path).
fn policy(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("policy.toml");
    std::fs::write(&p, body).unwrap();
    (dir, p)
}

fn keyroll(bao: &Bao, policy: &PathBuf, args: &[&str]) -> (i32, String, String) {
    run(bao.keyroll("keyroll").arg("-c").arg(policy).args(args))
}

fn n(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}

#[test]
fn creates_every_declared_key_type_with_its_flags() {
    let bao = Bao::shared();
    let p = unique("types");
    let types = [
        ("aes128-gcm96", false),
        ("aes256-gcm96", true),
        ("chacha20-poly1305", false),
        ("ed25519", true),
        ("ecdsa-p256", false),
        ("ecdsa-p384", false),
        ("rsa-2048", true),
        ("hmac", true),
    ];
    let mut body = String::from("[defaults]\nrotate_every = \"90d\"\n");
    for (t, exp) in types {
        body.push_str(&format!(
            "[[keys]]\nname = \"{p}-{t}\"\ntype = \"{t}\"\nexportable = {exp}\n"
        ));
    }
    let (_d, path) = policy(&body);
    let (code, out, err) = keyroll(bao, &path, &["apply"]);
    assert_eq!(code, 0, "{out}\n{err}");
    for (t, exp) in types {
        let k = bao.key("transit", &format!("{p}-{t}"));
        assert_eq!(k["type"], t);
        assert_eq!(k["exportable"], exp, "{t}");
        assert_eq!(n(&k, "latest_version"), 1);
    }
    // A second run changes nothing and says so.
    let (code, out, _) = keyroll(bao, &path, &["apply", "-o", "json"]);
    assert_eq!(code, 0);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(report["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["actions"].as_array().unwrap().is_empty()));
    // The plan agrees: nothing to do.
    let (code, out, _) = keyroll(bao, &path, &["plan", "-o", "json"]);
    assert_eq!(code, 0);
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert!(plan["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["actions"].as_array().unwrap().is_empty()));
}

/// Creation time of `version` as the planner sees it, exactly: Vault's (unix seconds for
/// symmetric keys, RFC 3339 for asymmetric ones) or, for hmac, keyroll's record.
fn created_at(bao: &Bao, name: &str, version: u32, hmac: bool) -> jiff::Timestamp {
    let v = version.to_string();
    let e = if hmac {
        let rec = bao
            .read(&format!("secret/data/keyroll/keys/transit/{name}"))
            .expect("keyroll record");
        rec["data"]["created"][&v].clone()
    } else {
        bao.key("transit", name)["keys"][&v].clone()
    };
    if let Some(secs) = e.as_i64() {
        return jiff::Timestamp::from_second(secs).unwrap();
    }
    let text = e
        .as_str()
        .or_else(|| e["creation_time"].as_str())
        .unwrap_or_else(|| panic!("no creation time for v{v}: {e}"));
    text.parse().unwrap()
}

/// Waits until the wall clock is past the whole second `t` falls in: Vault stamps symmetric
/// versions with whole seconds, and the next version must carry a later one. (A wait in the
/// safe direction: waiting longer changes nothing.)
fn wait_past_second_of(t: jiff::Timestamp) {
    while jiff::Timestamp::now().as_second() <= t.as_second() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// rotate_every 4s, retain_for 6s, dispose_after 4s. Every apply runs at a pinned instant
/// (`apply --at`) at or one second before a boundary computed from the creation times the
/// planner sees (Vault's, or keyroll's record for hmac); the Vault state is read back after
/// each run. No wall-clock margin is involved. The runs just before each step prove it does
/// not happen early; the runs on the boundary, that it happens then.
fn retention_scenario(key_type: &str) {
    let bao = Bao::shared();
    let hmac = key_type == "hmac";
    let name = unique(&format!("ret-{key_type}"));
    let body = |rotate: &str| {
        format!(
            "[[keys]]\nname = \"{name}\"\ntype = \"{key_type}\"\nrotate_every = \"{rotate}\"\n\
             retain_for = \"6s\"\ndispose_after = \"4s\"\n"
        )
    };
    let p = PolicyFile::new(&body("4s"));
    let check = |expect: (u64, u64, u64), when: &str| {
        assert_eq!(
            key_state(bao, "transit", &name),
            expect,
            "{key_type} key {when} (latest, min_decryption, min_available)"
        );
    };

    apply_at(bao, &p.path, jiff::Timestamp::now(), 0);
    check((1, 1, 0), "after create");
    let c1 = created_at(bao, &name, 1, hmac);

    apply_at(bao, &p.path, plus(c1, 3), 0);
    check((1, 1, 0), "v1 3s old: not rotated before rotate_every");
    wait_past_second_of(c1);
    apply_at(bao, &p.path, plus(c1, 4), 0);
    check((2, 1, 0), "v1 4s old: rotated; v1 stays usable");
    let c2 = created_at(bao, &name, 2, hmac);

    apply_at(bao, &p.path, plus(c2, 3), 0);
    check((2, 1, 0), "v2 3s old: nothing due");
    wait_past_second_of(c2);
    apply_at(bao, &p.path, plus(c2, 4), 0);
    check(
        (3, 1, 0),
        "v2 4s old: rotated; v1's successor only 4s old, v1 kept",
    );
    let c3 = created_at(bao, &name, 3, hmac);
    assert!(c3 > c2, "v3 must be younger than v2");

    // From here on only retention is exercised: stop rotating. v1 retires when v2 is 6s old
    // (c2+6), v2 when v3 is (c3+6, later: c3 > c2); each is trimmed 4s after it retired.
    p.write(&body("1h"));
    apply_at(bao, &p.path, plus(c2, 5), 0);
    check(
        (3, 1, 0),
        "v1's successor 5s old: not retired before retain_for",
    );
    let v1_retired = plus(c2, 6);
    apply_at(bao, &p.path, v1_retired, 0);
    check(
        (3, 2, 0),
        "v1's successor 6s old: v1 retired (v2's successor is younger)",
    );
    apply_at(bao, &p.path, plus(c2, 9).min(plus(c3, 5)), 0);
    check(
        (3, 2, 0),
        "v1 retired under 4s ago, v2's successor under 6s old: nothing due",
    );
    let v2_retired = plus(c2, 10).max(plus(c3, 6));
    apply_at(bao, &p.path, v2_retired, 0);
    check(
        (3, 3, 2),
        "v1 retired 4s or more ago: disposed; v2's successor 6s old: v2 retired",
    );
    apply_at(bao, &p.path, plus(v2_retired, 3), 0);
    check(
        (3, 3, 2),
        "v2 retired 3s ago: not disposed before dispose_after",
    );
    apply_at(bao, &p.path, plus(v2_retired, 4), 0);
    check(
        (3, 3, 3),
        "v2 retired 4s ago: disposed; v3, the latest, stays",
    );

    // Trimmed material is gone from Vault, not just hidden.
    if !hmac {
        let k = bao.key("transit", &name);
        assert!(k["keys"].get("1").is_none(), "v1 still stored: {k}");
    }
}

#[test]
fn rotation_retirement_and_disposal_happen_at_the_right_runs() {
    retention_scenario("aes256-gcm96");
}

#[test]
fn hmac_keys_follow_the_same_schedule_from_keyrolls_record() {
    retention_scenario("hmac");
}

#[test]
fn keep_versions_retires_beyond_the_newest_n() {
    let bao = Bao::shared();
    let name = unique("keep");
    let (_d, path) = policy(&format!(
        "[[keys]]\nname = \"{name}\"\ntype = \"ed25519\"\nrotate_every = \"90d\"\nkeep_versions = 2\n"
    ));
    assert_eq!(keyroll(bao, &path, &["apply"]).0, 0);
    for _ in 0..3 {
        assert_eq!(keyroll(bao, &path, &["rotate", &name]).0, 0);
    }
    let (code, out, err) = keyroll(bao, &path, &["apply"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("retire"), "{out}");
    let k = bao.key("transit", &name);
    assert_eq!(
        (n(&k, "latest_version"), n(&k, "min_decryption_version")),
        (4, 3)
    );
    // No dispose_after: nothing is trimmed, ever.
    assert_eq!(n(&k, "min_available_version"), 0);
}

#[test]
fn rotate_on_demand_with_retire_previous() {
    let bao = Bao::shared();
    let name = unique("ondemand");
    let (_d, path) = policy(&format!(
        "[[keys]]\nname = \"{name}\"\ntype = \"rsa-2048\"\nrotate_every = \"90d\"\n"
    ));
    assert_eq!(keyroll(bao, &path, &["apply"]).0, 0);
    let (code, out, err) = keyroll(bao, &path, &["rotate", &name]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("to v2"), "{out}");
    let k = bao.key("transit", &name);
    assert_eq!(
        (n(&k, "latest_version"), n(&k, "min_decryption_version")),
        (2, 1)
    );

    let (code, out, err) = keyroll(
        bao,
        &path,
        &["rotate", &name, "--retire-previous", "-o", "json"],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["latest_version"], 3);
    let k = bao.key("transit", &name);
    assert_eq!(
        (n(&k, "latest_version"), n(&k, "min_decryption_version")),
        (3, 3)
    );
    // Retired, not destroyed: the policy has no dispose_after.
    assert_eq!(n(&k, "min_available_version"), 0);
}

#[test]
fn drifted_key_is_left_alone_while_others_proceed() {
    let bao = Bao::shared();
    let drifted = unique("drift");
    let fine = unique("fine");
    bao.cli_ok(&[
        "write",
        "-f",
        &format!("transit/keys/{drifted}"),
        "type=ed25519",
    ]);
    let before = bao.key("transit", &drifted);
    let (_d, path) = policy(&format!(
        "[defaults]\nrotate_every = \"1s\"\nkeep_versions = 1\n\
         [[keys]]\nname = \"{drifted}\"\ntype = \"rsa-2048\"\n\
         [[keys]]\nname = \"{fine}\"\ntype = \"aes256-gcm96\"\n"
    ));
    std::thread::sleep(Duration::from_millis(1100));
    let (code, out, err) = keyroll(bao, &path, &["apply"]);
    assert_eq!(code, 3, "drift must exit 3\n{out}\n{err}");
    assert!(
        out.contains("DRIFT") && out.contains("policy says type rsa-2048 but Vault has ed25519"),
        "{out}"
    );
    assert_eq!(
        bao.key("transit", &drifted),
        before,
        "drifted key was touched"
    );
    assert_eq!(bao.key("transit", &fine)["type"], "aes256-gcm96");
    // status reports it too, for monitoring.
    let (code, out, _) = keyroll(bao, &path, &["status"]);
    assert_eq!(code, 3);
    assert!(out.contains("DRIFT"), "{out}");
}

#[test]
fn status_exits_3_when_a_rotation_is_overdue() {
    let bao = Bao::shared();
    let name = unique("overdue");
    let (_d, path) = policy(&format!(
        "[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n"
    ));
    assert_eq!(keyroll(bao, &path, &["apply"]).0, 0);
    let (code, out, _) = keyroll(bao, &path, &["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(" ok"), "{out}");
    let (code, out, _) = keyroll(bao, &path, &["status", "--at", "+31d", "-o", "json"]);
    assert_eq!(code, 3);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["overdue"], true);
    assert_eq!(v[0]["usable_versions"], serde_json::json!([1]));
    // The plan as of then shows the rotation, with its reason.
    let (_, out, _) = keyroll(bao, &path, &["plan", "--at", "+31d"]);
    assert!(
        out.contains("rotate") && out.contains("policy rotates every 30days"),
        "{out}"
    );
}

#[test]
fn inventory_lists_managed_and_unmanaged_keys() {
    let bao = Bao::shared();
    let managed = unique("inv-m");
    let stray = unique("inv-u");
    bao.cli_ok(&[
        "write",
        "-f",
        &format!("transit/keys/{stray}"),
        "type=hmac",
        "key_size=32",
    ]);
    let (_d, path) = policy(&format!(
        "[[keys]]\nname = \"{managed}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"30d\"\n"
    ));
    assert_eq!(keyroll(bao, &path, &["apply"]).0, 0);
    let (code, out, err) = keyroll(bao, &path, &["inventory", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    let find = |n: &str| {
        rows.iter()
            .find(|r| r["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed"))
    };
    assert_eq!(find(&managed)["managed"], true);
    assert_eq!(find(&stray)["managed"], false);
    assert_eq!(find(&stray)["type"], "hmac");
}

#[test]
fn two_concurrent_applies_add_exactly_one_version_per_due_key() {
    let bao = Bao::shared();
    let names: Vec<String> = (0..8).map(|_| unique("conc")).collect();
    let mut body = String::from("[defaults]\nrotate_every = \"1d\"\ntype = \"aes256-gcm96\"\n");
    for n in &names {
        body.push_str(&format!("[[keys]]\nname = \"{n}\"\n"));
    }
    let p = PolicyFile::new(&body);
    apply_at(bao, &p.path, jiff::Timestamp::now(), 0);
    for round in 2..=3u32 {
        // Pinned at the instant the newest latest version turns 1d old: every key is due, and
        // a version made during this round (a later second) is not.
        let newest = names
            .iter()
            .map(|n| created_at(bao, n, round - 1, false))
            .max()
            .unwrap();
        let at = plus(newest, 86_400).to_string();
        wait_past_second_of(newest);
        let spawn = || {
            keyroll_via(bao, &bao.addr, &p.path)
                .args(["apply", "--at", &at])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        for child in [a, b] {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for n in &names {
            assert_eq!(
                super_latest(bao, n),
                u64::from(round),
                "{n} after round {round}"
            );
        }
    }
}

fn super_latest(bao: &Bao, name: &str) -> u64 {
    n(&bao.key("transit", name), "latest_version")
}

/// Asserts a failed command printed exactly one clear error line and no panic.
fn one_error_line(err: &str, needle: &str) {
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("keyroll: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line:\n{err}");
    assert!(
        lines[0].contains(needle),
        "{needle:?} not in {:?}",
        lines[0]
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn unreachable_vault_is_one_clear_error() {
    let bao = Bao::shared();
    let (_d, path) = policy("[[keys]]\nname = \"x\"\ntype = \"hmac\"\nrotate_every = \"1d\"\n");
    let port = common::free_port();
    let (code, _, err) = run(bao
        .keyroll("keyroll")
        .env("VAULT_ADDR", format!("http://127.0.0.1:{port}"))
        .arg("-c")
        .arg(&path)
        .arg("apply"));
    assert_eq!(code, 69, "{err}");
    one_error_line(&err, "unreachable");
    assert!(
        err.contains("Connection refused") || err.contains("connection refused"),
        "{err}"
    );
}

#[test]
fn sealed_vault_is_one_clear_error_and_changes_nothing() {
    let bao = Bao::dev();
    let name = unique("sealed");
    let (_d, path) = policy(&format!(
        "[[keys]]\nname = \"{name}\"\ntype = \"hmac\"\nrotate_every = \"1d\"\n"
    ));
    bao.seal();
    let (code, _, err) = keyroll(&bao, &path, &["apply"]);
    assert_eq!(code, 69, "{err}");
    one_error_line(&err, "sealed");
}

#[test]
fn token_without_capability_is_refused_and_changes_nothing() {
    let bao = Bao::shared();
    let name = unique("denied");
    let (_d, path) = policy(&format!(
        "[state]\npath = \"keyroll-{name}\"\n[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"1s\"\n"
    ));
    assert_eq!(keyroll(bao, &path, &["apply"]).0, 0);
    // Read and lock, but no rotate.
    let token = bao.token_with_policy(
        &format!("ro-{name}"),
        &format!(
            "path \"transit/keys/{name}\" {{ capabilities = [\"read\"] }}\n\
             path \"secret/data/keyroll-{name}/*\" {{ capabilities = [\"create\", \"read\", \"update\"] }}\n"
        ),
    );
    std::thread::sleep(Duration::from_millis(1100));
    let (code, out, err) = run(bao
        .keyroll("keyroll")
        .env("VAULT_TOKEN", &token)
        .arg("-c")
        .arg(&path)
        .arg("apply"));
    assert_eq!(code, 77, "{out}\n{err}");
    one_error_line(
        &err,
        &format!("permission denied on transit/keys/{name}/rotate"),
    );
    assert_eq!(super_latest(bao, &name), 1);
}

#[test]
fn rotating_a_missing_key_fails_and_creates_nothing() {
    let bao = Bao::shared();
    let name = unique("missing");
    let (_d, path) = policy(&format!(
        "[[keys]]\nname = \"{name}\"\ntype = \"hmac\"\nrotate_every = \"1d\"\n"
    ));
    let (code, _, err) = keyroll(bao, &path, &["rotate", &name]);
    assert_eq!(code, 1, "{err}");
    one_error_line(&err, "not found");
    assert!(
        bao.read(&format!("transit/keys/{name}")).is_none(),
        "rotate created the key"
    );
}

#[test]
fn invalid_policy_names_file_line_and_field() {
    let bao = Bao::shared();
    let (_d, path) = policy("[[keys]]\nname = \"x\"\ntype = \"hmac\"\nrotate_every = \"9O d\"\n");
    let (code, _, err) = keyroll(bao, &path, &["validate"]);
    assert_eq!(code, 64, "{err}");
    one_error_line(&err, &format!("{}:4", path.display()));
    assert!(err.contains("not a duration"), "{err}");
    let (code, _, err) = keyroll(bao, &path, &["apply"]);
    assert_eq!(code, 64, "{err}");
    let (_d2, path2) =
        policy("[[keys]]\nname = \"../../etc/passwd\"\ntype = \"hmac\"\nrotate_every = \"1d\"\n");
    let (code, _, err) = keyroll(bao, &path2, &["validate"]);
    assert_eq!(code, 64);
    one_error_line(&err, "keys.name");
}

#[test]
fn plain_http_to_remote_vault_is_refused() {
    let bao = Bao::shared();
    let (_d, path) = policy("[[keys]]\nname = \"x\"\ntype = \"hmac\"\nrotate_every = \"1d\"\n");
    let (code, _, err) = run(bao
        .keyroll("keyroll")
        .env("VAULT_ADDR", "http://vault.example.invalid:8200")
        .arg("-c")
        .arg(&path)
        .arg("plan"));
    assert_eq!(code, 64, "{err}");
    one_error_line(&err, "refusing plain http://");
}

#[test]
fn key_material_and_tokens_never_reach_logs_or_output() {
    let bao = Bao::shared();
    let names: Vec<String> = ["rsa-2048", "ed25519", "aes256-gcm96", "hmac"]
        .iter()
        .map(|t| format!("{}-{t}", unique("secret")))
        .collect();
    let mut body =
        String::from("[defaults]\nrotate_every = \"1s\"\nexportable = true\nkeep_versions = 1\n");
    for (n, t) in names
        .iter()
        .zip(["rsa-2048", "ed25519", "aes256-gcm96", "hmac"])
    {
        body.push_str(&format!("[[keys]]\nname = \"{n}\"\ntype = \"{t}\"\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    body.push_str(&format!("[audit]\npath = \"{}\"\n", audit.display()));
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, body).unwrap();

    let mut captured = String::new();
    for args in [
        vec!["--log-level", "trace,keyroll=trace", "apply"],
        vec![
            "--log-level",
            "trace",
            "--log-format",
            "json",
            "apply",
            "-o",
            "json",
        ],
        vec![
            "--log-level",
            "trace",
            "rotate",
            names[0].as_str(),
            "--retire-previous",
        ],
        vec!["--log-level", "trace,keyroll=trace", "status", "-o", "json"],
        vec!["--log-level", "trace,keyroll=trace", "plan"],
    ] {
        std::thread::sleep(Duration::from_millis(1100));
        let (_, out, err) = keyroll(bao, &path, &args);
        captured.push_str(&out);
        captured.push_str(&err);
    }
    captured.push_str(&std::fs::read_to_string(&audit).unwrap());
    assert!(
        captured.contains("rotate"),
        "nothing was logged?\n{captured}"
    );
    assert!(!captured.contains(&bao.token), "the Vault token leaked");
    let (kind, n) = (
        ["signing-key", "signing-key", "encryption-key", "hmac-key"],
        &names,
    );
    for (k, name) in kind.iter().zip(n) {
        let v = bao
            .read(&format!("transit/export/{k}/{name}"))
            .expect("export");
        for (_, material) in v["keys"].as_object().unwrap() {
            let m = material.as_str().unwrap();
            // Check a distinctive slice of every line of the material.
            for line in m
                .lines()
                .filter(|l| l.len() >= 24 && !l.starts_with("-----"))
            {
                assert!(
                    !captured.contains(&line[..24]),
                    "key material of {name} leaked"
                );
            }
        }
    }
}

/// How a version that keyroll retired becomes retired again after an operator un-retired it.
#[derive(Clone, Copy, Debug)]
enum ReRetire {
    /// keyroll runs while the version is usable, then retires it again itself.
    KeyrollAfterSeeingItUsable,
    /// keyroll never sees the version usable: un-retired and re-retired between two runs.
    KeyrollWithoutSeeingItUsable,
    /// keyroll sees it usable, then the operator raises the minimum again by hand.
    Operator,
}

/// Issue 7 item 2: retire v1 (keep_versions = 1), un-retire it (operator lowers
/// min_decryption_version, policy keep_versions = 2), retire it again: disposal must wait a full
/// `dispose_after` from the second retirement, not count from the first. Clock pinned by --at.
fn re_retirement_restarts_dispose_after(how: ReRetire) {
    let bao = Bao::shared();
    let name = unique("reretire");
    let body = |keep: u32| {
        format!(
            "[[keys]]\nname = \"{name}\"\ntype = \"aes256-gcm96\"\nrotate_every = \"1d\"\n\
             keep_versions = {keep}\ndispose_after = \"10s\"\n"
        )
    };
    let p = PolicyFile::new(&body(1));
    let t0 = jiff::Timestamp::now();
    apply_at(bao, &p.path, t0, 0);
    assert_eq!(keyroll(bao, &p.path, &["rotate", &name]).0, 0);
    apply_at(bao, &p.path, plus(t0, 1), 0);
    assert_eq!(
        key_state(bao, "transit", &name),
        (2, 2, 0),
        "v1 retired at t0+1s"
    );

    // The operator un-retires v1 and keeps two versions for a while.
    bao.cli_ok(&[
        "write",
        &format!("transit/keys/{name}/config"),
        "min_decryption_version=1",
    ]);
    p.write(&body(2));
    if !matches!(how, ReRetire::KeyrollWithoutSeeingItUsable) {
        apply_at(bao, &p.path, plus(t0, 5), 0);
        assert_eq!(
            key_state(bao, "transit", &name),
            (2, 1, 0),
            "v1 usable again"
        );
    }
    match how {
        ReRetire::Operator => {
            bao.cli_ok(&[
                "write",
                &format!("transit/keys/{name}/config"),
                "min_decryption_version=2",
            ]);
            p.write(&body(1));
            // keyroll first sees the retirement at t0+20s.
            apply_at(bao, &p.path, plus(t0, 20), 0);
        }
        _ => {
            p.write(&body(1));
            apply_at(bao, &p.path, plus(t0, 20), 0);
        }
    }
    assert_eq!(
        key_state(bao, "transit", &name),
        (2, 2, 0),
        "{how:?}: v1 retired again at t0+20s"
    );
    apply_at(bao, &p.path, plus(t0, 21), 0);
    assert_eq!(
        key_state(bao, "transit", &name),
        (2, 2, 0),
        "{how:?}: v1 re-retired 1s ago must not be trimmed (dispose_after = 10s)"
    );
    apply_at(bao, &p.path, plus(t0, 29), 0);
    assert_eq!(
        key_state(bao, "transit", &name),
        (2, 2, 0),
        "{how:?}: 9s after"
    );
    apply_at(bao, &p.path, plus(t0, 30), 0);
    assert_eq!(
        key_state(bao, "transit", &name),
        (2, 2, 2),
        "{how:?}: v1 trimmed 10s after its second retirement"
    );
}

#[test]
fn re_retired_version_waits_dispose_after_again_when_keyroll_re_retires_it() {
    re_retirement_restarts_dispose_after(ReRetire::KeyrollAfterSeeingItUsable);
}

#[test]
fn re_retired_version_waits_dispose_after_again_when_keyroll_never_saw_it_usable() {
    re_retirement_restarts_dispose_after(ReRetire::KeyrollWithoutSeeingItUsable);
}

#[test]
fn re_retired_version_waits_dispose_after_again_when_an_operator_re_retires_it() {
    re_retirement_restarts_dispose_after(ReRetire::Operator);
}

/// Issue 7 item 6: once versions are retired, Vault's key read no longer lists their creation
/// times; that must not make every run plan bookkeeping, take the lock and write KV.
#[test]
fn plan_reaches_up_to_date_after_retirement_and_apply_then_touches_no_state() {
    let bao = Bao::shared();
    let names: Vec<String> = ["aes256-gcm96", "ed25519", "hmac"]
        .iter()
        .map(|t| format!("{}-{t}", unique("conv")))
        .collect();
    let mut body = String::from("[defaults]\nrotate_every = \"1d\"\nkeep_versions = 1\n");
    for (n, t) in names.iter().zip(["aes256-gcm96", "ed25519", "hmac"]) {
        body.push_str(&format!("[[keys]]\nname = \"{n}\"\ntype = \"{t}\"\n"));
    }
    let p = PolicyFile::new(&body);
    let t0 = jiff::Timestamp::now();
    apply_at(bao, &p.path, t0, 0);
    for n in &names {
        assert_eq!(keyroll(bao, &p.path, &["rotate", n]).0, 0);
    }
    apply_at(bao, &p.path, plus(t0, 1), 0);
    for n in &names {
        assert_eq!(key_state(bao, "transit", n), (2, 2, 0), "{n} v1 retired");
    }
    for round in 1..=2 {
        let (code, out, err) = keyroll(bao, &p.path, &["plan", "-o", "json"]);
        assert_eq!(code, 0, "{err}");
        let plan: Value = serde_json::from_str(&out).unwrap();
        for k in plan["keys"].as_array().unwrap() {
            assert_eq!(
                k["actions"],
                serde_json::json!([]),
                "plan #{round} after retirement is not up to date: {k}"
            );
        }
    }
    // A no-op apply reads and nothing else: no lock taken, no record written.
    let proxy = FaultProxy::start(&bao.addr);
    let report = apply_at_via(bao, &proxy.addr, &p.path, plus(t0, 2), 0);
    for n in &names {
        assert!(applied_verbs(&report, n).is_empty(), "{report}");
    }
    let writes: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.method != "GET" || s.path.contains("/locks/"))
        .collect();
    assert!(
        writes.is_empty(),
        "a no-op apply took locks or wrote: {writes:?}"
    );
}

/// Issue 7 item 11: `bao kv delete` on keyroll's lock or record keeps the KV version number, so
/// check-and-set against "absent" (cas = 0) never matches again; keyroll must carry on.
#[test]
fn soft_deleted_or_destroyed_lock_and_record_do_not_block_a_key() {
    let bao = Bao::shared();
    for how in ["delete", "destroy"] {
        let name = unique(&format!("kvdel-{how}"));
        let p = PolicyFile::new(&format!(
            "[vault]\ntimeout = \"2s\"\n[state]\nlock_ttl = \"10s\"\n\
             [[keys]]\nname = \"{name}\"\ntype = \"hmac\"\nrotate_every = \"1d\"\n"
        ));
        let t0 = jiff::Timestamp::now();
        apply_at(bao, &p.path, t0, 0);
        for kind in ["locks", "keys"] {
            let path = format!("secret/keyroll/{kind}/transit/{name}");
            match how {
                "delete" => bao.cli_ok(&["kv", "delete", &path]),
                _ => {
                    let meta = bao.read(&format!("secret/metadata/keyroll/{kind}/transit/{name}"));
                    let v = meta.expect("metadata")["current_version"].as_u64().unwrap();
                    bao.cli_ok(&["kv", "destroy", &format!("-versions={v}"), &path])
                }
            };
        }
        // The record held v1's creation time (Vault keeps none for hmac): it is recorded
        // again as first seen, under the lock written over the deleted one.
        let report = apply_at(bao, &p.path, plus(t0, 2 * 86_400), 0);
        assert_eq!(
            applied_verbs(&report, &name),
            ["record_created"],
            "{how}: {report}"
        );
        let report = apply_at(bao, &p.path, plus(t0, 4 * 86_400), 0);
        assert_eq!(applied_verbs(&report, &name), ["rotate"], "{how}: {report}");
        assert_eq!(key_state(bao, "transit", &name).0, 2, "{how}");
        let rec = bao
            .read(&format!("secret/data/keyroll/keys/transit/{name}"))
            .unwrap_or_else(|| panic!("{how}: no record after the run"));
        assert!(
            rec["data"]["created"].get("2").is_some(),
            "{how}: v2's creation time not recorded: {rec}"
        );
    }
}

/// Issue 7 items 11 and 13: values that overflow or make no sense are refused when the policy
/// is loaded (exit 64, `file:line: field: reason`), by `validate` and by `apply` alike.
#[test]
fn absurd_durations_and_counts_are_refused_at_load_with_file_line_and_field() {
    let bao = Bao::shared();
    let key = "[[keys]]\nname = \"x\"\ntype = \"aes256-gcm96\"\nrotate_every = \"90d\"\n";
    let cases: Vec<(String, usize, &str)> = vec![
        (format!("[state]\nlock_ttl = \"200000000000000d\"\n{key}"), 2, "state.lock_ttl"),
        (format!("[state]\nlock_ttl = \"18446744073709551615s\"\n{key}"), 2, "state.lock_ttl"),
        (format!("[state]\nlock_ttl = \"30s\"\n{key}"), 2, "state.lock_ttl"),
        (format!("{key}keep_versions = 4294967295\n"), 5, "keys.keep_versions"),
        (
            "[[keys]]\nname = \"x\"\ntype = \"aes256-gcm96\"\nrotate_every = \"200000000000000d\"\n"
                .to_string(),
            4,
            "keys.rotate_every",
        ),
        (format!("{key}keep_versions = 1\nretain_for = \"100000000d\"\n"), 6, "keys.retain_for"),
        (format!("{key}keep_versions = 1\ndispose_after = \"100000000d\"\n"), 6, "keys.dispose_after"),
        (format!("[run]\ninterval = \"18446744073709551615s\"\n{key}"), 2, "run.interval"),
        (format!("[run]\nconcurrency = 100000\n{key}"), 2, "run.concurrency"),
        (format!("[vault]\ntimeout = \"100000d\"\n{key}"), 2, "vault.timeout"),
        (
            format!("{key}[[notify.webhook]]\nurl = \"https://h.example/\"\ntimeout = \"100000d\"\n"),
            7,
            "notify.webhook.timeout",
        ),
    ];
    for (body, line, field) in cases {
        let p = PolicyFile::new(&body);
        for cmd in ["validate", "apply"] {
            let (code, out, err) = keyroll(bao, &p.path, &[cmd]);
            assert_eq!(code, 64, "{cmd} accepted {field} in:\n{body}\n{out}{err}");
            one_error_line(&err, &format!("{}:{line}: {field}: ", p.path.display()));
        }
    }
}
