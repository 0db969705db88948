//! keyroll-sidecar against a real OpenBao dev server: delivery in every format, `--once`, bad
//! config, the refresh and poll paths, Vault load, per-key degradation, self-healing, config
//! reload, staged activation, and that key material never reaches the logs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::sidecar::{create_key, rotate, wait_for, Sidecar};
use common::{run, unique, Bao};
use serde_json::Value;

fn keyring(s: &Sidecar, name: &str) -> Value {
    serde_json::from_str(&s.read(&format!("{name}.keyring.json"))).unwrap()
}

fn reload_by_command(s_dir_marker: &str) -> String {
    format!("[reload]\ncommand = [\"sh\", \"-c\", \"echo x >> {s_dir_marker}/reloads\"]\n")
}

#[test]
fn once_mode_delivers_every_format_with_private_files_0600() {
    let bao = Bao::shared();
    let (rsa, ed, aes, hmac) = (unique("rsa"), unique("ed"), unique("aes"), unique("hmac"));
    create_key(bao, &rsa, "rsa-2048");
    create_key(bao, &ed, "ed25519");
    create_key(bao, &aes, "aes256-gcm96");
    create_key(bao, &hmac, "hmac");
    rotate(bao, &aes);
    let dir = common::sidecar::workdir();
    let out = dir.path().join("out");
    let cfg = dir.path().join("sidecar.toml");
    std::fs::write(
        &cfg,
        format!(
            "output_dir = \"{}\"\n\
             [[keys]]\nname = \"{rsa}\"\nformat = \"opendkim\"\ndomain = \"example.org\"\n\
             [[keys]]\nname = \"{ed}\"\nformat = \"pem\"\n\
             [[keys]]\nname = \"{aes}\"\nformat = \"keyring-json\"\n\
             [[keys]]\nname = \"{hmac}\"\nformat = \"keyring-json\"\n",
            out.display()
        ),
    )
    .unwrap();
    let (code, _, err) = run(bao
        .keyroll("keyroll-sidecar")
        .arg("--once")
        .arg("-c")
        .arg(&cfg));
    assert_eq!(code, 0, "{err}");
    let kt = std::fs::read_to_string(out.join("KeyTable")).unwrap();
    assert!(
        kt.contains("kr1._domainkey.example.org example.org:kr1:"),
        "{kt}"
    );
    let key = out.join("keys/kr1.example.org.private");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(out.join("dns/kr1._domainkey.example.org.txt").exists());
    assert!(out.join(format!("{ed}/v1.key.pem")).exists());
    assert!(out.join(format!("{ed}/v1.pub.pem")).exists());
    let kr: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join(format!("{aes}.keyring.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(kr["active_version"], 2);
    assert_eq!(kr["versions"].as_array().unwrap().len(), 2);
    let hk: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join(format!("{hmac}.keyring.json"))).unwrap(),
    )
    .unwrap();
    // Vault keeps no creation time for hmac versions: the keyring omits it rather than invent one.
    assert!(hk["versions"][0].get("created").is_none(), "{hk}");
    assert_eq!(hk["versions"][0]["version"], 1);
    assert!(hk["versions"][0]["key"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));
}

#[test]
fn once_mode_writes_nothing_and_fails_when_a_key_cannot_be_rendered() {
    let bao = Bao::shared();
    let good = unique("good");
    create_key(bao, &good, "aes256-gcm96");
    let dir = common::sidecar::workdir();
    let out = dir.path().join("out");
    let cfg = dir.path().join("sidecar.toml");
    std::fs::write(
        &cfg,
        format!(
            "output_dir = \"{}\"\n[[keys]]\nname = \"{good}\"\nformat = \"keyring-json\"\n\
             [[keys]]\nname = \"{}\"\nformat = \"keyring-json\"\n",
            out.display(),
            unique("missing")
        ),
    )
    .unwrap();
    let (code, _, err) = run(bao
        .keyroll("keyroll-sidecar")
        .arg("--once")
        .arg("-c")
        .arg(&cfg));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!out.join("..data").exists());
    assert!(!out.join(format!("{good}.keyring.json")).exists());
}

#[test]
fn once_mode_exits_69_when_vault_is_unreachable() {
    let bao = Bao::shared();
    let dir = common::sidecar::workdir();
    let cfg = dir.path().join("sidecar.toml");
    std::fs::write(
        &cfg,
        format!(
            "output_dir = \"{}\"\n[vault]\ntimeout = \"2s\"\n[[keys]]\nname = \"k\"\nformat = \"keyring-json\"\n",
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    let port = common::free_port();
    let (code, _, err) = run(bao
        .keyroll("keyroll-sidecar")
        .env("VAULT_ADDR", format!("http://127.0.0.1:{port}"))
        .arg("--once")
        .arg("-c")
        .arg(&cfg));
    assert_eq!(code, 69, "{err}");
}

#[test]
fn a_bad_config_exits_64_naming_file_line_and_field() {
    let bao = Bao::shared();
    let dir = common::sidecar::workdir();
    let cfg = dir.path().join("sidecar.toml");
    std::fs::write(
        &cfg,
        "output_dir = \"/tmp/x\"\n[[keys]]\nname = \"k\"\nformat = \"opendkim\"\n",
    )
    .unwrap();
    let (code, _, err) = run(bao.keyroll("keyroll-sidecar").arg("-c").arg(&cfg));
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains(&format!("{}:2: keys.domain:", cfg.display())),
        "{err}"
    );
    let (code, _, _) = run(bao.keyroll("keyroll-sidecar").arg("--bogus"));
    assert_eq!(code, 2);
}

#[test]
fn a_rotation_is_published_on_refresh_and_on_poll_with_one_reload_each() {
    let bao = Bao::shared();
    let k = unique("ring");
    create_key(bao, &k, "aes256-gcm96");
    let work = common::sidecar::workdir();
    let marker = work.path().join("reloads");
    let rest = format!(
        "{}[[keys]]\nname = \"{k}\"\nformat = \"keyring-json\"\n",
        reload_by_command(&work.path().display().to_string())
    );
    // The refresh path: no poll due for an hour, so only the refresh can publish.
    let s = Sidecar::start_in(bao, work, common::free_port(), "1h", &rest);
    let count = || {
        std::fs::read_to_string(&marker)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    s.wait_ready();
    wait_for(Duration::from_secs(30), || count() == 1).expect("first publish reloads once");
    assert_eq!(keyring(&s, &k)["active_version"], 1);

    rotate(bao, &k);
    let body = s.refresh();
    assert!(body.contains("\"published\":true"), "{body}");
    assert_eq!(keyring(&s, &k)["active_version"], 2);
    wait_for(Duration::from_secs(30), || count() == 2).expect("second reload");
    let body = s.refresh();
    assert!(body.contains("\"published\":false"), "{body}");

    // The poll path: a config reload sets a 1 s poll; without a nudge, the next poll delivers.
    // (Which pass publishes is not asserted: the content and the reload count are.)
    s.rewrite_config("1s", &rest);
    rotate(bao, &k);
    wait_for(Duration::from_secs(30), || {
        keyring(&s, &k)["active_version"] == 3
    })
    .unwrap_or_else(|| panic!("poll never delivered v3: {}", s.logs()));
    wait_for(Duration::from_secs(30), || count() == 3).expect("third reload");
    // Two more polls at least, each finding the content identical: no more reloads.
    let passes = s.metric("keyroll_sidecar_passes_total");
    wait_for(Duration::from_secs(30), || {
        s.metric("keyroll_sidecar_passes_total") >= passes + 2.0
    })
    .expect("polling goes on");
    assert_eq!(count(), 3, "identical content must not reload again");
    assert_eq!(
        s.metric("keyroll_sidecar_reloads_total{result=\"ok\"}"),
        3.0
    );
}

/// Two values from one `/metrics` answer (two requests would straddle a pass).
fn two_metrics(s: &Sidecar, a: &str, b: &str) -> (f64, f64) {
    let m = s.metrics();
    let get = |series: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {series} in {m}"))
            .parse()
            .unwrap()
    };
    (get(a), get(b))
}

#[test]
fn steady_state_polls_read_metadata_only_and_export_on_change() {
    let bao = Bao::shared();
    let (a, b) = (unique("poll-a"), unique("poll-b"));
    create_key(bao, &a, "aes256-gcm96");
    create_key(bao, &b, "ed25519");
    let s = Sidecar::start(
        bao,
        "200ms",
        &format!(
            "[[keys]]\nname = \"{a}\"\nformat = \"keyring-json\"\n[[keys]]\nname = \"{b}\"\nformat = \"pem\"\n"
        ),
    );
    s.wait_ready();
    wait_for(Duration::from_secs(60), || {
        s.metric("keyroll_sidecar_passes_total") >= 5.0
    })
    .expect("five polls");
    let exports = s.metric("keyroll_sidecar_vault_requests_total{kind=\"export\"}");
    assert_eq!(exports, 2.0, "one export per key at start, none while idle");
    // A pass counts its reads as it makes them and itself when it ends: one snapshot of the
    // counters may catch a pass in the middle (at most two reads ahead).
    let (reads, passes) = two_metrics(
        &s,
        "keyroll_sidecar_vault_requests_total{kind=\"read\"}",
        "keyroll_sidecar_passes_total",
    );
    let ahead = reads - 2.0 * passes;
    assert!(
        (0.0..=2.0).contains(&ahead),
        "{reads} reads in {passes} passes: not one metadata read per key per pass"
    );
    rotate(bao, &a);
    s.refresh();
    assert_eq!(
        s.metric("keyroll_sidecar_vault_requests_total{kind=\"export\"}"),
        3.0
    );
}

#[test]
fn a_forbidden_key_degrades_only_that_key() {
    let bao = Bao::shared();
    let (ok, denied) = (unique("allowed"), unique("denied"));
    create_key(bao, &ok, "aes256-gcm96");
    create_key(bao, &denied, "aes256-gcm96");
    let token = bao.token_with_policy(
        &unique("sidecar-policy"),
        &format!(
            "path \"transit/keys/{ok}\" {{ capabilities = [\"read\"] }}\n\
             path \"transit/export/encryption-key/{ok}\" {{ capabilities = [\"read\"] }}\n"
        ),
    );
    let s = Sidecar::start_with(
        bao,
        "300ms",
        &format!(
            "[[keys]]\nname = \"{ok}\"\nformat = \"keyring-json\"\n[[keys]]\nname = \"{denied}\"\nformat = \"keyring-json\"\n"
        ),
        &token,
        &[],
    );
    wait_for(Duration::from_secs(30), || {
        s.out.join(format!("{ok}.keyring.json")).exists()
    })
    .expect("the allowed key is delivered");
    rotate(bao, &ok);
    s.refresh();
    assert_eq!(keyring(&s, &ok)["active_version"], 2);
    assert!(!s.out.join(format!("{denied}.keyring.json")).exists());
    let (code, health) = s.http("GET", "/healthz", &[]);
    assert_eq!(code, 503, "{health}");
    let h: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["keys"][&ok]["healthy"], true);
    assert!(
        h["keys"][&denied]["error"]
            .as_str()
            .unwrap()
            .contains("permission denied"),
        "{health}"
    );
    assert!(
        h.get("vault_error").is_none(),
        "a 403 is not an outage: {health}"
    );
    assert_eq!(
        s.metric(&format!(
            "keyroll_sidecar_key_healthy{{key=\"{denied}\",mount=\"transit\",format=\"keyring-json\"}}"
        )),
        0.0
    );
}

#[test]
fn refresh_requires_the_bearer_token_when_one_is_configured() {
    let bao = Bao::shared();
    let k = unique("tok");
    create_key(bao, &k, "aes256-gcm96");
    let work = common::sidecar::workdir();
    let tf = work.path().join("token");
    std::fs::write(&tf, "s3cret-refresh\n").unwrap();
    let s = Sidecar::start(
        bao,
        "1h",
        &format!(
            "listen.token_file = \"{}\"\n[[keys]]\nname = \"{k}\"\nformat = \"keyring-json\"\n",
            tf.display()
        ),
    );
    s.wait_ready();
    assert_eq!(s.http("POST", "/refresh", &[]).0, 401);
    assert_eq!(
        s.http("POST", "/refresh", &[("Authorization", "Bearer wrong")])
            .0,
        401
    );
    let (code, body) = s.http(
        "POST",
        "/refresh",
        &[("Authorization", "Bearer s3cret-refresh")],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(s.http("GET", "/readyz", &[]).0, 200);
}

#[test]
fn deleted_and_modified_files_are_restored() {
    let bao = Bao::shared();
    let k = unique("heal");
    create_key(bao, &k, "ed25519");
    let work = common::sidecar::workdir();
    let rest = format!(
        "{}[[keys]]\nname = \"{k}\"\nformat = \"opendkim\"\ndomain = \"heal.example\"\n",
        reload_by_command(&work.path().display().to_string())
    );
    let s = Sidecar::start(bao, "1h", &rest);
    s.wait_ready();
    let reloads = || {
        std::fs::read_to_string(work.path().join("reloads"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    wait_for(Duration::from_secs(30), || reloads() == 1).expect("the first publish reloads");
    let before = common::sidecar::snapshot(&s.out);
    let key_rel = "keys/kr1.heal.example.private";
    // Deleted through the snapshot (the file itself), and a visible link removed.
    std::fs::remove_file(std::fs::canonicalize(s.out.join(key_rel)).unwrap()).unwrap();
    std::fs::remove_file(s.out.join("SigningTable")).unwrap();
    wait_for(Duration::from_secs(30), || {
        s.out.join(key_rel).exists() && s.out.join("SigningTable").exists()
    })
    .unwrap_or_else(|| panic!("not restored: {}", s.logs()));
    // Modified in place.
    let kt = std::fs::canonicalize(s.out.join("KeyTable")).unwrap();
    std::fs::write(&kt, "tampered\n").unwrap();
    wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(s.out.join("KeyTable")).is_ok_and(|t| t != "tampered\n")
    })
    .unwrap_or_else(|| panic!("not restored: {}", s.logs()));
    assert_eq!(common::sidecar::snapshot(&s.out), before);
    assert!(s.metric("keyroll_sidecar_repairs_total") >= 1.0);
    assert!(s.logs().contains("restored"));
    // A reload would be asked for by the pass that published; one more pass, and a moment for
    // the reloader, must not see a second one.
    s.refresh();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        reloads(),
        1,
        "a repair restores content the mailer already has"
    );
}

#[test]
fn config_changes_apply_without_restart_and_a_broken_file_is_rejected() {
    let bao = Bao::shared();
    let (a, b) = (unique("cfg-a"), unique("cfg-b"));
    create_key(bao, &a, "aes256-gcm96");
    create_key(bao, &b, "aes256-gcm96");
    let keys_a = format!("[[keys]]\nname = \"{a}\"\nformat = \"keyring-json\"\n");
    let s = Sidecar::start(bao, "1h", &keys_a);
    s.wait_ready();
    let pid = s.pid();
    assert!(!s.out.join(format!("{b}.keyring.json")).exists());
    let base = std::fs::read_to_string(&s.config).unwrap();
    let with_b = format!("{base}[[keys]]\nname = \"{b}\"\nformat = \"keyring-json\"\n");
    // Replace by rename, as editors and ConfigMaps do.
    let tmp = s.dir.path().join("sidecar.toml.new");
    std::fs::write(&tmp, &with_b).unwrap();
    std::fs::rename(&tmp, &s.config).unwrap();
    wait_for(Duration::from_secs(30), || {
        s.out.join(format!("{b}.keyring.json")).exists()
    })
    .unwrap_or_else(|| panic!("key b not added: {}", s.logs()));
    assert_eq!(s.pid(), pid);

    std::fs::write(&s.config, format!("{with_b}poll_interval = \"soon\"\n")).unwrap();
    wait_for(Duration::from_secs(30), || {
        s.logs().contains("config change rejected")
    })
    .unwrap_or_else(|| panic!("no rejection logged: {}", s.logs()));
    let logs = s.logs();
    assert!(logs.contains("sidecar.toml:"), "{logs}");
    rotate(bao, &b);
    s.refresh();
    assert_eq!(
        keyring(&s, &b)["active_version"],
        2,
        "old config still in force"
    );
    let (_, health) = s.http("GET", "/healthz", &[]);
    assert!(health.contains("config_error"), "{health}");
}

#[test]
fn staged_activation_publishes_the_new_selector_at_once_and_signs_with_it_later() {
    let bao = Bao::shared();
    let k = unique("staged");
    create_key(bao, &k, "ed25519");
    let s = Sidecar::start(
        bao,
        "1h",
        &format!(
            "[[keys]]\nname = \"{k}\"\nformat = \"opendkim\"\ndomain = \"staged.example\"\nactivate_after = \"8s\"\n"
        ),
    );
    s.wait_ready();
    // v1 is the only version: it signs even though it is younger than 8 s.
    assert!(s
        .read("SigningTable")
        .contains("kr1._domainkey.staged.example"));
    let t_rot = std::time::Instant::now();
    rotate(bao, &k);
    s.refresh();
    assert!(s.read("KeyTable").contains("kr2._domainkey.staged.example"));
    assert!(s.out.join("dns/kr2._domainkey.staged.example.txt").exists());
    assert!(s.out.join("keys/kr2.staged.example.private").exists());
    let early = s.read("SigningTable");
    assert!(
        early.contains("kr1._domainkey") || t_rot.elapsed() >= Duration::from_secs(8),
        "must not sign with kr2 before its DNS record had time to propagate"
    );
    // No poll is due for an hour: the switch is driven by the activation time itself.
    wait_for(Duration::from_secs(60), || {
        s.read("SigningTable").contains("kr2._domainkey")
    })
    .unwrap_or_else(|| panic!("SigningTable never switched: {}", s.logs()));
    let waited = t_rot.elapsed();
    // v2 was created after t_rot, so the switch cannot come before t_rot + 8 s (the slack is
    // for the two clocks' rounding, not for timing).
    assert!(
        waited >= Duration::from_millis(7_500),
        "switched after {waited:?}"
    );
    assert!(
        s.read("KeyTable").contains("kr1._domainkey"),
        "old selector stays"
    );
}

/// Every exported secret of `name`, as strings whose pieces must never be logged.
fn secrets_of(bao: &Bao, kind: &str, name: &str) -> Vec<String> {
    let v = bao
        .read(&format!("transit/export/{kind}/{name}"))
        .expect("export");
    let mut out = Vec::new();
    for (_, m) in v["keys"].as_object().unwrap() {
        let m = m.as_str().unwrap();
        if m.contains("-----BEGIN") {
            // PEM: every full base64 line.
            out.extend(
                m.lines()
                    .filter(|l| !l.starts_with("-----") && l.len() >= 40)
                    .map(String::from),
            );
        } else {
            out.push(m.to_string());
            out.push(m[..24.min(m.len())].to_string());
        }
    }
    out
}

#[test]
fn key_material_never_appears_in_the_logs_at_any_level() {
    let bao = Bao::shared();
    let (rsa, ed, aes, hmac) = (
        unique("log-rsa"),
        unique("log-ed"),
        unique("log-aes"),
        unique("log-hmac"),
    );
    create_key(bao, &rsa, "rsa-2048");
    create_key(bao, &ed, "ed25519");
    create_key(bao, &aes, "aes256-gcm96");
    create_key(bao, &hmac, "hmac");
    let rest = format!(
        "[[keys]]\nname = \"{rsa}\"\nformat = \"opendkim\"\ndomain = \"log.example\"\n\
         [[keys]]\nname = \"{ed}\"\nformat = \"pem\"\n\
         [[keys]]\nname = \"{aes}\"\nformat = \"keyring-json\"\n\
         [[keys]]\nname = \"{hmac}\"\nformat = \"keyring-json\"\n"
    );
    for format in ["text", "json"] {
        let mut s = Sidecar::start_with(
            bao,
            "1h",
            &rest,
            &bao.token,
            &["--log-level", "trace", "--log-format", format],
        );
        s.wait_ready();
        for k in [&rsa, &ed, &aes, &hmac] {
            rotate(bao, k);
        }
        s.refresh();
        // Tamper so the repair path logs too.
        std::fs::remove_file(s.out.join("KeyTable")).unwrap();
        wait_for(Duration::from_secs(30), || s.out.join("KeyTable").exists()).unwrap();
        s.stop();
        let logs = s.logs();
        assert!(logs.len() > 1000, "trace logging produced output");
        assert!(logs.contains("new key material"));
        let mut secrets = secrets_of(bao, "signing-key", &rsa);
        secrets.extend(secrets_of(bao, "signing-key", &ed));
        secrets.extend(secrets_of(bao, "encryption-key", &aes));
        secrets.extend(secrets_of(bao, "hmac-key", &hmac));
        assert!(secrets.len() > 8);
        for sec in &secrets {
            assert!(
                !logs.contains(sec.as_str()),
                "{format} logs contain key material"
            );
        }
        assert!(
            !logs.contains(&bao.token),
            "{format} logs contain the Vault token"
        );
    }
}
